"""Partition-aware densification: gsplat's decisions, children beside their parents, every member an even
share of Morton-ordered rows after each refinement, the Gaussian and memory budgets, no fallbacks."""

from __future__ import annotations

import contextlib
import io
import logging
import math

import pytest
import torch
import tyro
from gsplat.strategy import DefaultStrategy

from ms_splatfacto.backend.aggregate import aggregate, fallback_counts, is_aggregate, parameter, reset_fallback_counts, to_plain
from ms_splatfacto.backend.morton import morton_codes
from ms_splatfacto.model import MsSplatfactoModelConfig
from ms_splatfacto.strategy import (
    MsStrategy,
    bytes_per_gaussian,
    gaussian_floats,
    grow,
    member_free_bytes,
    refinement_bytes,
)

N = 2000
THRESHOLDS = dict(
    prune_opa=0.1, grow_grad2d=2e-4, grow_scale3d=0.01, grow_scale2d=0.05, prune_scale3d=0.1, prune_scale2d=0.15,
    refine_scale2d_stop_iter=4000, refine_start_iter=1, refine_stop_iter=15000, reset_every=30, refine_every=10,
    pause_refine_after_reset=0, absgrad=False, revised_opacity=False, verbose=False,
)
STEP = 40  # after the first opacity reset (world-size pruning on) and before refine_scale2d_stop_iter


def scene(seed: int, n: int = N, sh_degree: int = 1):
    """Gaussians in a unit cube with an ID in features_dc[:, 0] (children inherit it), a mix of small
    (duplicated) and large (split) ones, some faint (pruned); statistics where the corner x, y < 0.3
    gets nearly all the gradient, a few large on screen."""
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(n, 3, generator=g)
    scales = torch.log(torch.where(torch.rand(n, 1, generator=g) < 0.5, 0.005, 0.03) * (0.5 + torch.rand(n, 3, generator=g)))
    features_dc = torch.rand(n, 3, generator=g)
    features_dc[:, 0] = torch.arange(n, dtype=torch.float32)
    params = {
        "means": means,
        "scales": scales,
        "quats": torch.randn(n, 4, generator=g),
        "features_dc": features_dc,
        "features_rest": torch.randn(n, (sh_degree + 1) ** 2 - 1, 3, generator=g),
        "opacities": torch.logit(0.02 + 0.96 * torch.rand(n, 1, generator=g)),
    }
    hot = (means[:, 0] < 0.3) & (means[:, 1] < 0.3)
    state = {
        "grad2d": torch.where(hot, 1e-3, 1e-5) * (1 + torch.rand(n, generator=g)),
        "count": torch.randint(1, 4, (n,), generator=g).float(),
        "radii": torch.where(torch.rand(n, generator=g) < 0.01, 0.08, 0.01),
    }
    grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
    return params, state, grads


def trainable(params, state, grads, spec: str | None):
    """Parameters (aggregate on `spec`, ordinary when None) with Adam moments from one step on `grads`."""
    rows = (lambda t: aggregate(t, spec)) if spec else torch.clone
    params = {k: torch.nn.Parameter(rows(v)) for k, v in params.items()}
    optimizers = {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}
    for k, p in params.items():
        p.grad = rows(grads[k])
        optimizers[k].step()
        p.grad = None
    return params, optimizers, {**{k: rows(v) for k, v in state.items()}, "scene_scale": 1.0}


def refine(strategy, params, optimizers, state, step: int = STEP):
    n_dupli, n_split = strategy._grow_gs(params, optimizers, state, step)
    n_prune = strategy._prune_gs(params, optimizers, state, step)
    return n_dupli, n_split, n_prune


def rows_of(params, optimizers, state) -> torch.Tensor:
    """Every per-Gaussian number as one plain table, means first, then the other parameters, Adam
    moments and statistics; rows sorted by (ID, mean x, Adam's first moment of x), which makes the
    table independent of the row order."""
    columns = []
    for k, p in params.items():
        columns.append(to_plain(p.detach()).reshape(p.shape[0], -1))
        columns += [to_plain(optimizers[k].state[p][m]).reshape(p.shape[0], -1) for m in ("exp_avg", "exp_avg_sq")]
    columns += [to_plain(state[k])[:, None] for k in ("grad2d", "count", "radii")]
    table = torch.cat(columns, dim=1)
    ids = to_plain(params["features_dc"].detach())[:, 0]
    order = torch.arange(table.shape[0])
    for key in (table[:, 3], table[:, 0], ids):  # least significant first: stable sorts
        order = order[torch.sort(key[order], stable=True).indices]
    return table[order]


@pytest.mark.parametrize("spec", ["cpu", "cpu:3"])
def test_decisions_equal_gsplat_default_strategy(spec: str):
    base = scene(0)
    ours, ours_opt, ours_state = trainable(*base, spec)
    ref, ref_opt, ref_state = trainable(*base, None)
    torch.manual_seed(5)
    counts_ours = refine(MsStrategy(**THRESHOLDS), ours, ours_opt, ours_state)
    torch.manual_seed(5)
    counts_ref = refine(DefaultStrategy(**THRESHOLDS), ref, ref_opt, ref_state)
    assert counts_ours == counts_ref
    n_dupli, n_split, n_prune = counts_ref
    assert n_dupli > 50 and n_split > 50 and n_prune > 50, counts_ref
    mine, theirs = rows_of(ours, ours_opt, ours_state), rows_of(ref, ref_opt, ref_state)
    assert mine.shape == theirs.shape
    # split children's means: gsplat's einsum and our sum may round the last bit differently
    torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)
    assert torch.equal(mine[:, 3:], theirs[:, 3:])


def test_children_sit_beside_their_parents():
    params, state, grads = scene(1)
    agg, optimizers, agg_state = trainable(params, state, grads, "cpu:3")
    strategy = MsStrategy(**THRESHOLDS)
    grads2d = agg_state["grad2d"] / agg_state["count"].clamp_min(1)
    is_dupli = (grads2d > 2e-4) & (torch.exp(agg["scales"]).max(dim=-1).values <= 0.01)
    is_split = (grads2d > 2e-4) & ~is_dupli | (agg_state["radii"] > 0.05)
    grow(agg, optimizers, agg_state, is_dupli, is_split, strategy.revised_opacity)
    ids = to_plain(agg["features_dc"].detach())[:, 0].round()
    assert torch.equal(ids, torch.sort(ids).values), "each parent's rows follow each other, in parent order"
    expected = 1 + to_plain(is_dupli).long() + to_plain(is_split).long()
    assert torch.equal(torch.bincount(ids.long(), minlength=N), expected)
    new = to_plain(optimizers["means"].state[agg["means"]]["exp_avg"]).abs().sum(dim=1) == 0
    assert int(new.sum()) == int(is_dupli.sum()) + 2 * int(is_split.sum())  # copies and children start Adam afresh


@pytest.mark.parametrize("spec", ["cpu:3", "cpu:4"])
def test_refinements_leave_even_morton_ordered_members(spec: str):
    """One corner gets nearly all the gradient, so growth is uneven in space; after each refinement every
    tensor is striped evenly and the concatenated chunks follow the Z-order curve. No fallback."""
    agg, optimizers, state = trainable(*scene(2), spec)
    strategy = MsStrategy(**THRESHOLDS)
    reset_fallback_counts()
    torch.manual_seed(0)
    sizes = [N]
    for round_ in range(3):
        refine(strategy, agg, optimizers, state)
        sizes.append(agg["means"].shape[0])
        tensors = [*agg.values(), *(v for o in optimizers.values() for s in o.state.values() for v in s.values() if v.dim()),
                   *(state[k] for k in ("grad2d", "count", "radii"))]
        for t in tensors:
            assert is_aggregate(t) and t.shape[0] == sizes[-1]
            counts = t._layout.counts
            assert len(counts) == int(spec[-1]) and max(counts) - min(counts) <= 1, counts
        codes = morton_codes(to_plain(agg["means"].detach()))
        assert bool((codes[1:] >= codes[:-1]).all()), f"Morton order broken after refinement {round_}"
        for k, p in agg.items():
            assert optimizers[k].param_groups[0]["params"][0] is p
    assert sizes[-1] > 1.3 * N, sizes
    assert fallback_counts() == {}


def test_max_gaussians_keeps_the_highest_gradient_and_logs_once(caplog):
    params, state, grads = scene(3)
    state["radii"].zero_()  # no screen-size splits: every candidate adds one row
    agg, optimizers, agg_state = trainable(params, state, grads, "cpu:3")
    ranking = agg_state["grad2d"] / agg_state["count"]
    candidates = to_plain(ranking) > 2e-4
    top = torch.sort(torch.where(candidates, to_plain(ranking), -math.inf), descending=True, stable=True).indices[:25]
    strategy = MsStrategy(**{**THRESHOLDS, "prune_opa": 0.0, "prune_scale3d": 1e9}, max_gaussians=N + 25)
    reset_fallback_counts()
    with caplog.at_level(logging.WARNING, logger="ms_splatfacto.strategy"):
        n_dupli, n_split, _ = refine(strategy, agg, optimizers, agg_state)
        assert n_dupli + n_split == 25 and agg["means"].shape[0] == N + 25
        ids = to_plain(agg["features_dc"].detach())[:, 0].round().long()
        grown = torch.nonzero(torch.bincount(ids, minlength=N) > 1).squeeze(1)
        assert set(grown.tolist()) == set(top.tolist())
        refine(strategy, agg, optimizers, agg_state)  # at the budget: no growth, no second line
        assert agg["means"].shape[0] == N + 25
    assert fallback_counts() == {}  # the ranking (sort, cumsum, row writes) stays on the members too
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and f"max_gaussians={N + 25} reached ({N} Gaussians" in lines[0], lines


def test_memory_budget_stops_growth_before_allocating(caplog):
    params, state, grads = scene(4)
    state["radii"].zero_()  # every candidate adds one row
    agg, optimizers, agg_state = trainable(params, state, grads, "cpu:3")
    floats = sum(math.prod(p.shape[1:]) for p in agg.values())
    budget = refinement_bytes(N, 30, 3, floats)
    fits = max(a for a in range(200) if refinement_bytes(N, a, 3, floats) <= budget)
    strategy = MsStrategy(**{**THRESHOLDS, "prune_opa": 0.0, "prune_scale3d": 1e9}, memory_budget_bytes=budget)
    with caplog.at_level(logging.WARNING, logger="ms_splatfacto.strategy"):
        n_dupli, n_split, _ = refine(strategy, agg, optimizers, agg_state)
    assert n_dupli + n_split == fits and 30 <= fits < 100
    (line,) = [r.getMessage() for r in caplog.records]
    assert f"({-(-N // 3)} per member" in line and f"member 0 has {budget} B free" in line and " B per member" in line

    tiny = MsStrategy(**THRESHOLDS, memory_budget_bytes=1000)
    agg, optimizers, agg_state = trainable(params, state, grads, "cpu:3")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ms_splatfacto.strategy"):
        assert tiny._grow_gs(agg, optimizers, agg_state, STEP) == (0, 0)
    assert len(caplog.records) == 1 and "growing the 0 highest-gradient" in caplog.records[0].getMessage()


def test_capacity_arithmetic_and_detected_memory():
    assert gaussian_floats(3) == 59 and bytes_per_gaussian(59) == 944 + 12
    assert refinement_bytes(10, 0, 2, 59) == 5 * (59 * 12 + 12)
    free = member_free_bytes(parameter(torch.zeros(4, 3), "cpu:4").members)
    assert len(free) == 4 and len(set(free)) == 1 and free[0] > 0


def test_budget_options_and_refinement_thresholds_show_in_help():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        tyro.cli(MsSplatfactoModelConfig, args=["--help"])
    text = " ".join(out.getvalue().split())
    for option in ("--max-gaussians", "--memory-budget-bytes", "--densify-grad-thresh", "--densify-size-thresh",
                   "--cull-alpha-thresh", "--cull-scale-thresh", "--split-screen-size", "--cull-screen-size",
                   "--refine-every", "--reset-alpha-every", "--stop-split-at", "--warmup-length"):
        assert option in text, option
    assert "keeping the highest-gradient candidates" in text
