"""A refinement on the real training path: a few steps of `gpu_path`'s render + loss + backward + Adam
with `ms_splatfacto.strategy.MsStrategy` (gsplat's DefaultStrategy rules on the aggregate device)
accumulating the statistics, one refinement (duplicate, split, prune, Morton re-order, even re-stripe),
then one more step on the grown rows.

The thresholds keep every decision far from float32 noise, so the decisions of two kernel sets (CUDA
and C++, or C++ and the pure-PyTorch reference) must agree: sizes are bimodal about `grow_scale3d`, a
few Gaussians are faint far below `prune_opa`, and `grow_grad2d` sits in the widest gap of the
reference run's gradient statistics (`grad_cut`). The split noise comes from the
device's RNG, so CUDA and CPU children differ in position only; a frozen "ids" column (each
Gaussian's index, inherited by copies and children) tells which parent every row came from.

Shared by tests/test_gpu_path.py and benchmarks/gpu_check.py; needs torch and gsplat's Python code
(`load_strategy` opens it where numpy is missing, as on the GPU machine), never nerfstudio.
"""

from __future__ import annotations

import importlib
import math
import sys
import types
from typing import Dict, List, Optional, Union

import torch
from torch import Tensor

from benchmarks import gpu_env
from benchmarks import gpu_path as gp
from ms_splatfacto.backend.aggregate import Members, fallback_counts, is_aggregate, parameter, reset_fallback_counts, to_plain

LRS = {"means": 1.6e-4, "scales": 5e-3, "quats": 1e-3, "features_dc": 2.5e-3, "features_rest": 1.25e-4, "opacities": 5e-2}
"""splatfacto's learning rates (the model's optimizers; one Adam per parameter, as gsplat's ops expect)."""
REFINE_AT = 4
"""Steps 1..REFINE_AT accumulate statistics (step 0 would reset the opacities); the refinement runs in
REFINE_AT's post-backward, then step REFINE_AT + 1 trains the refined rows."""
FAINT, FAINT_OPACITY, PRUNE_OPA = 12, 1e-3, 0.02
"""Gaussians made faint (opacity 1e-3, against 0.1 and up for the rest): pruned at 0.02 by a wide margin."""
SMALL, LARGE = 0.5, 1.0
"""Sizes in units of the scene's spacing, each axis x [0.8, 1.2]: small ones (largest axis <= 0.6) are
duplicated, large ones (>= 0.8) split; `grow_scale3d` is cut between them (`size_cut`)."""
MIN_GROWN, MIN_MARGIN = 8, 1.05
"""`grow_grad2d` leaves at least 8 Gaussians above it and at least half below, in the widest gap of the
sorted statistics; the gap's ends must be 5 % or more from it (the C++ and the reference kernels'
statistics differ by under 1e-5 relatively)."""
MOMENT_REL_L2 = 2 * gp.GRAD_REL_L2
"""Adam moments across kernel sets: exp_avg is linear in the gradients, exp_avg_sq quadratic."""
DISPLACEMENT_REL_L2 = 5e-2
"""Parameters across kernel sets, as ||(a - a0) - (b - b0)|| / ||b - b0|| from the initial values: Adam's
update is ~lr * sign(grad), so an element whose gradient is float32 noise may move either way."""


def load_strategy():
    """`MsStrategy`. Where numpy is missing gsplat is opened bare (`gpu_env.import_gsplat`), and its
    strategy ops import numpy (used only by MCMC sampling past 2^24 rows) and one kernel wrapper from
    the skipped `gsplat/__init__.py`: the wrapper is put on the package and, for that import alone, a
    numpy stand-in that raises on use."""
    if gpu_env.present("numpy") or "ms_splatfacto.strategy" in sys.modules:
        return importlib.import_module("ms_splatfacto.strategy").MsStrategy
    if "gsplat" not in sys.modules:
        loaded = gpu_env.import_gsplat()
        if not loaded["ok"]:
            raise ImportError(f"gsplat: {loaded['error']}")
    from gsplat.cuda import _wrapper

    package = sys.modules["gsplat"]
    if not hasattr(package, "quat_scale_to_covar_preci"):
        package.quat_scale_to_covar_preci = _wrapper.quat_scale_to_covar_preci
    for ours in ("ms_splatfacto.backend.morton", "ms_splatfacto.backend.aggregate.redistribute"):
        importlib.import_module(ours)  # before the stand-in goes in: it serves gsplat alone
    stand_in = types.ModuleType("numpy", "stand-in: gsplat's strategy ops imported where numpy is missing")

    def missing(name: str):
        raise ImportError(f"numpy is not installed (gsplat's strategy ops asked for numpy.{name})")

    stand_in.__getattr__ = missing
    sys.modules["numpy"] = stand_in
    try:
        return importlib.import_module("ms_splatfacto.strategy").MsStrategy
    finally:
        if sys.modules.get("numpy") is stand_in:
            del sys.modules["numpy"]


def refinement_scene(n: int, width: int, height: int, seed: int = 0) -> gp.Scene:
    """`synthetic_scene` with bimodal sizes (SMALL / LARGE spacings) and FAINT Gaussians at 1e-3 opacity."""
    scene = gp.synthetic_scene(n, width, height, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    spacing = float(torch.exp(scene.raw["scales"]).mean() / 0.9)  # synthetic_scene's: spacing x [0.4, 1.4]
    size = torch.where(torch.rand(n, 1, generator=g) < 0.5, SMALL, LARGE) * (0.8 + 0.4 * torch.rand(n, 3, generator=g))
    opacities = scene.raw["opacities"].clone()
    opacities[torch.randperm(n, generator=g)[:FAINT]] = math.log(FAINT_OPACITY / (1 - FAINT_OPACITY))
    raw = {**scene.raw, "scales": torch.log(spacing * size), "opacities": opacities}
    return gp.Scene(raw, scene.viewmats, scene.Ks, scene.images, scene.sh_degree)


def widest_gap(values: Tensor, min_below: int, min_above: int) -> Dict[str, object]:
    """The cut in the widest (ratio) gap of the sorted positive `values` with at least `min_below` values
    below it and `min_above` above: the gap's geometric middle, its margin (ratio) to either end, and
    how many values lie above."""
    values = torch.sort(values[values > 0].double()).values
    n = values.shape[0]
    assert n >= min_below + min_above and min_below >= 1 and min_above >= 1, (n, min_below, min_above)
    ratios = values[min_below:n - min_above + 1] / values[min_below - 1:n - min_above]  # gap above values[i]
    i = min_below - 1 + int(torch.argmax(ratios))
    below, above = float(values[i]), float(values[i + 1])
    return {"cut": math.sqrt(below * above), "margin": math.sqrt(above / below), "above": n - i - 1, "gap": [below, above]}


def size_cut(scene: gp.Scene) -> Dict[str, object]:
    """`grow_scale3d`'s cut between the small and the large Gaussians (scene_scale 1)."""
    largest = torch.exp(scene.raw["scales"]).max(dim=-1).values
    return widest_gap(largest, scene.gaussians // 4, scene.gaussians // 4)


def strategy_options(scene: gp.Scene, grow_grad2d: float) -> Dict[str, object]:
    """DefaultStrategy options: one refinement at REFINE_AT, no opacity reset, no screen-size or
    world-size rules (their statistics are as noisy as the gradients), no budgets."""
    return dict(prune_opa=PRUNE_OPA, grow_grad2d=grow_grad2d, grow_scale3d=size_cut(scene)["cut"], grow_scale2d=1e9,
                prune_scale3d=1e9, prune_scale2d=1e9, refine_scale2d_stop_iter=0, refine_start_iter=0,
                refine_stop_iter=10_000, reset_every=10_000, refine_every=REFINE_AT, pause_refine_after_reset=0,
                absgrad=False, revised_opacity=False, verbose=False)


def trainable(scene: gp.Scene, spec: Union[str, Members]):
    """(params, optimizers): the Gaussians on `spec` plus a frozen "ids" column, one Adam per parameter."""
    params = gp.gaussian_params(scene.raw, spec)
    ids = torch.arange(scene.gaussians, dtype=torch.float32)[:, None]  # exact in float32 below 2^24
    params["ids"] = torch.nn.Parameter(parameter(ids, gp._members_of(params)), requires_grad=False)
    optimizers = {name: torch.optim.Adam([params[name]], lr=LRS[name], eps=1e-15) for name in gp.PARAMS}
    optimizers["ids"] = torch.optim.SGD([params["ids"]], lr=0.0)  # gsplat's ops update every entry's optimizer
    return params, optimizers


def _steps(strategy, params, optimizers, state, scene: gp.Scene, kernels: Optional[str], steps) -> List[float]:
    losses = []
    for step in steps:
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        loss, _, info = gp.render_and_loss(params, scene, kernels)
        info.update(width=scene.width, height=scene.height, n_cameras=scene.viewmats.shape[0])
        strategy.step_pre_backward(params, optimizers, state, step, info)
        loss.backward()
        for optimizer in optimizers.values():
            optimizer.step()
        strategy.step_post_backward(params, optimizers, state, step, info, packed=False)
        losses.append(float(loss.detach()))
    return losses


def gradient_statistics(scene: gp.Scene, spec: Union[str, Members] = "cpu", kernels: Optional[str] = "cpu") -> Tensor:
    """grad2d / count per Gaussian just before the refinement ([N]; what `grow_grad2d` is compared with)."""
    MsStrategy = load_strategy()
    strategy = MsStrategy(**{**strategy_options(scene, math.inf), "refine_every": 10_000})
    params, optimizers = trainable(scene, spec)
    state = strategy.initialize_state(scene_scale=1.0)
    torch.manual_seed(0)
    with gp.float32_convolutions():
        _steps(strategy, params, optimizers, state, scene, kernels, range(1, REFINE_AT + 1))
    return (to_plain(state["grad2d"]) / to_plain(state["count"]).clamp_min(1)).cpu()


def grad_cut(stats: Tensor) -> Dict[str, object]:
    """`grow_grad2d` from `gradient_statistics`: at least MIN_GROWN above it and half the seen below."""
    return widest_gap(stats, max(int((stats > 0).sum()) // 2, 1), MIN_GROWN)


def _counts(t: Tensor) -> List[int]:
    return list(t._layout.counts) if is_aggregate(t) else [t.shape[0]]


def _sorted_rows(params, optimizers) -> Dict[str, object]:
    """Every row as plain CPU tensors, sorted by (parent id, fresh, mean x): fresh rows (all Adam moments
    zero: copies and children) after their parent's surviving row, children by position."""
    plain = {name: to_plain(p.detach()).cpu() for name, p in params.items()}
    moments = {name: {key: to_plain(optimizers[name].state[params[name]][key]).cpu() for key in ("exp_avg", "exp_avg_sq")}
               for name in gp.PARAMS}
    rows = plain["ids"].shape[0]
    fresh = torch.stack([m.reshape(rows, -1).abs().sum(dim=1) == 0 for v in moments.values() for m in v.values()]).all(dim=0)
    order = torch.arange(rows)
    for key in (plain["means"][:, 0], fresh.float(), plain["ids"][:, 0]):  # least significant first: stable sorts
        order = order[torch.sort(key[order], stable=True).indices]
    return {"ids": plain["ids"][order, 0].long(), "fresh": fresh[order],
            "params": {name: plain[name][order] for name in gp.PARAMS},
            "moments": {name: {key: m[order] for key, m in v.items()} for name, v in moments.items()}}


DECISIONS = ("pruned", "kept", "duplicated", "split")


def decisions(rows: Dict[str, object], raw: Dict[str, Tensor]) -> Tensor:
    """Per parent ([N] codes into DECISIONS, -1 for anything else) from the rows alone: how many rows
    carry its id and how many of them are split children (every axis 1.6x smaller than at the start;
    training moves a log-scale by ~lr per step, log 1.6 = 0.47)."""
    n = raw["means"].shape[0]
    ids = rows["ids"]
    child = (raw["scales"][ids] - rows["params"]["scales"]).min(dim=1).values > 0.3
    count = torch.bincount(ids, minlength=n)
    children = torch.bincount(ids[child], minlength=n)
    fresh = torch.bincount(ids[rows["fresh"]], minlength=n)
    code = torch.full((n,), -1, dtype=torch.long)
    code[count == 0] = 0
    code[(count == 1) & (children == 0)] = 1
    code[(count == 2) & (children == 0) & (fresh == 1)] = 2
    code[(count == 2) & (children == 2) & (fresh == 2)] = 3
    return code


def copy_failures(rows: Dict[str, object], code: Tensor) -> List[str]:
    """Parameters in which a duplicated parent's copy differs from it (right after the refinement)."""
    twins = torch.where(code[rows["ids"]] == 2)[0].reshape(-1, 2)  # each duplicated parent's row, then its copy
    return [f"copies' {name} differ from their parents'" for name, value in rows["params"].items()
            if not torch.equal(value[twins[:, 0]], value[twins[:, 1]])]


def refinement_run(spec: Union[str, Members], scene: gp.Scene, grow_grad2d: float, kernels: Optional[str] = None,
                   seed: int = 0) -> Dict[str, object]:
    """Steps 1..REFINE_AT with the refinement in the last one's post-backward, then one more step. Returns
    the losses, the rows right after the refinement (`_sorted_rows`), each parent's decision, rows per
    member, the fallback count and what the run got wrong on its own (uneven members, a fallback, a
    copy unlike its parent, a decision outside DECISIONS, a non-finite loss)."""
    MsStrategy = load_strategy()
    strategy = MsStrategy(**strategy_options(scene, grow_grad2d))
    params, optimizers = trainable(scene, spec)
    state = strategy.initialize_state(scene_scale=1.0)
    reset_fallback_counts()
    torch.manual_seed(seed)  # the split noise (every device's generator)
    with gp.float32_convolutions():
        losses = _steps(strategy, params, optimizers, state, scene, kernels, range(1, REFINE_AT + 1))
        rows = _sorted_rows(params, optimizers)
        tensors = [*params.values(), *(v for o in optimizers.values() for s in o.state.values() for v in s.values() if v.dim()),
                   *(v for v in state.values() if isinstance(v, Tensor))]
        layouts = {tuple(_counts(t)) for t in tensors}
        losses += _steps(strategy, params, optimizers, state, scene, kernels, [REFINE_AT + 1])
    fallbacks = sum(fallback_counts().values())
    code = decisions(rows, scene.raw)
    per_member = _counts(params["means"])
    failures = []
    if len(layouts) != 1 or max(per_member) - min(per_member) > 1:
        failures.append(f"rows per member uneven or unlike between tensors: {sorted(layouts)}")
    if fallbacks:
        failures.append(f"{fallbacks} fallbacks: {fallback_counts()}")
    if bool((code < 0).any()):
        failures.append(f"{int((code < 0).sum())} parents with rows unlike any decision")
    failures += copy_failures(rows, code)
    if not all(math.isfinite(loss) for loss in losses):
        failures.append(f"losses {losses}")
    summary = {name: int((code == i).sum()) for i, name in enumerate(DECISIONS)}
    return {"spec": str(spec), "kernels": kernels or "default", "losses": losses, "gaussians": int(rows["ids"].shape[0]),
            "rows_per_member": per_member, "fallbacks": fallbacks, "decisions": summary, "code": code, "rows": rows,
            "failures": failures}


def compare_refinements(got: Dict[str, object], want: Dict[str, object], raw: Dict[str, Tensor], same_rng: bool,
                        exact: bool = False) -> Dict[str, object]:
    """Two `refinement_run`s: the same decisions for every parent, then every row right after the
    refinement bit for bit (`exact`) or within tolerance: Adam moments by relative L2, parameters by
    their displacement from the start. Children's means only with `same_rng` (the same split noise)."""
    failures = [f"{run['spec']}: {f}" for run in (got, want) for f in run["failures"]]
    wrong = torch.where(got["code"] != want["code"])[0]
    if wrong.numel():
        failures.append(f"{wrong.numel()} parents decided otherwise ({got['decisions']} against {want['decisions']}), "
                        f"first ids {wrong[:8].tolist()}")
    a, b = got["rows"], want["rows"]
    figures: Dict[str, float] = {}
    # fresh (zero moments) decides for grown parents' rows; elsewhere it means no gradient yet, which a
    # Gaussian whose every pixel sits at the 1/255 alpha cut-off may get from one kernel set only
    if not torch.equal(a["ids"], b["ids"]):
        failures.append(f"rows unlike: {got['gaussians']} against {want['gaussians']}")
    elif not torch.equal(a["fresh"] & (want["code"][b["ids"]] >= 2), b["fresh"] & (want["code"][b["ids"]] >= 2)):
        failures.append("copies or children unlike (rows with zero Adam moments)")
    else:
        child = want["code"][b["ids"]] == 3
        start = {name: raw[name][b["ids"]] for name in gp.PARAMS}
        for name in gp.PARAMS:
            keep = ~child if name == "means" and not same_rng else torch.ones_like(child)
            pairs = [(f"{name}.{key}", a["moments"][name][key][keep], b["moments"][name][key][keep], MOMENT_REL_L2)
                     for key in ("exp_avg", "exp_avg_sq")]
            pairs.append((name, a["params"][name][keep] - start[name][keep], b["params"][name][keep] - start[name][keep],
                          DISPLACEMENT_REL_L2))
            for label, x, y, tolerance in pairs:
                if exact:
                    if not torch.equal(x, y):
                        failures.append(f"{label} not bit for bit")
                    continue
                figures[label] = gp.rel_l2(x, y)
                if not figures[label] <= tolerance:
                    failures.append(f"{label} rel L2 {figures[label]:.3g}")
    losses = got["losses"] if same_rng else got["losses"][:-1]  # the last step trains the children
    reference = want["losses"][: len(losses)]
    if exact and losses != reference:
        failures.append(f"losses {losses} against {reference}")
    loss_rel = max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(losses, reference))
    if not loss_rel <= gp.LOSS_REL:
        failures.append(f"loss rel diff {loss_rel:.3g}")
    return {"passed": not failures, "failures": failures, "rel_l2": figures, "loss_rel": loss_rel}


def refinement_reference(scene: gp.Scene, spec: str = "cpu", kernels: Optional[str] = "cpu") -> Dict[str, object]:
    """The reference for `refinement_parity`: thresholds from `spec`'s statistics (with `kernels`) and its run."""
    cuts = {"grow_grad2d": grad_cut(gradient_statistics(scene, spec, kernels)), "grow_scale3d": size_cut(scene)}
    return run_reference(spec, scene, cuts, kernels)


def run_reference(spec: str, scene: gp.Scene, cuts: Dict[str, Dict], kernels: Optional[str] = None) -> Dict[str, object]:
    """A reference on `spec` with the thresholds `cuts` of another (e.g. one GPU member for member counts)."""
    return {"spec": spec, "kernels": kernels or "default", "cuts": cuts,
            "run": refinement_run(spec, scene, cuts["grow_grad2d"]["cut"], kernels)}


def refinement_parity(spec: Union[str, Members], scene: gp.Scene, kernels: Optional[str] = None,
                      reference: Optional[Dict[str, object]] = None, same_rng: bool = False, exact: bool = False) -> Dict[str, object]:
    """A refinement on `spec` against `reference` (default: one CPU member, C++ kernels): figures and a
    verdict, without the row tables (JSON-ready)."""
    reference = reference or refinement_reference(scene)
    cuts = reference["cuts"]
    run = refinement_run(spec, scene, cuts["grow_grad2d"]["cut"], kernels)
    result = compare_refinements(run, reference["run"], scene.raw, same_rng=same_rng, exact=exact)
    for name, cut in cuts.items():
        if cut["margin"] < MIN_MARGIN:
            result["failures"].append(f"{name} {cut['cut']:.4g} only {cut['margin']:.3f}x from a statistic")
    grown = reference["run"]["decisions"]
    if min(grown["duplicated"], grown["split"], grown["pruned"]) == 0:
        result["failures"].append(f"the reference run did not duplicate, split and prune: {grown}")
    result["passed"] = not result["failures"]
    keys = ("gaussians", "rows_per_member", "fallbacks", "decisions", "losses")
    return {"spec": str(spec), "reference": f"{reference['spec']} ({reference['kernels']} kernels)", **result,
            "thresholds": {name: {k: cut[k] for k in ("cut", "margin", "above")} for name, cut in cuts.items()},
            **{k: run[k] for k in keys}, "reference_run": {k: reference["run"][k] for k in keys}}
