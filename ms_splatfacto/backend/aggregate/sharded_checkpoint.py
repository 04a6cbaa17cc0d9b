"""Checkpoints of a multi-rank run with torch.distributed.checkpoint (DCP): each rank writes the rows it
holds of every aggregate tensor, nobody gathers the model.

A sharded checkpoint is a DCP folder. Its entries are "skeleton" (the checkpoint dict torch.save'd
into a uint8 tensor, written once, with every aggregate tensor replaced by {"__rows__": "rows/<k>"}) and one global tensor "rows/<k>" per
aggregate, whose chunks are the writers' row ranges (DCP's metadata records them, so the uneven row
layout needs no padding). Loading asks DCP for the rows the loading rank's members own, whatever
layout wrote them: DCP reads only the overlapping ranges of the written chunks.

This is the one module of checkpointing that touches torch.distributed.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ms_splatfacto.backend.aggregate import world
from ms_splatfacto.backend.aggregate.layout import Layout, even_layout
from ms_splatfacto.backend.aggregate.members import Members
from ms_splatfacto.backend.aggregate.storage import storage_for
from ms_splatfacto.backend.aggregate.tensor import AggregateTensor, is_aggregate, wrap

SKELETON = "skeleton"
"""The checkpoint dict with placeholders for the rows, torch.save'd into one uint8 tensor."""
ROWS = "__rows__"
"""Key of the placeholder that stands for an aggregate tensor in the skeleton."""
METADATA = ".metadata"
"""DCP's metadata file; a folder without it is not a complete checkpoint."""


class CheckpointError(ValueError):
    """A sharded checkpoint that cannot be read (incomplete, damaged); the message names the damage."""


def is_sharded(path: Path) -> bool:
    return Path(path).is_dir()


def barrier() -> None:
    if world.active():
        dist.barrier()


def _local_rows(t: AggregateTensor) -> torch.Tensor:
    """This rank's rows of `t` ([local rows, ...]) as one ordinary tensor, marked with DCP's
    CheckpointableTensor fields so DCP writes it as the chunk at its global row offset."""
    layout = t._layout
    first, stop = layout.local_span
    if t._whole is not None:
        local = t._whole
    else:
        local = torch.cat([t.chunks[d] for d in layout.members.local]) if stop > first else t.chunks[layout.members.local[0]]
    local = local.detach().cpu().contiguous()
    return _mark(local, first, t.shape)


def _mark(local: torch.Tensor, first: int, global_shape) -> torch.Tensor:
    zeros = (0,) * (local.dim() - 1)
    local.global_shape = tuple(global_shape)
    local.global_offsets = ((first, *zeros),)
    local.local_offsets = ((0, *zeros),)
    local.local_sizes = (tuple(local.shape),)
    return local


def _split(obj: Any, rows: Dict[str, torch.Tensor]) -> Any:
    """`obj` with each aggregate tensor replaced by a placeholder; its local rows go into `rows`."""
    if is_aggregate(obj):
        key = f"rows/{len(rows)}"
        rows[key] = _local_rows(obj)
        return {ROWS: key}
    if isinstance(obj, dict):
        return {k: _split(v, rows) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_split(v, rows) for v in obj)
    return obj


def _join(obj: Any, rows: Dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {ROWS}:
            return rows[obj[ROWS]]
        return {k: _join(v, rows) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_join(v, rows) for v in obj)
    return obj


def save(state: Dict[str, Any], final: Path, tmp: Path) -> None:
    """Write `state` (every rank calls this with its own chunks) as a sharded checkpoint at `final`,
    atomically: into the folder `tmp` first (a stale one from a killed save is removed), then, once
    every rank has written, rank 0 renames it. A save killed midway leaves at most `tmp`."""
    rows: Dict[str, torch.Tensor] = {}
    skeleton = _split(state, rows)
    if world.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    buffer = io.BytesIO()
    torch.save(skeleton, buffer)  # one entry of bytes: DCP would take nested dicts apart (and drop empty ones)
    entries = {SKELETON: torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)}
    entries.update({k: v for k, v in rows.items() if v.shape[0] > 0})
    dcp.save(entries, storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True), no_dist=not world.active())
    barrier()  # every rank's files are on disk
    if world.rank() == 0:
        if final.exists():
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        os.replace(tmp, final)
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    barrier()


def load(path: Path, members: Optional[Members] = None) -> Dict[str, Any]:
    """The checkpoint dict at `path`. In one process every aggregate comes back as an ordinary tensor
    with all rows in global order; under torch.distributed (every rank calls this) as an aggregate
    tensor on `members`, evenly striped, each rank having read only its own rows."""
    path = Path(path)
    if not (path / METADATA).is_file():
        raise CheckpointError(f"{path} is an incomplete sharded checkpoint (no {METADATA}; a save was interrupted)")
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as err:
        raise CheckpointError(f"cannot read {path / METADATA} ({_first_line(err)})") from None
    striped = world.active()
    if striped and members is None:
        raise ValueError("Loading a sharded checkpoint on several ranks needs the members to stripe it over")
    if not isinstance(metadata.state_dict_metadata.get(SKELETON), TensorStorageMetadata):
        raise CheckpointError(f"{path} holds no {SKELETON} entry; it is not a sharded ms-splatfacto checkpoint")
    wanted: Dict[str, Any] = {SKELETON: torch.empty(tuple(metadata.state_dict_metadata[SKELETON].size), dtype=torch.uint8)}
    layouts: Dict[str, Layout] = {}
    for key, md in metadata.state_dict_metadata.items():
        if not key.startswith("rows/") or not isinstance(md, TensorStorageMetadata):
            continue
        shape = tuple(md.size)
        if striped:
            layouts[key] = even_layout(shape[0], members)
            first, stop = layouts[key].local_span
        else:
            first, stop = 0, shape[0]
        if stop > first:
            wanted[key] = _mark(torch.empty((stop - first, *shape[1:]), dtype=md.properties.dtype), first, shape)
    try:
        dcp.load(wanted, storage_reader=dcp.FileSystemReader(str(path)), no_dist=not striped)
        skeleton = torch.load(io.BytesIO(wanted[SKELETON].numpy().tobytes()), weights_only=True)
    except (Exception, dcp.CheckpointException) as err:  # a missing or truncated shard file, wrapped per rank by DCP
        raise CheckpointError(f"cannot read the shards of {path} ({_first_line(err)}); it may be truncated") from None
    rows: Dict[str, torch.Tensor] = {}
    for key, md in metadata.state_dict_metadata.items():
        if key in layouts:
            local = wanted.get(key, torch.empty((0, *tuple(md.size)[1:]), dtype=md.properties.dtype))
            rows[key] = _from_local_rows(local, layouts[key])
        elif key.startswith("rows/"):
            rows[key] = wanted[key].detach()  # a new tensor object, without DCP's marks
    return _join(skeleton, rows)


def _from_local_rows(local: torch.Tensor, layout: Layout) -> AggregateTensor:
    """An aggregate tensor with `layout` whose local rows are `local` ([local rows, ...])."""
    m = layout.members
    local = local.to(m.device)
    whole, chunks = storage_for(layout).empty(layout, local.shape[1:], local.dtype)
    first, _ = layout.local_span
    if whole is not None:
        whole.copy_(local)
    else:
        for d in m.local:
            chunks[d].copy_(local[layout.bounds[d] - first : layout.bounds[d + 1] - first], non_blocking=True)
    return wrap(layout, whole, chunks)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if "Error" in line or "error" in line] or lines or [type(err).__name__]
    return useful[-1][:300]
