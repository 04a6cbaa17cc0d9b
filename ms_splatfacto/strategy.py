"""Partition-aware densification: gsplat's DefaultStrategy rules on the aggregate device.

The distributed rasterizer reports per-Gaussian screen statistics as [N, C, ...] aggregates whose
rows live with their Gaussians, so the running statistics (grad2d, count, radii) are row-local sums
on the owners. The decisions are gsplat's (same thresholds, same Gaussians duplicated, split with the
same noise, pruned); what changes is where the rows go:
- growth is one row gather per tensor with each child placed right after its parent, so it is made on
  its parent's member (gsplat appends children at the global end, i.e. on the last member);
- pruning, the Morton (Z-order) re-order and the even re-stripe are one more gather, so after every
  refinement each member holds an even share of the rows and its chunk is a compact region of space;
- growth is capped by a total budget (`max_gaussians`) and by each member's free memory, checked
  before anything is allocated, keeping the highest-gradient candidates.
Everything is plain PyTorch on the aggregate tensors (index bookkeeping on ordinary index tensors).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from gsplat.strategy import DefaultStrategy
from gsplat.strategy.ops import _update_param_with_optimizer
from gsplat.utils import normalized_quat_to_rotmat
from torch import Tensor

from ms_splatfacto.backend.aggregate import Members, is_aggregate
from ms_splatfacto.backend.aggregate.redistribute import persistent_rows
from ms_splatfacto.backend.aggregate.storage import is_persistent
from ms_splatfacto.backend.morton import morton_order, reorder_gaussians

log = logging.getLogger(__name__)

FLOAT_BYTES = 4
PERSISTENT_COPIES = 4
"""float32 copies of every parameter a Gaussian keeps while training: the value, its gradient, and
Adam's two moments."""
STATS_BYTES = 3 * FLOAT_BYTES
"""The strategy's running statistics per Gaussian: grad2d, count, radii (float32)."""
TRANSIENT_COPIES = 3
"""Copies a refinement's gathers hold beside the old tensors: the new value and two new moments."""


def gaussian_floats(sh_degree: int) -> int:
    """Floats of one Gaussian: mean 3, scale 3, quaternion 4, opacity 1, 3 colour channels per SH
    coefficient ((d + 1)^2 of them); 59 at SH degree 3."""
    return 3 + 3 + 4 + 1 + 3 * (sh_degree + 1) ** 2


def bytes_per_gaussian(floats: int) -> int:
    """Bytes a Gaussian of `floats` parameters holds while training: parameters, gradients and two
    Adam moments (59 floats x 4 B x 4 = 944 B at SH degree 3), plus the strategy's statistics (12 B).
    The capacity planner's unit: bytes_per_gaussian(gaussian_floats(3)) == 956."""
    return floats * FLOAT_BYTES * PERSISTENT_COPIES + STATS_BYTES


def refinement_bytes(rows: int, added: int, n_members: int, floats: int) -> int:
    """Bytes one member needs free for a refinement that adds `added` rows to `rows` striped evenly
    over `n_members`: its share of the new rows in full, plus the gathers' new copies of values and
    moments of its share of all rows, which exist beside the old tensors until those are dropped
    (counted as if every tensor's copy were alive at once, an upper bound)."""
    share = -(-added // n_members)
    after = -(-(rows + added) // n_members)
    return share * bytes_per_gaussian(floats) + after * (floats * FLOAT_BYTES * TRANSIENT_COPIES + STATS_BYTES)


def available_ram() -> int:
    """Bytes of RAM the OS can hand out without swapping (psutil where installed, else /proc/meminfo)."""
    try:
        import psutil
    except ImportError:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("Cannot tell the available RAM: no psutil and no MemAvailable in /proc/meminfo")
    return int(psutil.virtual_memory().available)


def member_free_bytes(members: Optional[Members]) -> List[int]:
    """Free bytes per member: its device's free memory (for CUDA including what PyTorch's caching
    allocator holds unused; for the CPU the available RAM) divided among the members sharing it."""
    devices = list(members.devices) if members is not None else [torch.device("cpu")]
    sharing = Counter(devices)
    free = []
    for device in devices:
        if device.type == "cuda":
            device_free, _ = torch.cuda.mem_get_info(device)
            device_free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        else:
            device_free = available_ram()
        free.append(device_free // sharing[device])
    return free


@dataclass
class MsStrategy(DefaultStrategy):
    """DefaultStrategy whose statistics come from the Gaussian-major info of
    `ms_splatfacto.backend.ops.render.rasterization` ("means2d" and "radii" are [N, C, ...]), whose
    children are made on their parents' members, and which re-orders (Morton) and re-stripes after
    each refinement within the Gaussian and memory budgets."""

    max_gaussians: int = 0
    """Growth stops at this many Gaussians in total (0: no limit)."""
    memory_budget_bytes: int = 0
    """Bytes each member may use for a refinement (0: each member's free memory, detected)."""
    _budgets_hit: Set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    def step_post_backward(self, params, optimizers, state: Dict[str, Any], step: int, info: Dict[str, Any], packed: bool = False):
        """gsplat's, then whatever it made of op results (the opacity reset's clamp) kept as model
        state, so the managed mode holds every parameter, moment and statistic in managed memory."""
        super().step_post_backward(params, optimizers, state, step, info, packed)
        keep_state_persistent(params, optimizers, state)

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
        """gsplat's candidates (high gradient: duplicate the small, split the large or, before
        refine_scale2d_stop_iter, those large on screen), cut to the budgets, grown in one gather."""
        grads = state["grad2d"] / state["count"].clamp_min(1)
        is_grad_high = grads > self.grow_grad2d
        is_small = torch.exp(params["scales"]).max(dim=-1).values <= self.grow_scale3d * state["scene_scale"]
        is_dupli = is_grad_high & is_small
        is_split = is_grad_high & ~is_small
        if step < self.refine_scale2d_stop_iter:
            is_split |= state["radii"] > self.grow_scale2d
        is_dupli, is_split = self._within_budgets(params, grads, is_dupli, is_split, step)
        n_dupli, n_split = int(is_dupli.sum().item()), int(is_split.sum().item())
        if n_dupli + n_split > 0:
            grow(params, optimizers, state, is_dupli, is_split, self.revised_opacity)
        return n_dupli, n_split

    @torch.no_grad()
    def _prune_gs(self, params, optimizers, state: Dict[str, Any], step: int) -> int:
        """gsplat's pruning (low opacity; after the first opacity reset also too large in the world or,
        before refine_scale2d_stop_iter, on screen), in the same gather as the Morton re-order and the
        even re-stripe of the survivors, which runs after every refinement."""
        is_prune = torch.sigmoid(params["opacities"].flatten()) < self.prune_opa
        if step > self.reset_every:
            is_too_big = torch.exp(params["scales"]).max(dim=-1).values > self.prune_scale3d * state["scene_scale"]
            if step < self.refine_scale2d_stop_iter:
                is_too_big |= state["radii"] > self.prune_scale2d
            is_prune |= is_too_big
        n_prune = int(is_prune.sum().item())
        reorder_gaussians(params, optimizers, morton_order(params["means"].detach(), keep=~is_prune), state)
        return n_prune

    def _within_budgets(self, params, grads: Tensor, is_dupli: Tensor, is_split: Tensor, step: int) -> Tuple[Tensor, Tensor]:
        """The candidates cut to what `max_gaussians` and the members' memory allow, highest
        gradient first (a Gaussian both duplicated and split adds two rows); one log line per budget
        the first time it stops growth."""
        growth = int(is_dupli.sum().item()) + int(is_split.sum().item())
        if growth == 0:
            return is_dupli, is_split
        rows = params["means"].shape[0]
        allowed = growth
        if self.max_gaussians > 0 and rows + growth > self.max_gaussians:
            allowed = max(self.max_gaussians - rows, 0)
            self._log_once("max_gaussians", f"Growth stopped at step {step}: max_gaussians={self.max_gaussians} reached "
                           f"({rows} Gaussians, {growth} more wanted); growing the {allowed} highest-gradient.")
        allowed = min(allowed, self._memory_allowance(params, rows, allowed, step))
        if allowed == growth:
            return is_dupli, is_split
        weight = is_dupli.long() + is_split.long()  # rows each Gaussian adds
        ranked = torch.sort(torch.where(weight > 0, grads, -math.inf), descending=True, stable=True).indices
        taken = int((torch.cumsum(weight[ranked], dim=0) <= allowed).sum().item())
        chosen = torch.zeros_like(is_dupli)
        chosen[ranked[:taken]] = True
        return is_dupli & chosen, is_split & chosen

    def _memory_allowance(self, params, rows: int, growth: int, step: int) -> int:
        """How many of `growth` new rows the tightest member's memory takes (all of them when it fits)."""
        if growth == 0:
            return 0
        members = params["means"].members if is_aggregate(params["means"]) else None
        n_members = len(members) if members is not None else 1
        floats = sum(math.prod(p.shape[1:]) for p in params.values())
        free = [self.memory_budget_bytes] * n_members if self.memory_budget_bytes > 0 else member_free_bytes(members)
        tight = min(range(n_members), key=lambda d: free[d])
        need = refinement_bytes(rows, growth, n_members, floats)
        if need <= free[tight]:
            return growth
        low, high = 0, growth  # the largest growth that fits: refinement_bytes grows with it
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if refinement_bytes(rows, mid, n_members, floats) <= free[tight] else (low, mid - 1)
        self._log_once("memory", f"Growth stopped at step {step}: {growth} new Gaussians on {n_members} members "
                       f"({-(-rows // n_members)} per member, {-(-(rows + growth) // n_members)} after) need {need} B per member, "
                       f"member {tight} has {free[tight]} B free; growing the {low} highest-gradient.")
        return low

    def _log_once(self, budget: str, message: str) -> None:
        if budget not in self._budgets_hit:
            self._budgets_hit.add(budget)
            log.warning(message)


@torch.no_grad()
def grow(params, optimizers, state: Dict[str, Any], is_dupli: Tensor, is_split: Tensor, revised_opacity: bool = False) -> None:
    """gsplat's `duplicate` then `split` ([N] masks; a Gaussian may be both: its copy survives, it is
    split) as one row gather per tensor, each parent's rows in place of it: the parent (unless split),
    its copy, its two children. Children sit next to their parent, so on its member; the copies and
    children start with zero Adam moments and their parent's statistics, as in gsplat. The split noise
    is gsplat's one randn(2, K, 3) draw over the split parents in row order."""
    dupli, split = torch.where(is_dupli)[0], torch.where(is_split)[0]
    rest = torch.where(~is_split)[0]
    grown = torch.cat([rest, dupli, split, split])  # gsplat's rows: survivors, copies, first, second children
    place = torch.sort(grown, stable=True).indices  # by parent, each parent's rows in gsplat's order
    src = grown[place]
    new_rows = torch.where(place >= rest.shape[0])[0]
    first_child = rest.shape[0] + dupli.shape[0]
    child_rows = torch.where(place >= first_child)[0]
    noise = torch.randn(2, split.shape[0], 3, device=is_split.device).reshape(-1, 3)[place[child_rows] - first_child]
    children = split_children(params, src[child_rows], noise, revised_opacity)

    def param_fn(name: str, p: Tensor) -> Tensor:
        out = p[src]
        if name in children:
            out[child_rows] = children[name]
        return torch.nn.Parameter(out, requires_grad=p.requires_grad)

    def optimizer_fn(key: str, v: Tensor) -> Tensor:
        out = v[src]
        out[new_rows] = 0
        return out

    _update_param_with_optimizer(param_fn, optimizer_fn, params, optimizers)
    for key, v in state.items():
        if isinstance(v, Tensor):
            state[key] = v[src]


@torch.no_grad()
def keep_state_persistent(params, optimizers, state: Dict[str, Any]) -> None:
    """Parameters, their Adam moments and the statistics as persistent rows (aggregate ones only; a
    no-op for those that already are)."""
    if not all(is_aggregate(p) for p in params.values()):
        return
    stale = [name for name, p in params.items() if not is_persistent(p)]
    if stale:
        _update_param_with_optimizer(
            lambda name, p: torch.nn.Parameter(persistent_rows(p.detach()), requires_grad=p.requires_grad),
            lambda key, v: persistent_rows(v) if is_aggregate(v) else v,
            params, optimizers, names=stale,
        )
    for key, v in state.items():
        if is_aggregate(v):
            state[key] = persistent_rows(v)


def split_children(params, parents: Tensor, noise: Tensor, revised_opacity: bool) -> Dict[str, Tensor]:
    """The values of split children that differ from their parent's ([K] parent rows, one [K, 3]
    noise row each): mean moved by a sample of the parent's Gaussian, scale / 1.6, and (revised)
    opacity. gsplat's arithmetic without its einsum (whose output puts the Gaussians second)."""
    scales = torch.exp(params["scales"][parents])  # [K, 3]
    rotmats = normalized_quat_to_rotmat(F.normalize(params["quats"][parents], dim=-1))  # [K, 3, 3]
    children = {
        "means": params["means"][parents] + (rotmats * (scales * noise)[:, None, :]).sum(dim=-1),
        "scales": torch.log(scales / 1.6),
    }
    if revised_opacity:
        children["opacities"] = torch.logit(1.0 - torch.sqrt(1.0 - torch.sigmoid(params["opacities"][parents])))
    return children
