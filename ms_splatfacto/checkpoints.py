"""Checkpoints independent of the member count: rows in global order plus a record of the layout that
wrote them, refused with one line naming what differs when they do not fit the model.

A checkpoint is nerfstudio's dict (step, pipeline, optimizers, schedulers, scalers) with entries added:
"layout" (below), "strategy" (the densification statistics), "rng" (python, numpy, torch and CUDA
generator states) and "datamanager" (where the run is in its camera order), so a resumed run continues
bit for bit like one that never stopped (nerfstudio saves neither of the last two).

Several members (in one process or over several ranks) write a folder of the name `step-N.ckpt` with
torch.distributed.checkpoint, each member's rows as they lie, nobody gathering the model
(`backend/aggregate/sharded_checkpoint.py`). One member in one process writes one file (rows in global
order, nerfstudio's own format), pickling its rows' storage as it is. `read_checkpoint` reads both
(and files written by earlier versions), on any ranks x members; nerfstudio's loaders read folders
through `install_eval_loader`. Long writes and reads show a progress bar with bytes and rate.
"""

from __future__ import annotations

import math
import random
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ms_splatfacto.backend.aggregate import Members, aggregate, is_aggregate, restripe_optimizer_state, to_plain, world
from ms_splatfacto.backend.aggregate import sharded_checkpoint
from ms_splatfacto.errors import InputError
from ms_splatfacto.io import CountingFile, atomic_torch_save
from ms_splatfacto.observability import phase

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
    numpy scalars as numbers. Aggregate tensors stay as they are (references, nothing gathered):
    `write_checkpoint` writes each member's rows."""
    model = pipeline.model
    return plain_numbers({
        "step": step,
        "pipeline": pipeline.state_dict(),
        "optimizers": {k: v.state_dict() for k, v in optimizers.optimizers.items()},
        "schedulers": {k: v.state_dict() for k, v in optimizers.schedulers.items()},
        "scalers": grad_scaler.state_dict(),
        "layout": layout_record(model),
        "strategy": {k: v for k, v in model.strategy_state.items() if v is None or isinstance(v, (Tensor, int, float))},
        "rng": rng_state(),
        "datamanager": datamanager_state(getattr(pipeline, "datamanager", None)),
    })


def rng_state() -> Dict[str, Any]:
    """The state of every random generator a training step draws from, as plain values and tensors
    (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def datamanager_state(datamanager) -> Dict[str, Any]:
    """Where nerfstudio's full-image datamanager is in its camera order: the cameras not yet drawn this
    epoch and the generator that shuffles the next epoch (fps sampling: its epoch counts)."""
    out: Dict[str, Any] = {}
    for key in ("train_unseen_cameras", "eval_unseen_cameras"):
        if isinstance(getattr(datamanager, key, None), list):
            out[key] = [int(i) for i in getattr(datamanager, key)]
    generator = getattr(datamanager, "random_generator", None)
    if isinstance(generator, random.Random):
        out["random_generator"] = generator.getstate()
    counts = getattr(datamanager, "train_unsampled_epoch_count", None)
    if isinstance(counts, np.ndarray):
        out["train_unsampled_epoch_count"] = torch.from_numpy(counts.copy())
    return out


def set_datamanager_state(datamanager, state: Mapping[str, Any]) -> None:
    """Put the datamanager back where `datamanager_state` found it; camera indices this dataset lacks
    (a checkpoint of other data) leave its own order in place."""
    sizes = {"train_unseen_cameras": len(getattr(datamanager, "train_dataset", None) or []),
             "eval_unseen_cameras": len(getattr(datamanager, "eval_dataset", None) or [])}
    for key, size in sizes.items():
        if key in state and hasattr(datamanager, key) and all(0 <= i < size for i in state[key]):
            setattr(datamanager, key, list(state[key]))
    if "random_generator" in state:
        generator = random.Random()
        generator.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["random_generator"]))
        datamanager.random_generator = generator
    if "train_unsampled_epoch_count" in state:
        datamanager.train_unsampled_epoch_count = state["train_unsampled_epoch_count"].numpy().copy()


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
    return obj.item() if isinstance(obj, np.generic) else obj  # tensors (aggregates too) as they are


def _striped(obj: Any) -> bool:
    """Whether `obj` holds an aggregate tensor over several members."""
    if is_aggregate(obj):
        return len(obj.members) > 1
    if isinstance(obj, dict):
        return any(_striped(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_striped(v) for v in obj)
    return False


def _own_rows(obj: Any) -> Any:
    """`obj` with each aggregate of one process whose rows are one tensor's whole storage replaced by
    that tensor (no copy: pickling an aggregate gathers a copy of it)."""
    whole = obj._whole if is_aggregate(obj) and obj._layout.local_rows == obj.shape[0] else None
    if whole is not None and whole.is_contiguous() and whole.untyped_storage().nbytes() == whole.nbytes:
        return whole.detach()
    if isinstance(obj, dict):
        return {k: _own_rows(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_own_rows(v) for v in obj)
    return obj


def _tensor_bytes(obj: Any) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def write_checkpoint(state: Dict[str, Any], checkpoint_dir: Path, step: int) -> Path:
    """Write `state` as `checkpoint_dir/step-<step>.ckpt`, atomically: the temporary lies beside the
    checkpoint folder (nerfstudio's loaders never see it), so an interrupted save keeps the previous
    checkpoint. Several members (under torch.distributed every rank calls this): a sharded folder, each
    member's rows written as they lie; one member in one process: one file."""
    path = checkpoint_dir / f"step-{step:09d}.ckpt"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with phase(f"writing checkpoint {path.name}", unit="bytes") as advance:
        if world.active() or _striped(state):
            try:
                sharded_checkpoint.save(state, path, checkpoint_dir.parent / f".{path.name}.partial", progress=advance)
            except sharded_checkpoint.CheckpointError as err:
                raise InputError(f"Cannot write checkpoint {path}: {err}; the previous checkpoints stay loadable.") from None
        else:
            state = _own_rows(state)
            advance(0, total=_tensor_bytes(state))
            atomic_torch_save(state, path, checkpoint_dir.parent, progress=advance)
    return path


def checkpoint_path(load_dir: Optional[Path], step: Optional[int]) -> Optional[Path]:
    """The checkpoint of `step` in `load_dir`, or its latest (file or sharded folder); anything else in
    the folder is ignored."""
    if load_dir is None:
        return None
    if step is None:
        names = (re.fullmatch(r"step-(\d+)\.ckpt", p.name) for p in Path(load_dir).glob("step-*.ckpt"))
        steps = sorted(int(m.group(1)) for m in names if m)
        if not steps:
            raise InputError(f"No checkpoint (step-*.ckpt) in {load_dir}.")
        step = steps[-1]
    return Path(load_dir) / f"step-{step:09d}.ckpt"


def read_checkpoint(path: Path, members: Optional[Members] = None) -> Dict[str, Any]:
    """The checkpoint at `path`, loaded safely (weights only) on the CPU; refuses a missing, truncated or
    corrupt checkpoint, one that is not a nerfstudio checkpoint, and one written by another method or
    format. A sharded one comes back with its per-Gaussian rows striped over `members` (each member's
    rows read into its own chunk; under torch.distributed every rank calls this and reads its own), or,
    without `members`, with ordinary tensors in one process."""
    path = Path(path)
    if sharded_checkpoint.is_sharded(path):
        try:
            with phase(f"reading checkpoint {path.name}", unit="bytes") as advance:
                loaded = sharded_checkpoint.load(path, members, progress=advance)
        except sharded_checkpoint.CheckpointError as err:
            raise InputError(f"Cannot read checkpoint {path}: {err}.") from None
    elif not path.is_file():
        raise InputError(f"Checkpoint {path} does not exist.")
    else:
        try:
            with phase(f"reading checkpoint {path.name}", total=path.stat().st_size, unit="bytes") as advance:
                with open(path, "rb") as f:
                    loaded = torch.load(CountingFile(f, advance), map_location="cpu", weights_only=True)
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
    Adam moments are re-striped, and the optimizers re-pointed at the loaded parameters. The random
    generators and the datamanager's camera order continue where the checkpoint left them."""
    model = pipeline.model
    layout = loaded.get("layout")
    rows = gaussian_rows(loaded["pipeline"])
    if layout is not None and rows is not None and layout["num_gaussians"] != rows:
        raise InputError(f"The checkpoint is inconsistent: its layout records {layout['num_gaussians']} Gaussians, its parameters hold {rows}.")
    if any(is_aggregate(v) for v in loaded["pipeline"].values()):
        load_striped_pipeline(pipeline, loaded["pipeline"], loaded["step"])
    else:
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
    if loaded.get("datamanager") and getattr(pipeline, "datamanager", None) is not None:
        set_datamanager_state(pipeline.datamanager, loaded["datamanager"])
    if "rng" in loaded:
        set_rng_state(loaded["rng"])


GAUSS = "_model.gauss_params."


def load_striped_pipeline(pipeline, state: Mapping[str, Any], step: int) -> None:
    """nerfstudio's `load_pipeline` for a state whose Gaussians are already striped over this model's
    members (a sharded checkpoint read on several ranks): they become the parameters as they are, and
    only the rest goes through torch's loading, so no rank ever holds all rows."""
    model = pipeline.model
    gauss = {k[len(GAUSS):]: v for k, v in state.items() if k.startswith(GAUSS)}
    check_gaussians(gauss, {name: p.shape for name, p in model.gauss_params.items()}, model.config.sh_degree)
    model.update_to_step(step)
    for name in list(model.gauss_params.keys()):
        model.gauss_params[name] = torch.nn.Parameter(gauss[name], requires_grad=True)
    rest = {k[len("_model."):]: v for k, v in state.items() if k.startswith("_model.") and not k.startswith(GAUSS)}
    result = torch.nn.Module.load_state_dict(model, rest, strict=False)
    unexpected = sorted(result.unexpected_keys)
    if unexpected:
        raise InputError(f"The checkpoint holds model state this model lacks: {', '.join(unexpected[:3])}.")
    torch.nn.Module.load_state_dict(pipeline, {k: v for k, v in state.items() if not k.startswith("_model.")}, strict=False)


def gaussian_rows(pipeline_state: Mapping[str, Tensor]) -> Optional[int]:
    for key in ("_model.gauss_params.means", "_model.means"):
        if key in pipeline_state:
            return pipeline_state[key].shape[0]
    return None


def restripe_rows(state: Dict[str, Any], model) -> Dict[str, Any]:
    """`state` (densification statistics) with its per-Gaussian tensors striped like the model's rows."""
    n, out = model.num_points, {}
    for key, value in state.items():
        per_row = torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n and not is_aggregate(value)
        out[key] = aggregate(value, model.members) if per_row else value
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
    """The name of the first tensor holding a NaN or an infinity (None tensors are skipped). The flags
    of all tensors are read on the host at once: one wait for the device per call, not one per tensor."""
    named = [(name, t) for name, t in named if t is not None]
    if not named:
        return None
    device = named[0][1].device
    finite = torch.stack([torch.isfinite(t).all().to(device, non_blocking=True) for _, t in named]).tolist()
    return next((name for (name, _), ok in zip(named, finite) if not ok), None)


def install_eval_loader() -> None:
    """Let nerfstudio's `eval_setup` (ns-viewer, ns-eval, ns-export, ns-render) read sharded checkpoints.

    Its `eval_load_checkpoint` opens `step-N.ckpt` with torch.load, which cannot open a sharded folder;
    this wraps it (once) so a folder is read here, in global row order, and a file as before. It does
    nothing until eval_utils has been imported completely (it imports this plugin halfway through)."""
    import sys

    from nerfstudio.utils.rich_utils import CONSOLE

    eval_utils = sys.modules.get("nerfstudio.utils.eval_utils")
    original = getattr(eval_utils, "eval_load_checkpoint", None)
    if original is None or getattr(original, "reads_sharded", False):
        return

    def eval_load_checkpoint(config, pipeline):
        path = checkpoint_path(config.load_dir, config.load_step) if Path(config.load_dir).is_dir() else None
        if path is None or not sharded_checkpoint.is_sharded(path):
            return original(config, pipeline)
        members = getattr(pipeline.model, "members", None)
        loaded = read_checkpoint(path, members if isinstance(members, Members) else None)
        if any(is_aggregate(v) for v in loaded["pipeline"].values()):
            load_striped_pipeline(pipeline, loaded["pipeline"], loaded["step"])  # each member's rows read into place
        else:
            pipeline.load_pipeline(loaded["pipeline"], loaded["step"])
        CONSOLE.print(f":white_check_mark: Done loading checkpoint from {path}")
        return path, loaded["step"]

    eval_load_checkpoint.reads_sharded = True  # type: ignore[attr-defined]
    eval_utils.eval_load_checkpoint = eval_load_checkpoint
