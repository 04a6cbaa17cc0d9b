"""Densification on the aggregate device: gsplat's DefaultStrategy rules over Gaussian-major statistics.

The distributed rasterizer reports per-Gaussian screen statistics as [N, C, ...] aggregates whose
rows live with their Gaussians, so the running statistics (grad2d, count, radii) are row-local sums
on the owners. Growth and pruning are gsplat's (same thresholds, same decisions); only `split` is
restated so that it runs on aggregate rows (gsplat's uses an einsum whose output puts the Gaussians
in the second dim, and a row `repeat`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from gsplat.strategy import DefaultStrategy
from gsplat.strategy.ops import _update_param_with_optimizer, duplicate
from gsplat.utils import normalized_quat_to_rotmat
from torch import Tensor


@dataclass
class MsStrategy(DefaultStrategy):
    """DefaultStrategy whose statistics come from the Gaussian-major info of
    `ms_splatfacto.backend.ops.render.rasterization` ("means2d" and "radii" are [N, C, ...])."""

    def _update_state(self, params, state: Dict[str, Any], info: Dict[str, Any], packed: bool = False) -> None:
        means2d = info[self.key_for_gradient]  # [N, C, 2]
        grads = means2d.absgrad if self.absgrad else means2d.grad
        to_ndc = torch.tensor(
            [info["width"] / 2.0 * info["n_cameras"], info["height"] / 2.0 * info["n_cameras"]],
            dtype=grads.dtype, device=grads.device,
        )
        visible = info["radii"] > 0  # [N, C]
        n = params["means"].shape[0]
        for key in ("grad2d", "count") + (("radii",) if self.refine_scale2d_stop_iter > 0 else ()):
            if state[key] is None:
                state[key] = params["means"].detach().new_zeros(n)
        state["grad2d"] += ((grads * to_ndc).norm(dim=-1) * visible).sum(dim=1)
        state["count"] += visible.sum(dim=1)
        if self.refine_scale2d_stop_iter > 0:
            largest = (info["radii"] * visible).amax(dim=1) / float(max(info["width"], info["height"]))
            state["radii"] = torch.maximum(state["radii"], largest)

    @torch.no_grad()
    def _grow_gs(self, params, optimizers, state: Dict[str, Any], step: int) -> Tuple[int, int]:
        grads = state["grad2d"] / state["count"].clamp_min(1)
        is_grad_high = grads > self.grow_grad2d
        is_small = torch.exp(params["scales"]).max(dim=-1).values <= self.grow_scale3d * state["scene_scale"]
        is_dupli = is_grad_high & is_small
        n_dupli = int(is_dupli.sum().item())
        is_split = is_grad_high & ~is_small
        if step < self.refine_scale2d_stop_iter:
            is_split |= state["radii"] > self.grow_scale2d
        n_split = int(is_split.sum().item())
        if n_dupli > 0:
            duplicate(params=params, optimizers=optimizers, state=state, mask=is_dupli)
        if n_split > 0:
            # duplicates were appended after the originals and are not split
            is_split = torch.cat([is_split, torch.zeros(n_dupli, dtype=torch.bool, device=is_split.device)])
            split(params, optimizers, state, is_split, self.revised_opacity)
        return n_dupli, n_split


@torch.no_grad()
def split(params, optimizers, state: Dict[str, Any], mask: Tensor, revised_opacity: bool = False) -> None:
    """gsplat's `split` with its layout: survivors, then every first child, then every second child;
    each child's mean moved by a sample of its parent's Gaussian (one randn(2, K, 3) draw, as gsplat)."""
    sel = torch.where(mask)[0]
    rest = torch.where(~mask)[0]
    scales = torch.exp(params["scales"][sel])  # [K, 3]
    rotmats = normalized_quat_to_rotmat(F.normalize(params["quats"][sel], dim=-1))  # [K, 3, 3]
    noise = torch.randn(2, sel.shape[0], 3, device=mask.device)  # [2, K, 3]
    offsets = [(rotmats * (scales * noise[b])[:, None, :]).sum(dim=-1) for b in range(2)]  # 2 x [K, 3]

    def param_fn(name: str, p: Tensor) -> Tensor:
        parents = p[sel]
        if name == "means":
            children = [parents + offsets[0], parents + offsets[1]]
        elif name == "scales":
            children = [torch.log(scales / 1.6)] * 2
        elif name == "opacities" and revised_opacity:
            children = [torch.logit(1.0 - torch.sqrt(1.0 - torch.sigmoid(parents)))] * 2
        else:
            children = [parents, parents]
        return torch.nn.Parameter(torch.cat([p[rest], *children]), requires_grad=p.requires_grad)

    def optimizer_fn(key: str, v: Tensor) -> Tensor:
        return torch.cat([v[rest], v.new_zeros((2 * sel.shape[0], *v.shape[1:]))])

    _update_param_with_optimizer(param_fn, optimizer_fn, params, optimizers)
    for key, v in state.items():
        if isinstance(v, Tensor):
            state[key] = torch.cat([v[rest], v[sel], v[sel]])
