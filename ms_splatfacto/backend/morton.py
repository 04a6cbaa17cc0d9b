"""Morton (Z-order) ordering of Gaussians, so each member's contiguous chunk of rows is a compact
region of space and its Gaussians touch fewer tiles and fewer remote pages.

Plain PyTorch on whatever tensors it is given (ordinary or aggregate): the strategy calls
`reorder_gaussians` after a refinement, and the permutation carries every parameter, its optimizer
state and any per-Gaussian strategy statistics together.
"""

from __future__ import annotations

from typing import Dict, MutableMapping

import torch
from torch import Tensor

BITS_PER_AXIS = 21
"""21 bits per axis fill a 63-bit key, which int64 holds without touching the sign bit."""


def spread_bits(v: Tensor) -> Tensor:
    """Insert two zero bits between each of the low 21 bits of `v` (int64): b2 b1 b0 -> b2 0 0 b1 0 0 b0."""
    v = v & 0x1FFFFF
    v = (v | (v << 32)) & 0x1F00000000FFFF
    v = (v | (v << 16)) & 0x1F0000FF0000FF
    v = (v | (v << 8)) & 0x100F00F00F00F00F
    v = (v | (v << 4)) & 0x10C30C30C30C30C3
    v = (v | (v << 2)) & 0x1249249249249249
    return v


def morton_codes(positions: Tensor, among: Tensor | None = None) -> Tensor:
    """Z-order keys of points quantised on a 2^21 grid over the bounding box of the finite points
    (of those where `among` ([N] bool) holds, when given: the rows a refinement keeps).

    positions: [N, 3] -> [N] int64 in [0, 2^63), x in the lowest interleaved bit; 0 for non-finite points.
    """
    assert positions.dim() == 2 and positions.shape[1] == 3, f"positions must be [N, 3], got {tuple(positions.shape)}"
    finite = torch.isfinite(positions).all(dim=1)
    points = torch.where(finite[:, None], positions, torch.zeros_like(positions)).double()
    if points.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=positions.device)
    boxed = finite if among is None else finite & among
    any_boxed = bool(boxed.any())
    low = points[boxed].amin(dim=0) if any_boxed else points.new_zeros(3)
    extent = (points[boxed].amax(dim=0) - low).clamp(min=1e-12) if any_boxed else points.new_ones(3)
    top = (1 << BITS_PER_AXIS) - 1
    cells = ((points - low) / extent * top).round().clamp(0, top).long()
    codes = spread_bits(cells[:, 0]) | (spread_bits(cells[:, 1]) << 1) | (spread_bits(cells[:, 2]) << 2)
    return torch.where(finite, codes, torch.zeros_like(codes))


def morton_order(positions: Tensor, keep: Tensor | None = None) -> Tensor:
    """Row indices that sort `positions` ([N, 3]) along the Z-order curve (stable), with non-finite
    points (diverged Gaussians, soon pruned) last: a permutation [N], or, given `keep` ([N] bool), the
    kept rows only (pruning and re-ordering in one index)."""
    order = torch.sort(morton_codes(positions, keep), stable=True).indices
    finite = torch.isfinite(positions).all(dim=1)[order]
    if keep is None:
        return torch.cat([order[finite], order[~finite]])
    kept = keep[order]
    return torch.cat([order[finite & kept], order[~finite & kept]])


@torch.no_grad()
def reorder_gaussians(
    params: MutableMapping[str, torch.nn.Parameter],
    optimizers: Dict[str, torch.optim.Optimizer],
    order: Tensor,  # [M] row indices: a permutation, or the kept rows in their new order
    state: MutableMapping[str, object] | None = None,
) -> None:
    """Replace every Gaussian parameter, its optimizer's per-row state and the strategy's per-Gaussian
    statistics by their rows `order` (as gsplat's strategy ops do): rows left out are dropped, and on
    the aggregate device the result is evenly re-striped."""
    n = next(iter(params.values())).shape[0]
    for name, param in list(params.items()):
        assert param.shape[0] == n, f"{name} has {param.shape[0]} rows, {next(iter(params))} has {n}"
        new_param = torch.nn.Parameter(param[order], requires_grad=param.requires_grad)
        optimizer = optimizers.get(name)
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["params"] = [new_param if p is param else p for p in group["params"]]
            old_state = optimizer.state.pop(param, None)
            if old_state is not None:
                optimizer.state[new_param] = {
                    key: value[order] if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n else value
                    for key, value in old_state.items()
                }
        params[name] = new_param
    for key, value in (state or {}).items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
            state[key] = value[order]
