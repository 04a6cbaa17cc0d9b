"""Rules for ops that couple rows: transposes that move the rows (ordinary results), einsum, flips,
scans, sorts, top-k, searches and unique along rows. Each equals the same op on an ordinary tensor on
cpu:1..cpu:7 for 0, 1, fewer-than-members and many rows, fused and member by member, gradients
included, and none takes the fallback."""

from __future__ import annotations

import pytest
import torch

from ms_splatfacto.backend.aggregate import (
    aggregate,
    exchange_counts,
    is_aggregate,
    per_member_execution,
    reset_exchange,
    to_plain,
)
from tests.test_aggregate_ops import ROWS, SPECS, assert_same, mode, rows_of  # noqa: F401 (mode: the fixture)

NOISE = torch.randn(2, 2_000, 3, generator=torch.Generator().manual_seed(11))

# name -> (function of x [N, 3] -> tensor whose dim 0 is not the rows, exact?)
LEAVING_ROWS = {
    "t": (lambda x: x.t() * 2, True),
    "transpose": (lambda x: x.transpose(0, 1).sum(0), True),
    "permute": (lambda x: x[:, :, None].permute(2, 1, 0), True),
    "mT": (lambda x: x.mT, True),
    "unsqueeze 0": (lambda x: x.unsqueeze(0), True),
    "broadcast leading": (lambda x: NOISE[:, : x.shape[0]] + x, True),
    "einsum split": (lambda x: torch.einsum("nij,nj,bnj->bni", x[:, :, None] * x[:, None, :], x, NOISE[:, : x.shape[0]]), False),
}
# name -> (function of x [N, 3] -> aggregate with the rows first, exact?)
ROW_FIRST = {
    "einsum rowwise": (lambda x: torch.einsum("nij,nj->ni", x[:, :, None] * x[:, None, :], x), False),
    "einsum outer": (lambda x: torch.einsum("ni,nj->nij", x, x * 2).reshape(x.shape[0], 9), True),
    "flip rows": (lambda x: x.flip(0) * torch.arange(x.shape[0] * 3.0).view(-1, 3), True),
    "flip both": (lambda x: x.flip(0, 1), True),
    "cumsum": (lambda x: x.cumsum(0), False),
    "cumprod": (lambda x: (x.abs() + 0.5).cumprod(0), False),
    "logcumsumexp": (lambda x: x.logcumsumexp(0), False),
    "cumsum dim1": (lambda x: x.cumsum(1), True),
    "sort values": (lambda x: x.sort(0).values, True),
    "sort descending": (lambda x: x.sort(0, descending=True).values * 2, True),
    "topk": (lambda x: x.topk(min(2, x.shape[0]), 0).values, True),
    "smallest": (lambda x: x[:, 0].topk(min(5, x.shape[0]), largest=False).values, True),
}
NO_GRAD = {"cumprod"}
"""cumprod's gradient on a tensor subclass takes max and gather along the rows, which have no rules."""
# name -> function of x [N, 3] -> integer or boolean results (no gradient)
INDEX_RESULTS = {
    "cumsum bool": lambda x: (x > 0).cumsum(0),
    "cummax": lambda x: torch.cummax(x, 0),
    "cummin ties": lambda x: torch.cummin((x * 2).round(), 0),
    "argsort": lambda x: x.argsort(0),
    "argsort ties stable": lambda x: torch.sort((x * 2).round().long(), dim=0, stable=True),
    "argsort ties descending": lambda x: torch.sort((x[:, 0] > 0), dim=0, descending=True, stable=True),
    "topk indices": lambda x: x.topk(min(3, x.shape[0]), 0).indices,
    "bucketize": lambda x: torch.bucketize(x, torch.tensor([-1.0, 0.0, 0.5])),
    "searchsorted in rows": lambda x: torch.searchsorted(x.sort(1).values, x[:, :1].contiguous()),
    "searchsorted plain seq": lambda x: torch.searchsorted(torch.tensor([-1.0, 0.0, 0.5]), x[:, 0].contiguous(), right=True),
    "searchsorted in aggregate": lambda x: torch.searchsorted(x[:, 0].sort().values, torch.tensor([-0.5, 0.0, 3.0])),
    "searchsorted aggregate both": lambda x: torch.searchsorted(x[:, 0].sort().values, x[:, 1].contiguous(), side="right"),
    "bucketize by aggregate": lambda x: torch.bucketize(torch.tensor([[-0.5], [0.1]]), x[:, 0].sort().values, right=True),
    "unique": lambda x: torch.unique((x * 2).round().long(), return_inverse=True, return_counts=True),
    "unique rows of 1-d": lambda x: torch.unique((x[:, 0] > 0).long()),
}


def _leaves(out):
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n", ROWS)
def test_results_leaving_the_rows_are_ordinary(spec: str, n: int, mode: str):
    x0 = rows_of(n, 12)
    for name, (fn, exact) in LEAVING_ROWS.items():
        x, ax = x0.clone().requires_grad_(True), aggregate(x0, spec).requires_grad_(True)
        expected, got = fn(x), fn(ax)
        assert not is_aggregate(got), name
        assert_same(got, expected.detach(), exact, name)
        weight = torch.randn(expected.shape, generator=torch.Generator().manual_seed(13))
        (expected * weight).sum().backward()
        (got * weight).sum().backward()
        assert_same(ax.grad, x.grad, exact, f"{name} grad")


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n", ROWS)
def test_row_coupled_ops_and_gradients(spec: str, n: int, mode: str):
    x0 = rows_of(n, 14)
    for name, (fn, exact) in ROW_FIRST.items():
        grad = name not in NO_GRAD
        x, ax = x0.clone().requires_grad_(grad), aggregate(x0, spec).requires_grad_(grad)
        expected, got = fn(x), fn(ax)
        assert is_aggregate(got), name
        assert_same(got, expected.detach(), exact or (mode == "fused" and name.startswith("cum")), name)
        counts = got._layout.counts
        assert max(counts) - min(counts) <= 1, (name, counts)
        if not grad:
            continue
        weight = torch.randn(expected.shape, generator=torch.Generator().manual_seed(15))
        (expected * weight).sum().backward()
        (got * aggregate(weight, spec)).sum().backward()
        assert_same(ax.grad, x.grad, False, f"{name} grad")


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n", ROWS)
def test_row_coupled_index_results(spec: str, n: int, mode: str):
    x0 = rows_of(n, 16)
    for name, fn in INDEX_RESULTS.items():
        expected, got = _leaves(fn(x0)), _leaves(fn(aggregate(x0, spec)))
        assert len(expected) == len(got), name
        for i, (e, g) in enumerate(zip(expected, got)):
            assert_same(g, e, True, f"{name} [{i}]")


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n", ROWS)
def test_in_place_scans(spec: str, n: int, mode: str):
    x0 = rows_of(n, 17)
    for name, fn in {"cumsum_": lambda z: z.cumsum_(0), "cumprod_": lambda z: z.mul_(0.1).add_(1.0).cumprod_(0)}.items():
        z, az = x0.clone(), aggregate(x0, spec)
        fn(z)
        fn(az)
        assert is_aggregate(az)
        assert_same(az, z, mode == "fused", name)


@pytest.mark.parametrize("per_member", [False, True])
def test_row_sort_counts_the_merge(per_member: bool):
    x = aggregate(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0]), "cpu:4")  # 2 rows per member
    with per_member_execution() if per_member else torch.no_grad():
        reset_exchange()
        values, indices = x.sort()
        # members 1..3 send their 2 rows (4 B value + 8 B index) to member 0, which sends 2 rows to each
        assert exchange_counts() == {**{(d, 0): 24 for d in (1, 2, 3)}, **{(0, d): 24 for d in (1, 2, 3)}}
        assert torch.equal(to_plain(values), torch.arange(-2.0, 6.0)) and torch.equal(to_plain(indices), torch.arange(7, -1, -1))
        reset_exchange()
        x.cumsum(0)
        carries = exchange_counts()
        assert carries == {**{(d, 0): 4 for d in (1, 2, 3)}, **{(0, d): 4 for d in (1, 2, 3)}} or not per_member
