"""Morton ordering: correct keys, compact chunks, and a permutation that carries optimizer state."""

from __future__ import annotations

import pytest
import torch

from ms_splatfacto.backend.aggregate import fallback_counts, parameter, reset_fallback_counts, to_plain
from ms_splatfacto.backend.morton import BITS_PER_AXIS, morton_codes, morton_order, reorder_gaussians, spread_bits


def interleave_reference(x: int, y: int, z: int) -> int:
    """Bit-by-bit interleave: bit b of x, y, z goes to bit 3b, 3b+1, 3b+2."""
    code = 0
    for b in range(BITS_PER_AXIS):
        code |= ((x >> b) & 1) << (3 * b) | ((y >> b) & 1) << (3 * b + 1) | ((z >> b) & 1) << (3 * b + 2)
    return code


def test_codes_interleave_the_quantised_coordinates():
    g = torch.Generator().manual_seed(0)
    cells = torch.randint(0, 1 << BITS_PER_AXIS, (200, 3), generator=g)
    cells[0], cells[1] = 0, (1 << BITS_PER_AXIS) - 1  # the grid's corners pin the bounding box
    codes = morton_codes(cells.double())
    expected = [interleave_reference(*map(int, row)) for row in cells]
    assert codes.tolist() == expected
    assert spread_bits(torch.tensor([0b111])).item() == 0b1001001
    assert codes.min() >= 0  # 63 bits: the far corner does not overflow into the sign bit


def test_non_finite_points_sort_last_and_empty_input_works():
    points = torch.tensor([[1.0, 0, 0], [float("nan"), 0, 0], [0.0, 0, 0], [float("inf"), 1, 1]])
    assert morton_order(points).tolist() == [2, 0, 1, 3]
    assert morton_order(torch.zeros(0, 3)).numel() == 0


def chunk_spread(points: torch.Tensor, members: int) -> float:
    """Mean squared distance of points to their chunk's centroid, over even contiguous chunks."""
    return float(torch.cat([((c - c.mean(0)) ** 2).sum(1) for c in points.chunk(members)]).mean())


@pytest.mark.parametrize("members, bound", [(2, 0.8), (4, 0.55), (8, 0.3)])
def test_morton_order_makes_member_chunks_compact(members: int, bound: float):
    """Z-order halves the axes in turn, so uniform points' chunks shrink to 3/4, 1/2, 1/4 of the spread."""
    g = torch.Generator().manual_seed(1)
    points = torch.rand(20_000, 3, generator=g)
    random_spread = chunk_spread(points[torch.randperm(20_000, generator=g)], members)
    morton_spread = chunk_spread(points[morton_order(points)], members)
    assert abs(random_spread - 0.25) < 0.01  # a random chunk spans the whole unit cube (3 x 1/12)
    assert morton_spread < bound * random_spread


def adam_model(rows: torch.Tensor, make=torch.nn.Parameter):
    params = {"means": make(rows[:, :3].clone()), "scales": make(rows[:, 3:].clone())}
    optimizers = {name: torch.optim.Adam([p], lr=0.01) for name, p in params.items()}
    return params, optimizers


def step(params, optimizers, target):
    loss = sum(((p - target[name]) ** 2).sum() for name, p in params.items())
    for opt in optimizers.values():
        opt.zero_grad()
    loss.backward()
    for opt in optimizers.values():
        opt.step()


def test_reorder_carries_parameters_adam_state_and_statistics():
    g = torch.Generator().manual_seed(2)
    rows, goal = torch.randn(500, 6, generator=g), torch.randn(500, 6, generator=g)
    target = {"means": goal[:, :3], "scales": goal[:, 3:]}
    reordered, reordered_opt = adam_model(rows)
    straight, straight_opt = adam_model(rows)
    for _ in range(3):
        step(reordered, reordered_opt, target)
        step(straight, straight_opt, target)

    order = morton_order(reordered["means"].detach())
    stats = {"grad2d": torch.arange(500.0), "count": torch.ones(500), "scene_scale": 1.0}
    reorder_gaussians(reordered, reordered_opt, order, stats)
    assert torch.equal(stats["grad2d"], torch.arange(500.0)[order]) and stats["scene_scale"] == 1.0
    assert reordered_opt["means"].param_groups[0]["params"][0] is reordered["means"]

    target_reordered = {k: v[order] for k, v in target.items()}
    for _ in range(3):
        step(reordered, reordered_opt, target_reordered)
        step(straight, straight_opt, target)
    for name in reordered:  # Adam is elementwise: permuting mid-run changes nothing but the order
        assert torch.equal(reordered[name].detach(), straight[name].detach()[order])


def test_reorder_on_the_aggregate_device_takes_no_fallback():
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(1001, 6, generator=g)
    plain, plain_opt = adam_model(rows)
    aggregated, aggregated_opt = adam_model(rows, make=lambda t: parameter(t, "cpu:4"))
    target = {"means": torch.zeros(1001, 3), "scales": torch.zeros(1001, 3)}
    step(plain, plain_opt, target)
    step(aggregated, aggregated_opt, target)
    order = morton_order(plain["means"].detach())
    reset_fallback_counts()
    reorder_gaussians(plain, plain_opt, order)
    reorder_gaussians(aggregated, aggregated_opt, order)
    assert fallback_counts() == {}
    for name in plain:
        assert torch.equal(to_plain(aggregated[name].detach()), plain[name].detach())
        moment = aggregated_opt[name].state[aggregated[name]]["exp_avg"]
        assert torch.equal(to_plain(moment), plain_opt[name].state[plain[name]]["exp_avg"])
