"""Every rule of the aggregate tensor equals the same op on an ordinary tensor, on cpu:1..cpu:7, for
0, 1, fewer-than-members and many rows, fused (one launch over the CPU storage) and member by member
(the path the CUDA members take), including gradients; and no op here takes the fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ms_splatfacto.backend.aggregate import (
    aggregate,
    fallback_counts,
    is_aggregate,
    parameter,
    per_member_execution,
    reset_fallback_counts,
    to_plain,
)

SPECS = ["cpu:1", "cpu:2", "cpu:3", "cpu:4", "cpu:7"]
ROWS = [0, 1, 3, 2_000]
R = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))[0]
BIAS = torch.tensor([0.5, -1.0, 2.0])

VECTOR_MATH = "exact when fused"
"""CPU transcendental kernels (exp, sigmoid) round a vector loop's scalar tail differently, so chunks
whose boundaries are not multiples of the vector width differ from the whole in the last bit when run
member by member; elementwise GPU kernels have no such tail."""

# op name -> (function of (x, y) row tensors [N, 3], exact?, differentiable?)
ROW_OPS = {
    "add": (lambda x, y: x + y, True, True),
    "scalar mul": (lambda x, y: x * 2.5 - 1, True, True),
    "exp sigmoid": (lambda x, y: torch.exp(x) + torch.sigmoid(y), VECTOR_MATH, True),
    "where": (lambda x, y: torch.where(x > 0, x, y), True, True),
    "clamp": (lambda x, y: x.clamp(-0.5, 0.5), True, True),
    "addcdiv": (lambda x, y: torch.addcdiv(x, y, y.abs() + 1, value=0.3), True, True),
    "lerp": (lambda x, y: x.lerp(y, 0.25), True, True),
    "pow neg sqrt": (lambda x, y: -(x**2) + x.abs().sqrt(), True, True),
    "compare": (lambda x, y: (x > y) & (y < 0.5), True, False),
    "to double": (lambda x, y: x.double() * 3, True, True),
    "plain bias": (lambda x, y: x + BIAS, True, True),
    "0-dim plain": (lambda x, y: x * torch.tensor(3.0), True, True),
    "rowed plain": (lambda x, y: x * torch.arange(x.shape[0] * 3.0).view(-1, 3), True, True),
    "matmul plain": (lambda x, y: x @ R, False, True),
    "linear": (lambda x, y: F.linear(x, R, BIAS), False, True),
    "bmm": (lambda x, y: torch.bmm(x[:, :, None], y[:, None, :]).sum(-1), False, True),
    "unsqueeze view": (lambda x, y: x[:, None, :].expand(-1, 2, -1).reshape(x.shape[0], 6), True, True),
    "view": (lambda x, y: x.view(x.shape[0], 3, 1).squeeze(-1), True, True),
    "select col": (lambda x, y: x[:, 1] * y[:, 2], True, True),
    "slice cols": (lambda x, y: x[:, :2] - y[:, 1:], True, True),
    "transpose inner": (lambda x, y: (x[:, :, None] * y[:, None, :]).transpose(1, 2).reshape(-1, 9), True, True),
    "sum dim1": (lambda x, y: x.sum(1), False, True),
    "mean keepdim": (lambda x, y: x.mean(-1, keepdim=True), False, True),
    "amax dim1": (lambda x, y: x.amax(1), True, True),
    "normalize": (lambda x, y: F.normalize(x, dim=-1), False, True),
    "softmax": (lambda x, y: torch.softmax(x, -1), False, True),
    "norm dim1": (lambda x, y: x.norm(dim=-1), False, True),
    "cat dim1": (lambda x, y: torch.cat([x, y[:, :1]], 1), True, True),
    "stack dim1": (lambda x, y: torch.stack([x, y], 1), True, True),
    "zeros_like": (lambda x, y: torch.zeros_like(x) + 1, True, False),
    "new_zeros": (lambda x, y: x.new_zeros((x.shape[0], 2)), True, False),
    "max dim1": (lambda x, y: x.max(dim=1).values, True, True),
}
# reductions over rows: plain results (None: skipped for 0 rows, where the plain op raises too)
REDUCTIONS = {
    "sum": lambda x: x.sum(),
    "sum rows": lambda x: x.sum(0),
    "mean": lambda x: x.mean(),
    "mean rows keepdim": lambda x: x.mean(0, keepdim=True),
    "amax rows": lambda x: x.amax(0),
    "amin": lambda x: x.amin(),
    "max": lambda x: x.max(),
    "min": lambda x: x.min(),
    "norm": lambda x: x.norm(),
    "norm rows": lambda x: torch.linalg.vector_norm(x, dim=0),
    "inf norm": lambda x: torch.linalg.vector_norm(x, float("inf")),
    "prod rows": lambda x: (x.abs() + 0.5).prod(0),
    "any": lambda x: (x > 1).any(),
    "all rows": lambda x: (x > -1).all(0),
}
EMPTY_RAISES = {"amax rows", "amin", "max", "min", "inf norm"}
SELECTIONS = {
    "mask": lambda x, m, i: x[m],
    "index": lambda x, m, i: x[i],
    "index_select": lambda x, m, i: x.index_select(0, i.remainder(max(x.shape[0], 1))),
    "cat rows": lambda x, m, i: torch.cat([x, x * 2]),
    "cat mask": lambda x, m, i: torch.cat([x, x[m]]),
    "cat plain": lambda x, m, i: torch.cat([x, torch.zeros(2, 3)]),
    "row slice": lambda x, m, i: x[1:-1] * 2,
    "where nonzero": lambda x, m, i: x[torch.where(m)[0]],
}


def rows_of(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))


def assert_same(agg: torch.Tensor, plain: torch.Tensor, exact: bool, what: str) -> None:
    got = to_plain(agg)
    assert not is_aggregate(got)
    assert got.shape == plain.shape and got.dtype == plain.dtype, (what, got.shape, plain.shape, got.dtype, plain.dtype)
    if exact:
        assert torch.equal(got, plain), what
    else:
        torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5, equal_nan=True, msg=what)


@pytest.fixture(params=["fused", "per-member"])
def mode(request):
    reset_fallback_counts()
    if request.param == "fused":
        yield request.param
    else:
        with per_member_execution():
            yield request.param
    assert fallback_counts() == {}


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n", ROWS)
def test_row_ops_and_gradients(spec: str, n: int, mode: str):
    x0, y0 = rows_of(n, 1), rows_of(n, 2)
    for name, (fn, exact, differentiable) in ROW_OPS.items():
        exact = exact is True or (exact == VECTOR_MATH and mode == "fused")
        x, y = x0.clone().requires_grad_(differentiable), y0.clone().requires_grad_(differentiable)
        ax = aggregate(x0, spec).requires_grad_(differentiable)
        ay = aggregate(y0, spec).requires_grad_(differentiable)
        expected, got = fn(x, y), fn(ax, ay)
        assert is_aggregate(got) and got.shape[0] == n, name
        assert_same(got, expected.detach() if differentiable else expected, exact, name)
        if differentiable:
            weight = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3), dtype=expected.dtype)
            (expected * weight).sum().backward()
            (got * aggregate(weight, spec)).sum().backward()
            assert_same(ax.grad, x.grad, exact, f"{name} grad x")
            if y.grad is not None:
                assert_same(ay.grad, y.grad, exact, f"{name} grad y")


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n", ROWS)
def test_reductions_and_gradients(spec: str, n: int, mode: str):
    x0 = rows_of(n, 4)
    for name, fn in REDUCTIONS.items():
        if n == 0 and name in EMPTY_RAISES:
            with pytest.raises((RuntimeError, IndexError)):
                fn(aggregate(x0, spec))
            continue
        x = x0.clone().requires_grad_(True)
        ax = aggregate(x0, spec).requires_grad_(True)
        expected, got = fn(x), fn(ax)
        assert not is_aggregate(got), name
        assert_same(got, expected.detach(), False, name)
        if expected.requires_grad:
            expected.sum().backward()
            got.sum().backward()
            assert_same(ax.grad, x.grad, False, f"{name} grad")


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("aggregate_mask", [True, False])
def test_row_selection_and_gradients(spec: str, n: int, mode: str, aggregate_mask: bool):
    x0 = rows_of(n, 5)
    g = torch.Generator().manual_seed(6)
    index = torch.randint(-n, n, (2 * n + 1,), generator=g) if n else torch.zeros(0, dtype=torch.long)
    for name, fn in SELECTIONS.items():
        x = x0.clone().requires_grad_(True)
        ax = aggregate(x0, spec).requires_grad_(True)
        mask = x0[:, 0] > 0
        amask = (ax[:, 0] > 0) if aggregate_mask else mask
        expected, got = fn(x, mask, index), fn(ax, amask, index)
        assert is_aggregate(got), name
        assert_same(got.detach(), expected.detach(), True, name)
        counts = got._layout.counts
        if name != "row slice":
            assert max(counts) - min(counts) <= 1, (name, counts)
        weight = rows_of(expected.shape[0], 7)
        (expected * weight).sum().backward()
        (got * aggregate(weight, spec)).sum().backward()
        assert_same(ax.grad, x.grad, False, f"{name} grad")


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n", ROWS)
def test_in_place_and_row_writes(spec: str, n: int, mode: str):
    x0, y0 = rows_of(n, 8), rows_of(n, 9)
    index = torch.randint(0, max(n, 1), (n,), generator=torch.Generator().manual_seed(10)) if n else torch.zeros(0, dtype=torch.long)
    writes = {
        "add_ mul_": lambda z, y: z.add_(y).mul_(2),
        "view write": lambda z, y: z[:, 0].zero_(),
        "row slice write": lambda z, y: z[1:].mul_(-1),
        "copy_": lambda z, y: z.copy_(y),
        "copy_ plain": lambda z, y: z.copy_(y0),
        "fill_": lambda z, y: z.fill_(3.0),
        "mask assign": lambda z, y: z.__setitem__(z[:, 0] > 0, 0.0),
        "index assign": lambda z, y: z.__setitem__(index, y[index]),
        "index_add_": lambda z, y: z.index_add_(0, index, y[index], alpha=0.5),
        "index accumulate": lambda z, y: z.index_put_((index,), y[index], accumulate=True),
    }
    for name, fn in writes.items():
        z, az = x0.clone(), aggregate(x0, spec)
        fn(z, y0)
        fn(az, aggregate(y0, spec))
        assert is_aggregate(az)
        assert_same(az, z, name != "index accumulate" and name != "index_add_", name)


@pytest.mark.parametrize("devices", ["cpu:1", "cpu:4"])
def test_fused_adam_runs_row_local_and_matches_a_plain_tensor(devices):
    """torch's fused Adam (no [N, ...] temporaries, see ms_splatfacto/capacity.py) on aggregate parameters:
    no fallback, the same bits as on an ordinary tensor."""
    torch.manual_seed(0)
    x, g = torch.randn(1001, 15, 3), torch.randn(1001, 15, 3)
    results = []
    for make in (lambda t, grad=True: t.clone().requires_grad_(grad), lambda t, grad=True: parameter(t.clone(), devices, grad)):
        p = torch.nn.Parameter(make(x))
        optimizer = torch.optim.Adam([p], lr=1e-2, eps=1e-15, fused=True)
        reset_fallback_counts()
        for i in range(3):
            p.grad = make(g * (i + 1), False)
            optimizer.step()
        assert fallback_counts() == {}
        results.append(to_plain(p.detach()))
    assert torch.equal(results[0], results[1])
