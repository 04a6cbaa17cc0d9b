"""Sharded checkpoints with torch.distributed.checkpoint (DCP): every member's rows of every aggregate
tensor written as they lie, nobody gathers the model. Used by several ranks and by one process with
several members (DCP needs no process group: `no_dist`).

A sharded checkpoint is a DCP folder. Its entries are "skeleton" (the checkpoint dict torch.save'd
into a uint8 tensor, written once, with every aggregate tensor replaced by {"__rows__": "rows/<k>"}) and one global tensor "rows/<k>" per
aggregate, with one chunk per member at its global row offset (DCP's metadata records them: the
global layout, uneven or not, needs no padding). Loading asks DCP for the rows the loading members
own, whatever layout wrote them: DCP reads only the overlapping ranges of the written chunks.

DCP plans with a memory-less placeholder per aggregate (`_placeholder`); the planners below hand it
each member's own chunk when it writes or reads that chunk, so neither side builds a tensor of all
of a rank's rows. Writing: DCP copies a chunk to the host (GPU members) one at a time, and a CPU chunk
is passed as a tensor owning exactly its rows' bytes (`_own_storage`), which DCP writes without the
copy it makes of views. Reading: one written chunk at a time is held while its rows are copied into
the loading members' chunks.

This is the one module of checkpointing that touches torch.distributed.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
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

Progress = Callable[[int, Optional[int]], None]
"""progress(bytes done since the last call, total bytes or None): how a caller shows a bar."""
Chunks = Dict[str, Dict[int, torch.Tensor]]
"""entry -> first global row of a chunk -> that chunk's rows (a member's chunk, or a row range)."""


class CheckpointError(ValueError):
    """A sharded checkpoint that cannot be read (incomplete, damaged); the message names the damage."""


def is_sharded(path: Path) -> bool:
    return Path(path).is_dir()


@contextlib.contextmanager
def _quiet():
    """DCP warns on every call without a process group that it assumes one process: it is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def barrier() -> None:
    if world.active():
        dist.barrier()


def _placeholder(dtype: torch.dtype, global_shape: Sequence[int], first: int, spans: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """A tensor of no memory with this rank's row count, marked with DCP's CheckpointableTensor fields:
    one shard per (first global row, rows) in `spans`, at `first` + its offset in the rank's rows."""
    rows = sum(n for _, n in spans) if spans else 0
    rest = tuple(global_shape[1:])
    local = torch.empty((1,) * len(global_shape), dtype=dtype).expand(rows, *rest)
    zeros = (0,) * len(rest)
    local.global_shape = tuple(global_shape)
    local.global_offsets = tuple((start, *zeros) for start, _ in spans)
    local.local_offsets = tuple((start - first, *zeros) for start, _ in spans)
    local.local_sizes = tuple((n, *rest) for _, n in spans)
    return local


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """`t` (a view of a member's rows in a larger CPU tensor) as a tensor sharing its memory whose
    storage is exactly its bytes: DCP clones views (torch.save would write the whole storage), which
    would copy every chunk once more. Other devices and dtypes numpy lacks are left to DCP."""
    if t.device.type != "cpu" or t.untyped_storage().nbytes() == t.nbytes or not t.is_contiguous():
        return t
    try:
        return torch.from_numpy(t.numpy())
    except TypeError:  # bfloat16 and other dtypes numpy has no type for
        return t


class _SavePlanner(DefaultSavePlanner):
    """DCP's planner, handing it each member's chunk (by entry and global row offset) to write."""

    def __init__(self, chunks: Chunks, progress: Optional[Progress]) -> None:
        super().__init__()
        self.own, self.progress, self.pending = chunks, progress, 0

    def lookup_object(self, index):
        if self.progress is not None and self.pending:
            self.progress(self.pending, None)  # the item before this one has been written
        if index.fqn not in self.own:
            self.pending = 0
            return super().lookup_object(index)
        chunk = self.own[index.fqn][index.offset[0]]
        self.pending = chunk.nbytes
        return _own_storage(chunk.detach())


class _LoadPlanner(DefaultLoadPlanner):
    """DCP's planner, copying each read range straight into the loading members' chunks."""

    def __init__(self, chunks: Chunks, progress: Optional[Progress]) -> None:
        super().__init__()
        self.own, self.progress = chunks, progress

    def lookup_tensor(self, index):
        if index.fqn in self.own:
            return self.own[index.fqn][index.offset[0]]
        return super().lookup_tensor(index)

    def commit_tensor(self, read_item, tensor) -> None:
        if self.progress is not None:
            self.progress(tensor.nbytes, None)


def _split(obj: Any, entries: Dict[str, torch.Tensor], chunks: Chunks, seen: Dict[int, str]) -> Any:
    """`obj` with each aggregate tensor replaced by a placeholder {ROWS: "rows/<k>"} (one entry per
    tensor, however often it occurs); the DCP entry (a placeholder tensor) goes into `entries`, this
    rank's members' chunks into `chunks`."""
    if is_aggregate(obj):
        if id(obj) in seen:
            return {ROWS: seen[id(obj)]}
        key = seen[id(obj)] = f"rows/{len(chunks)}"
        layout = obj._layout
        own = {layout.bounds[d]: obj.chunks[d] for d in layout.members.local if layout.counts[d] > 0}
        chunks[key] = own
        if own:
            spans = [(start, chunk.shape[0]) for start, chunk in own.items()]
            entries[key] = _placeholder(obj.dtype, obj.shape, layout.local_span[0], spans)
        return {ROWS: key}
    if isinstance(obj, dict):
        return {k: _split(v, entries, chunks, seen) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_split(v, entries, chunks, seen) for v in obj)
    return obj


def _join(obj: Any, rows: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {ROWS}:
            return rows[obj[ROWS]]
        return {k: _join(v, rows) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_join(v, rows) for v in obj)
    return obj


def save(state: Dict[str, Any], final: Path, tmp: Path, progress: Optional[Progress] = None) -> None:
    """Write `state` (every rank calls this with its own chunks) as a sharded checkpoint at `final`,
    atomically: into the folder `tmp` first (a stale one from a killed save is removed), then, once
    every rank has written, rank 0 renames it. A save killed midway leaves at most `tmp`, which the
    loaders never see; one that fails in one process removes it and raises CheckpointError naming
    the cause."""
    entries: Dict[str, torch.Tensor] = {}
    chunks: Chunks = {}
    skeleton = _split(state, entries, chunks, {})
    if progress is not None:
        progress(0, sum(c.nbytes for own in chunks.values() for c in own.values()))
    if world.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    buffer = io.BytesIO()
    torch.save(skeleton, buffer)  # one entry of bytes: DCP would take nested dicts apart (and drop empty ones)
    entries[SKELETON] = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    planner = _SavePlanner(chunks, progress)
    try:
        with _quiet():
            dcp.save(entries, storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True), planner=planner, no_dist=not world.active())
    except BaseException as err:
        if not world.active():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, (Exception, dcp.CheckpointException)):  # DCP wraps the cause per rank
            raise CheckpointError(f"cannot write {final.name} ({_first_line(err)})") from err
        raise
    if progress is not None and planner.pending:
        progress(planner.pending, None)
    barrier()  # every rank's files are on disk
    if world.rank() == 0:
        _replace_folder(tmp, final)
    barrier()


def _replace_folder(tmp: Path, final: Path) -> None:
    """Rename the complete folder `tmp` to `final` (replacing a checkpoint of the same step) and make
    the rename durable."""
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


def _metadata(path: Path):
    path = Path(path)
    if not (path / METADATA).is_file():
        raise CheckpointError(f"{path} is an incomplete sharded checkpoint (no {METADATA}; a save was interrupted)")
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as err:
        raise CheckpointError(f"cannot read {path / METADATA} ({_first_line(err)})") from None
    if not isinstance(metadata.state_dict_metadata.get(SKELETON), TensorStorageMetadata):
        raise CheckpointError(f"{path} holds no {SKELETON} entry; it is not a sharded ms-splatfacto checkpoint")
    return metadata


def _read(path: Path, entries: Dict[str, torch.Tensor], chunks: Chunks, progress: Optional[Progress]) -> None:
    try:
        with _quiet():
            dcp.load(entries, storage_reader=dcp.FileSystemReader(str(path)), planner=_LoadPlanner(chunks, progress), no_dist=not world.active())
    except (Exception, dcp.CheckpointException) as err:  # a missing or truncated shard file, wrapped per rank by DCP
        raise CheckpointError(f"cannot read the shards of {path} ({_first_line(err)}); it may be truncated") from None


def load(path: Path, members: Optional[Members] = None, progress: Optional[Progress] = None) -> Dict[str, Any]:
    """The checkpoint dict at `path`. With `members` every aggregate comes back as an aggregate tensor
    on them, evenly striped, each member's rows read into its own chunk (under torch.distributed every
    rank calls this and reads only its members' rows); without, as an ordinary tensor with all rows in
    global order (one process only)."""
    path = Path(path)
    metadata = _metadata(path)
    if members is None and world.active():
        raise ValueError("Loading a sharded checkpoint on several ranks needs the members to stripe it over")
    skeleton_md = metadata.state_dict_metadata[SKELETON]
    entries: Dict[str, torch.Tensor] = {SKELETON: torch.empty(tuple(skeleton_md.size), dtype=torch.uint8)}
    chunks: Chunks = {}
    rows: Dict[str, torch.Tensor] = {}
    for key, md in metadata.state_dict_metadata.items():
        if not key.startswith("rows/") or not isinstance(md, TensorStorageMetadata):
            continue
        shape, dtype = tuple(md.size), md.properties.dtype
        if members is None:
            rows[key] = torch.empty(shape, dtype=dtype)
            own, first = ({0: rows[key]} if shape[0] else {}), 0
        else:
            layout = even_layout(shape[0], members)
            whole, member_chunks = storage_for(layout).empty(layout, shape[1:], dtype, persistent=True)  # model state
            rows[key] = wrap(layout, whole, member_chunks)
            own = {layout.bounds[d]: member_chunks[d] for d in members.local if layout.counts[d] > 0}
            first = layout.local_span[0]
        if own:
            chunks[key] = own
            entries[key] = _placeholder(dtype, shape, first, [(start, c.shape[0]) for start, c in own.items()])
    if progress is not None:
        progress(0, sum(c.nbytes for own in chunks.values() for c in own.values()))
    _read(path, entries, chunks, progress)
    try:
        skeleton = torch.load(io.BytesIO(entries[SKELETON].numpy().tobytes()), weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read the skeleton of {path} ({_first_line(err)})") from None
    return _join(skeleton, rows)


def read_skeleton(path: Path) -> Tuple[Dict[str, Any], Dict[str, Tuple[torch.Size, torch.dtype, List[Tuple[int, int]]]]]:
    """The checkpoint dict at `path` with {ROWS: "rows/<k>"} in place of each aggregate tensor, and per
    entry its global shape, dtype and written chunks ([start, stop) rows, in row order); no rows read.
    For reading a checkpoint piece by piece (`read_rows`), e.g. to export it."""
    path = Path(path)
    metadata = _metadata(path)
    entries = {SKELETON: torch.empty(tuple(metadata.state_dict_metadata[SKELETON].size), dtype=torch.uint8)}
    try:
        with _quiet():
            dcp.load(entries, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
        skeleton = torch.load(io.BytesIO(entries[SKELETON].numpy().tobytes()), weights_only=True)
    except (Exception, dcp.CheckpointException) as err:
        raise CheckpointError(f"cannot read the skeleton of {path} ({_first_line(err)})") from None
    info = {}
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith("rows/") and isinstance(md, TensorStorageMetadata):
            spans = sorted((c.offsets[0], c.offsets[0] + c.sizes[0]) for c in md.chunks)
            info[key] = (md.size, md.properties.dtype, spans)
    return skeleton, info


def read_rows(path: Path, wanted: Mapping[str, Tuple[torch.Size, torch.dtype]], start: int, stop: int) -> Dict[str, torch.Tensor]:
    """Rows [start, stop) of the entries `wanted` (entry -> global shape, dtype) of the sharded
    checkpoint at `path`, as ordinary tensors; DCP reads only the written chunks that overlap them."""
    entries: Dict[str, torch.Tensor] = {}
    chunks: Chunks = {}
    out: Dict[str, torch.Tensor] = {}
    for key, (shape, dtype) in wanted.items():
        out[key] = torch.empty((stop - start, *shape[1:]), dtype=dtype)
        chunks[key] = {start: out[key]}
        entries[key] = _placeholder(dtype, shape, start, [(start, stop - start)])
    _read(Path(path), entries, chunks, None)
    return out


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if "Error" in line or "error" in line] or lines or [type(err).__name__]
    return useful[-1][:300]
