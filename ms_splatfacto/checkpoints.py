"""Checkpoints independent of the member count: rows in global order plus a record of the layout that
wrote them, refused with one line naming what differs when they do not fit the model.

A checkpoint is nerfstudio's dict (step, pipeline, optimizers, schedulers, scalers) with two entries
added: "layout" (below) and "strategy", the densification statistics in global row order, so a
resumed run refines like one that never stopped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ms_splatfacto.backend.aggregate import aggregate, is_aggregate, restripe_optimizer_state, to_plain
from ms_splatfacto.errors import InputError

FORMAT = 1
"""Version of the checkpoint structure; a checkpoint of a newer format is refused."""
METHOD = "ms-splatfacto"
REQUIRED = ("step", "pipeline", "optimizers", "scalers")
"""Top-level entries of every nerfstudio checkpoint."""


def layout_record(model) -> Dict[str, Any]:
    """The "layout" entry: who wrote the rows and how they were striped (all plain Python values)."""
    means, rest = model.gauss_params["means"], model.gauss_params["features_rest"]
    counts = list(means._layout.counts) if is_aggregate(means) else [means.shape[0]]
    return {
        "format": FORMAT,
        "method": METHOD,
        "devices": str(model.members),
        "members": len(counts),
        "rows_per_member": counts,
        "num_gaussians": means.shape[0],
        "sh_degree": model.config.sh_degree,
        "features_rest": list(rest.shape[1:]),  # [SH coefficients - 1, 3]
    }


def checkpoint_state(step: int, pipeline, optimizers, grad_scaler) -> Dict[str, Any]:
    """What a checkpoint holds: nerfstudio's entries, the layout and the densification statistics, with
    aggregates as ordinary tensors in global row order (their pickled form) and numpy scalars as numbers."""
    model = pipeline.model
    return plain_numbers({
        "step": step,
        "pipeline": pipeline.state_dict(),
        "optimizers": {k: v.state_dict() for k, v in optimizers.optimizers.items()},
        "schedulers": {k: v.state_dict() for k, v in optimizers.schedulers.items()},
        "scalers": grad_scaler.state_dict(),
        "layout": layout_record(model),
        "strategy": {k: v for k, v in model.strategy_state.items() if v is None or isinstance(v, (Tensor, int, float))},
    })


def plain_numbers(obj: Any) -> Any:
    """`obj` with numpy scalars turned into Python numbers.

    nerfstudio's schedulers leave numpy floats in optimizer and scheduler state, which
    `torch.load(weights_only=True)` (the default since torch 2.6) refuses, so the viewer, the exporter
    and resuming could not read the checkpoint.
    """
    if isinstance(obj, dict):
        return {key: plain_numbers(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain_numbers(value) for value in obj)
    return obj.item() if isinstance(obj, np.generic) else obj


def read_checkpoint(path: Path) -> Dict[str, Any]:
    """The checkpoint at `path`, loaded safely (weights only) on the CPU; refuses a missing, truncated or
    corrupt file, one that is not a nerfstudio checkpoint, and one written by another method or format."""
    if not path.is_file():
        raise InputError(f"Checkpoint {path} does not exist.")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt or not a torch file: torch names the damage
        raise InputError(f"Cannot read checkpoint {path} ({str(err).splitlines()[0]}); it may be truncated.") from None
    missing = [key for key in REQUIRED if not isinstance(loaded, dict) or key not in loaded]
    if missing:
        raise InputError(f"{path} is not a nerfstudio checkpoint: it lacks {', '.join(missing)}.")
    layout = loaded.get("layout")
    if layout is not None:
        if layout.get("method") != METHOD:
            raise InputError(f"{path} was written by {layout.get('method')}, not {METHOD}.")
        if layout.get("format", 0) > FORMAT:
            raise InputError(f"{path} has checkpoint format {layout['format']}; this {METHOD} reads up to {FORMAT}.")
    return loaded


def check_gaussians(state: Mapping[str, Tensor], shapes: Mapping[str, torch.Size], sh_degree: int) -> None:
    """Refuse a model state dict whose Gaussians cannot go into a model with parameter shapes `shapes`
    (name -> [N, ...]) and SH degree `sh_degree`: missing parameters, another SH degree, other shapes."""
    prefix = "" if "means" in state else "gauss_params."  # splatfacto still reads checkpoints of its old naming
    missing = [prefix + name for name in shapes if prefix + name not in state]
    if missing:
        held = ", ".join(sorted(state)[:3]) or "nothing"
        raise InputError(f"The checkpoint holds no splatfacto model: it lacks {', '.join(missing)} (it holds {held}, ...).")
    rows = state[prefix + "means"].shape[0]
    for name, want in shapes.items():
        saved = state[prefix + name].shape
        if name == "features_rest" and saved[1:2] != want[1:2]:
            raise InputError(
                f"The checkpoint has SH degree {sh_degree_of(saved[1])} (features_rest {list(saved)}), the model "
                f"--pipeline.model.sh-degree {sh_degree} (features_rest [N, {want[1]}, 3]); train or load with the same degree."
            )
        if saved[0] != rows or saved[1:] != want[1:]:
            raise InputError(f"The checkpoint's {name} has shape {list(saved)}; the model needs [{rows}, {', '.join(map(str, want[1:]))}].")


def sh_degree_of(rest_coefficients: int) -> str:
    """The SH degree with `rest_coefficients` coefficients besides the DC one ((d + 1)^2 - 1)."""
    degree = math.isqrt(rest_coefficients + 1) - 1
    return str(degree) if (degree + 1) ** 2 == rest_coefficients + 1 else f"? ({rest_coefficients} coefficients)"


def restore(loaded: Dict[str, Any], pipeline, optimizers, grad_scaler, load_schedulers: bool = True) -> None:
    """Load a checkpoint read by `read_checkpoint` into a set-up trainer's pipeline, optimizers (nerfstudio's
    Optimizers) and grad scaler, on this model's members whatever member count wrote it: parameters and
    Adam moments are re-striped, and the optimizers re-pointed at the loaded parameters."""
    model = pipeline.model
    layout = loaded.get("layout")
    rows = gaussian_rows(loaded["pipeline"])
    if layout is not None and rows is not None and layout["num_gaussians"] != rows:
        raise InputError(f"The checkpoint is inconsistent: its layout records {layout['num_gaussians']} Gaussians, its parameters hold {rows}.")
    pipeline.load_pipeline(loaded["pipeline"], loaded["step"])  # the model refuses Gaussians that do not fit
    unknown = sorted(set(loaded["optimizers"]) - set(optimizers.optimizers))
    lacking = sorted(set(model.gauss_params.keys()) - set(loaded["optimizers"]))
    if unknown or lacking:
        raise InputError(
            f"The checkpoint's optimizer state does not fit the model: "
            f"{'state for ' + ', '.join(unknown) + ' the model lacks' if unknown else 'no state for ' + ', '.join(lacking)}."
        )
    try:
        optimizers.load_optimizers(loaded["optimizers"])
    except ValueError as err:  # torch: parameter groups of another size
        raise InputError(f"The checkpoint's optimizer state does not fit the model: {err}") from None
    if "schedulers" in loaded and load_schedulers:
        optimizers.load_schedulers(loaded["schedulers"])
    grad_scaler.load_state_dict(loaded["scalers"])
    repoint_optimizers(optimizers, model.get_param_groups())
    for name, optimizer in optimizers.optimizers.items():
        restripe_optimizer_state(optimizer)  # loaded moments are ordinary; stripe them like their rows
        for p in optimizer.param_groups[0]["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                    raise InputError(f"The checkpoint's {name} optimizer {key} has shape {list(value.shape)}, its parameter {list(p.shape)}.")
    if "strategy" in loaded:
        model.strategy_state.update(restripe_rows(loaded["strategy"], model))


def gaussian_rows(pipeline_state: Mapping[str, Tensor]) -> Optional[int]:
    for key in ("_model.gauss_params.means", "_model.means"):
        if key in pipeline_state:
            return pipeline_state[key].shape[0]
    return None


def restripe_rows(state: Dict[str, Any], model) -> Dict[str, Any]:
    """`state` (densification statistics) with its per-Gaussian tensors striped like the model's rows."""
    n, out = model.num_points, {}
    for key, value in state.items():
        per_row = torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n
        out[key] = aggregate(to_plain(value), model.members) if per_row else value
    return out


def repoint_optimizers(optimizers, param_groups: Dict[str, list]) -> None:
    """Make each optimizer hold the model's current parameters, carrying their state across.

    Loading a splatfacto checkpoint replaces the Gaussian parameters with new tensors of the saved
    size, while the optimizers still hold the old ones (nerfstudio issue 3554), so training after a
    resume would update tensors the model no longer uses.
    """
    for name, params in param_groups.items():
        optimizer = optimizers.optimizers.get(name)
        if optimizer is None:
            continue
        (group,) = optimizer.param_groups
        for old, new in zip(list(group["params"]), params):
            if old is not new and old in optimizer.state:
                optimizer.state[new] = optimizer.state.pop(old)
        group["params"] = list(params)
        optimizers.parameters[name] = list(params)


def first_nonfinite(named: Iterable[Tuple[str, Optional[Tensor]]]) -> Optional[str]:
    """The name of the first tensor holding a NaN or an infinity (None tensors are skipped)."""
    for name, t in named:
        if t is not None and not bool(torch.isfinite(t).all()):
            return name
    return None
