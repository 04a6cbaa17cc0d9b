"""Per-member figures while training, and progress bars for long phases.

`member_callbacks(model)` returns nerfstudio training callbacks that, every step, log for each member d
of the model's aggregate device, through nerfstudio's writer (tensorboard, wandb, ...):

    Members/gaussians/member{d}        rows of the Gaussians member d holds
    Members/memory_MB/member{d}        MB of member d's chunks of the parameters, their gradients,
                                       their Adam moments and the densification statistics
    Members/sent_bytes/member{d}       bytes member d sent to other members during the step
    Members/received_bytes/member{d}   bytes member d received during the step

and print them as a rich table after each refinement. Wire them in MsSplatfactoModel:

    def get_training_callbacks(self, attributes):
        return super().get_training_callbacks(attributes) + member_callbacks(self)
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Iterator, List, Optional, TypeVar

import torch
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation
from nerfstudio.utils import writer
from nerfstudio.utils.rich_utils import CONSOLE
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from ms_splatfacto.backend.aggregate import exchange_counts, is_aggregate, world
from ms_splatfacto.backend.aggregate.exchange import sum_over_ranks

T = TypeVar("T")


def _chunk_bytes(t: Optional[torch.Tensor], n_members: int) -> List[int]:
    """Bytes of each of this rank's members' rows of `t` (an ordinary tensor counts as member 0's)."""
    out = [0] * n_members
    if t is None or not torch.is_tensor(t):
        return out
    if is_aggregate(t):
        for d, chunk in enumerate(t.chunks):
            if chunk is not None:
                out[d] += chunk.numel() * chunk.element_size()
    else:
        out[0] += t.numel() * t.element_size()
    return out


def member_memory(model) -> List[int]:
    """Bytes per member of the Gaussian parameters, their gradients, Adam moments (every tensor in the
    optimizer state of a parameter) and the strategy's per-Gaussian statistics."""
    n = len(model.members)
    total = [0] * n
    tensors: List[Optional[torch.Tensor]] = []
    optimizers = getattr(model, "optimizers", None) or {}
    for name, param in model.gauss_params.items():
        tensors += [param.data, param.grad]
        optimizer = optimizers.get(name) if isinstance(optimizers, dict) else None
        if optimizer is not None:
            tensors += [v for v in optimizer.state.get(param, {}).values() if torch.is_tensor(v) and v.dim() > 0]
    tensors += [v for v in model.strategy_state.values() if torch.is_tensor(v) and v.dim() > 0]
    for t in tensors:
        total = [a + b for a, b in zip(total, _chunk_bytes(t, n))]
    return sum_over_ranks(model.members, total)  # each rank knows its own members' bytes


def member_counts(model) -> List[int]:
    means = model.gauss_params["means"]
    return list(means._layout.counts) if is_aggregate(means) else [means.shape[0]]


class MemberMonitor:
    """Per-member Gaussian counts, memory and exchanged bytes of one model (see the module doc)."""

    def __init__(self, model) -> None:
        self.model = model
        self.before: Dict = {}
        self.last: Dict[str, List[float]] = {}

    def before_step(self, step: int) -> None:
        self.before = exchange_counts()

    def after_step(self, step: int) -> None:
        n = len(self.model.members)
        sent, received = [0] * n, [0] * n
        for (src, dst), nbytes in exchange_counts().items():
            delta = nbytes - self.before.get((src, dst), 0)
            if src < n and dst < n:
                sent[src] += delta
                received[dst] += delta
        both = sum_over_ranks(self.model.members, sent + received)  # each rank counts what its members sent
        sent, received = both[:n], both[n:]
        self.last = {
            "gaussians": member_counts(self.model),
            "memory_MB": [b / 1e6 for b in member_memory(self.model)],
            "sent_bytes": sent,
            "received_bytes": received,
        }
        for key, values in self.last.items():
            for d, value in enumerate(values):
                writer.put_scalar(name=f"Members/{key}/member{d}", scalar=float(value), step=step)
        if self.refined(step):
            CONSOLE.print(self.table(step))

    def refined(self, step: int) -> bool:
        """Whether the strategy refined (grew, pruned, re-ordered) the Gaussians at this step."""
        s = self.model.strategy
        return (s.refine_start_iter < step < s.refine_stop_iter and step % s.refine_every == 0
                and step % s.reset_every >= s.pause_refine_after_reset)

    def table(self, step: int) -> Table:
        table = Table(title=f"members after the refinement at step {step}")
        for column in ("member", "Gaussians", "memory (MB)", "sent (bytes)", "received (bytes)"):
            table.add_column(column, justify="right")
        for d in range(len(self.last["gaussians"])):
            table.add_row(
                str(d), f"{self.last['gaussians'][d]:,}", f"{self.last['memory_MB'][d]:.1f}",
                f"{self.last['sent_bytes'][d]:,}", f"{self.last['received_bytes'][d]:,}",
            )
        return table


def member_callbacks(model) -> List[TrainingCallback]:
    """Training callbacks logging per-member figures every step (append them to the model's callbacks)."""
    monitor = MemberMonitor(model)
    return [
        TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], monitor.before_step),
        TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], monitor.after_step),
    ]


def _progress(total: Optional[float], unit: str) -> Progress:
    columns = [SpinnerColumn(), TextColumn("{task.description}")]
    if total is not None or unit == "bytes":
        columns += [BarColumn(), TaskProgressColumn()]
        if unit == "bytes":
            columns += [DownloadColumn(), TransferSpeedColumn()]
        columns += [TimeRemainingColumn()]
    return Progress(*columns, TimeElapsedColumn(), console=CONSOLE, transient=False)


def _no_progress(amount: float = 1, total: Optional[float] = None) -> None:
    return None


@contextlib.contextmanager
def phase(description: str, total: Optional[float] = None, unit: str = "") -> Iterator[Callable[..., None]]:
    """A progress bar (with `total`) or spinner (without) for a long phase: kernel build, checkpoint
    write and load, export. Yields `advance(amount=1, total=None)`; a `total` given there sets the
    bar's total (known only once the phase has begun). `unit="bytes"` shows bytes done of the total and
    the rate. Only rank 0 shows it; on other ranks `advance` does nothing. Without a terminal rich
    prints the finished bar once.

        with phase("writing checkpoint", unit="bytes") as advance: save(..., progress=advance)
        with phase("exporting splats", total=n) as advance: ... advance(chunk)
    """
    if world.rank() != 0:
        yield _no_progress
        return
    with _progress(total, unit) as progress:
        task = progress.add_task(description, total=total)

        def advance(amount: float = 1, total: Optional[float] = None) -> None:
            if total is not None:
                progress.update(task, total=total)
            if amount:
                progress.advance(task, amount)

        yield advance
        final = progress.tasks[0].total
        if final is not None:
            progress.update(task, completed=final)


def track(items: Iterable[T], description: str, total: Optional[int] = None) -> Iterator[T]:
    """Iterate `items` under a progress bar."""
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)  # type: ignore[arg-type]
    with phase(description, total) as advance:
        for item in items:
            yield item
            advance()
