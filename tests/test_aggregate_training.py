"""Training on aggregate parameters: Adam (foreach and for-loop) matches ordinary tensors step for
step, checkpoints round-trip across member counts, gsplat's densification ops work unchanged and keep
the stripes even, `module.to` keeps aggregates; none of it takes the fallback."""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch

from ms_splatfacto.backend.aggregate import (
    aggregate,
    fallback_counts,
    is_aggregate,
    parameter,
    per_member_execution,
    reset_fallback_counts,
    restripe_optimizer_state,
    to_plain,
)


@pytest.fixture(autouse=True)
def no_fallback():
    reset_fallback_counts()
    yield
    assert fallback_counts() == {}


def _loss(p: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return ((torch.sigmoid(p) - target) ** 2 * scale).sum() + 0.01 * p.abs().mean()


def _train(params, target, scale, foreach: bool, steps: int):
    opt = torch.optim.Adam([{"params": [params[0]], "lr": 0.05}, {"params": [params[1]], "lr": 0.01}], foreach=foreach)
    for _ in range(steps):
        opt.zero_grad()
        (_loss(params[0], target, scale) + (params[1] ** 2).sum()).backward()
        opt.step()
    return opt


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("spec,fused", [("cpu:3", True), ("cpu:7", True), ("cpu:7", False)])
def test_adam_200_steps_match_ordinary(foreach: bool, spec: str, fused: bool):
    g = torch.Generator().manual_seed(0)
    init, target, scale = torch.randn(500, 3, generator=g), torch.rand(500, 3, generator=g), torch.rand(500, 1, generator=g)
    other = torch.randn(4, generator=g)
    plain = [torch.nn.Parameter(init.clone()), torch.nn.Parameter(other.clone())]
    _train(plain, target, scale, foreach, 200)
    with per_member_execution() if not fused else contextlib.nullcontext():
        agg = [parameter(init, spec), torch.nn.Parameter(other.clone())]
        opt = _train(agg, target, scale, foreach, 200)
    assert is_aggregate(agg[0]) and isinstance(agg[0], torch.nn.Parameter) and not is_aggregate(agg[1])
    assert is_aggregate(opt.state[agg[0]]["exp_avg"]) and is_aggregate(opt.state[agg[0]]["exp_avg_sq"])
    if fused:
        assert torch.equal(to_plain(agg[0].detach()), plain[0].detach())
    else:  # sigmoid's CPU vector tail rounds per chunk (see test_aggregate_ops.VECTOR_MATH)
        torch.testing.assert_close(to_plain(agg[0].detach()), plain[0].detach())
    assert torch.equal(agg[1].detach(), plain[1].detach())


class Gaussians(torch.nn.Module):
    def __init__(self, means: torch.Tensor, opacities: torch.Tensor, spec: str):
        super().__init__()
        self.means = parameter(means, spec)
        self.opacities = parameter(opacities, spec)


def test_checkpoint_round_trip_into_other_member_counts(tmp_path):
    g = torch.Generator().manual_seed(1)
    means, opac, target = torch.randn(101, 3, generator=g), torch.randn(101, 1, generator=g), torch.randn(101, 3, generator=g)
    model = Gaussians(means, opac, "cpu:4")
    opt = torch.optim.Adam(model.parameters(), lr=0.1)

    def step(m, o):
        o.zero_grad()
        (((m.means - target) ** 2).sum() + m.opacities.sigmoid().sum()).backward()
        o.step()

    step(model, opt)
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert not is_aggregate(loaded["model"]["means"])
    assert torch.equal(loaded["model"]["means"], to_plain(model.means.detach()))

    reference = Gaussians(means, opac, "cpu:1")
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.1)
    reference.load_state_dict(loaded["model"])
    ref_opt.load_state_dict(copy.deepcopy(loaded["optim"]))  # loading shares the loaded tensors
    for spec in ["cpu:3", "cpu:7", "cpu"]:
        other = Gaussians(torch.zeros(101, 3), torch.zeros(101, 1), spec)
        other.load_state_dict(loaded["model"])
        assert is_aggregate(other.means) and str(other.means.members) == spec
        assert torch.equal(to_plain(other.means.detach()), loaded["model"]["means"])
        other_opt = torch.optim.Adam(other.parameters(), lr=0.1)
        other_opt.load_state_dict(copy.deepcopy(loaded["optim"]))
        restripe_optimizer_state(other_opt)
        assert is_aggregate(other_opt.state[other.means]["exp_avg"])
        step(other, other_opt)
        if spec == "cpu:3":
            step(reference, ref_opt)
        assert torch.equal(to_plain(other.means.detach()), to_plain(reference.means.detach()))
    buffer = io.BytesIO()
    torch.save(aggregate(means, "cpu:7"), buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=True), means)


def test_module_to_keeps_aggregate_parameters():
    model = Gaussians(torch.randn(10, 3), torch.randn(10, 1), "cpu:4")
    model.to("cpu")
    assert is_aggregate(model.means) and isinstance(model.means, torch.nn.Parameter)
    model.to(torch.float64)
    assert is_aggregate(model.means) and model.means.dtype == torch.float64 and model.means._layout.counts == (3, 3, 2, 2)
    assert isinstance(model.means, torch.nn.Parameter)


def test_gsplat_densification_ops_keep_even_stripes():
    ops = pytest.importorskip("gsplat.strategy.ops")
    g = torch.Generator().manual_seed(2)
    n, spec = 1000, "cpu:7"
    init = {"means": torch.randn(n, 3, generator=g), "scales": torch.randn(n, 3, generator=g), "opacities": torch.randn(n, generator=g)}
    plain = torch.nn.ParameterDict({k: torch.nn.Parameter(v.clone()) for k, v in init.items()})
    agg = torch.nn.ParameterDict({k: parameter(v, spec) for k, v in init.items()})
    plain_opts = {k: torch.optim.Adam([plain[k]], lr=0.01) for k in init}
    agg_opts = {k: torch.optim.Adam([agg[k]], lr=0.01) for k in init}
    plain_state = {"grad2d": torch.rand(n, generator=g), "count": torch.ones(n)}
    agg_state = {k: aggregate(v, spec) for k, v in plain_state.items()}

    def train(params, opts):
        for opt in opts.values():
            opt.zero_grad()
        sum((p**2).sum() for p in params.values()).backward()
        for opt in opts.values():
            opt.step()

    for params, opts, state in [(plain, plain_opts, plain_state), (agg, agg_opts, agg_state)]:
        train(params, opts)
        ops.duplicate(params, opts, state, state["grad2d"] > 0.7)
        train(params, opts)
        ops.remove(params, opts, state, torch.sigmoid(params["opacities"]) < 0.3)
        train(params, opts)
        ops.duplicate(params, opts, state, params["scales"].amax(dim=-1) > 1.0)
        train(params, opts)
    for k in init:
        p = agg[k]
        assert is_aggregate(p) and isinstance(p, torch.nn.Parameter)
        assert agg_opts[k].param_groups[0]["params"][0] is p and is_aggregate(agg_opts[k].state[p]["exp_avg"])
        assert torch.equal(to_plain(p.detach()), plain[k].detach()), k
        assert torch.equal(to_plain(agg_opts[k].state[p]["exp_avg_sq"]), plain_opts[k].state[plain[k]]["exp_avg_sq"])
        counts = p._layout.counts
        share = p.shape[0] / len(counts)
        assert p.shape[0] != n and all(abs(c - share) < 1 for c in counts), counts
    for k in plain_state:
        assert torch.equal(to_plain(agg_state[k]), plain_state[k])
