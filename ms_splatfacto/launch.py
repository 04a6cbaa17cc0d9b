"""Runs under torchrun: one `ns-train` per rank, all running the same code (SPMD).

nerfstudio sees one process in each (it is not told about the ranks, so it wraps nothing in DDP: the
parameters are already striped). The ranks join torch.distributed's process group from torchrun's
environment, agree on rank 0's output folder, refuse to start when they disagree on data, members or
code, and turn a dead or hung peer into one line instead of a hang or a gloo traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import re
import subprocess
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence

import torch
from nerfstudio.utils.rich_utils import CONSOLE

from ms_splatfacto.backend.aggregate import world
from ms_splatfacto.errors import InputError, TrainingStopped

_TIMEOUT_S = [world.DEFAULT_TIMEOUT_S]


def join(timeout_s: float) -> bool:
    """Join the ranks torchrun started (once; a no-op without torchrun). Returns whether this is a
    multi-rank run. Ranks other than 0 print nothing from then on."""
    if not world.active():
        _TIMEOUT_S[0] = timeout_s
    try:
        active = world.init_from_env(timeout_s)
    except RuntimeError as err:  # the rendezvous itself timed out or was refused
        raise InputError(f"Cannot join the other ranks within {timeout_s:g} s: {_gist(err)}.") from None
    if active and world.rank() != 0:
        CONSOLE.quiet = True
    return active


def adapt_config(config) -> None:
    """Settings nerfstudio would get wrong on several ranks. The viewer renders from its own thread on
    rank 0 alone, while rendering needs every rank: it is left out (open the checkpoint with
    ns-viewer instead), on every rank alike, so evaluation steps stay in step."""
    vis = config.vis
    if vis.startswith("viewer"):
        config.vis = vis.split("+", 1)[1] if "+" in vis else "tensorboard"
        CONSOLE.log(
            f"[yellow]--vis {vis} becomes {config.vis} under torchrun: the viewer cannot render while several ranks "
            "train; open a checkpoint with ns-viewer.[/yellow]"
        )


def code_version() -> str:
    """This package's version, with the git commit of its checkout where there is one."""
    try:
        version = importlib.metadata.version("ms-splatfacto")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():
        try:
            head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            head = ""
        if head:
            version += f"+{head[:12]}"
    return version


def data_fingerprint(path: Optional[Path]) -> str:
    """The files of the dataset at `path` by relative name and size (not their contents: cheap for
    thousands of images), so ranks on machines that mount it elsewhere still agree."""
    if path is None:
        return "none"
    path = Path(path)
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path] if path.exists() else []
    digest, total = hashlib.sha1(), 0
    for f in files:
        size = f.stat().st_size
        total += size
        digest.update(f"{f.relative_to(path) if path.is_dir() else f.name}\0{size}\n".encode())
    return f"{len(files)} files, {total} bytes (digest {digest.hexdigest()[:12]})"


def start_identity(config, devices: Sequence[torch.device]) -> Dict[str, str]:
    """What every rank must share before training starts (its local member devices are `devices`)."""
    return {
        "code version": code_version(),
        "member device type": ",".join(sorted({d.type for d in devices})),
        "dataset": data_fingerprint(config.pipeline.datamanager.data),
        "seed (--machine.seed)": str(config.machine.seed),
        "steps (--max-num-iterations)": str(config.max_num_iterations),
    }


def data_identity(datamanager) -> Dict[str, str]:
    """What every rank must share once the data is loaded: the images and the camera order."""
    order = ",".join(str(i) for i in getattr(datamanager, "train_unseen_cameras", []))
    return {
        "training images": str(len(datamanager.train_dataset)),
        "evaluation images": str(len(datamanager.eval_dataset)),
        "training camera order": hashlib.sha1(order.encode()).hexdigest()[:12],
    }


def agree(identity: Dict[str, str]) -> None:
    """Refuse, with one line on every rank, to go on when any rank's `identity` differs from rank 0's."""
    everyone = world.all_gather_object(identity)
    for key, value in everyone[0].items():
        for r, other in enumerate(everyone[1:], start=1):
            if other.get(key) != value:
                raise InputError(
                    f"The ranks disagree on the {key}: rank 0 has {value}, rank {r} has {other.get(key)}; "
                    "start every rank with the same code, data and settings."
                )


_PEER_FAILURE = re.compile(
    r"gloo|nccl|connection (closed|reset|refused)|closed by peer|broken pipe|timed? ?out|timeout|socket|"
    r"process group|rendezvous|store",
    re.I,
)


def is_peer_failure(err: BaseException) -> bool:
    """Whether `err` comes from torch.distributed losing another rank (gloo or NCCL raise a
    DistBackendError or RuntimeError; torch.distributed.checkpoint wraps it per rank)."""
    names = {c.__name__ for c in type(err).__mro__}
    if names & {"DistError", "DistBackendError", "DistNetworkError", "DistStoreError", "CheckpointException"}:
        return True
    return isinstance(err, RuntimeError) and bool(_PEER_FAILURE.search(str(err)))


def _gist(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    telling = [line for line in lines if _PEER_FAILURE.search(line)] or lines or [type(err).__name__]
    gist = re.sub(r"^\[[^\]]*\] ?", "", telling[-1])
    return gist.split(". This is typically caused")[0].rstrip(".")[:240]  # gloo's advice is not ours to give


@contextlib.contextmanager
def collective_failures(checkpoint_dir: Optional[Path]) -> Iterator[None]:
    """Turn a collective that failed because another rank died or hung (past the collective timeout)
    into one line naming it, on every surviving rank."""
    try:
        yield
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as err:
        if not world.active() or not is_peer_failure(err):
            raise
        me, n = world.rank(), world.size()
        who = f"rank {1 - me}" if n == 2 else "another rank"
        kept = f" The last complete checkpoint in {checkpoint_dir} stays loadable." if checkpoint_dir is not None else ""
        raise TrainingStopped(
            f"Rank {me} of {n} stopped: {who} died or did not answer within the collective timeout "
            f"({_TIMEOUT_S[0]:g} s, --collective-timeout-s): {_gist(err)}.{kept}"
        ) from None
