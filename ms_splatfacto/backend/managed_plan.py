"""Planning for managed (unified) memory, in plain Python and torch so it is testable without a GPU.

Three decisions are made here and only carried out by the CUDA extension (`cuda_storage.py`):

- *Chunk offsets.* A striped allocation holds member d's rows at a page-aligned byte offset, so no
  page is shared by two members: the driver keeps one preferred location per page and migrates whole
  pages, and a page split between two GPUs would bounce between them. The page is 2 MiB, the
  granularity at which the CUDA driver tracks and migrates managed memory on GPUs (its "big page";
  4 KiB and 64 KiB pieces exist, but placement advice and prefetch work on 2 MiB blocks). The padding
  after a chunk lies in the chunk's own last page, so it costs no memory that page would not take.
- *Placement.* A chunk goes to its member's GPU while it fits in that GPU's budget (its free memory
  less a headroom kept for transients on torch's caching allocator); a chunk that does not fit lives
  in host memory and is read over the interconnect (oversubscription), instead of being refused.
- *Prefetch.* The rows a member will read become page-aligned byte ranges, clipped to the chunk that
  holds them, merged, and bounded in number (the smallest gaps are closed first), for one batched
  prefetch call.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

PAGE_BYTES = 2 << 20
"""Alignment of chunk starts and granule of advice and prefetch: the driver's 2 MiB page."""
HOST = -1
"""The host as a location (cudaCpuDeviceId)."""
HEADROOM_FRACTION = 0.1
"""Share of a GPU's memory that managed rows leave free for transients (caching allocator)."""
MAX_PREFETCH_RANGES = 64
"""Most ranges one chunk contributes to a prefetch call; more are merged across the smallest gaps."""

Span = Tuple[int, int]
"""(offset or address, bytes)."""


def align_up(n: int, page: int = PAGE_BYTES) -> int:
    return -(-n // page) * page


def align_down(n: int, page: int = PAGE_BYTES) -> int:
    return n // page * page


def chunk_spans(counts: Sequence[int], row_bytes: int, page: int = PAGE_BYTES) -> Tuple[List[Span], int]:
    """((offset, bytes) of each chunk, allocation bytes) for chunks of `counts` rows of `row_bytes`.

    Every non-empty chunk starts on a page; an empty chunk takes no bytes (offset: where the next one
    starts). The allocation bytes are a whole number of pages, so page-rounded ranges stay inside."""
    assert row_bytes >= 0 and page > 0 and all(n >= 0 for n in counts), (counts, row_bytes, page)
    spans, offset = [], 0
    for n in counts:
        spans.append((offset, n * row_bytes))
        offset = align_up(offset + n * row_bytes, page)
    return spans, offset


def budget(free_bytes: int, total_bytes: int, headroom: float = HEADROOM_FRACTION) -> int:
    """Bytes of managed rows a GPU takes: its free memory less `headroom` of its total, never negative."""
    return max(0, free_bytes - int(total_bytes * headroom))


def place(sizes: Sequence[int], gpus: Sequence[int], budgets: Mapping[int, int], page: int = PAGE_BYTES) -> List[int]:
    """The location of each chunk (`sizes[d]` bytes, owned by GPU `gpus[d]`): its GPU while the page-
    rounded chunk fits in what is left of that GPU's budget, else HOST. Members sharing a GPU (virtual
    members) draw on one budget, in member order; empty chunks stay on their GPU."""
    assert len(sizes) == len(gpus), (sizes, gpus)
    left: Dict[int, int] = {g: budgets[g] for g in set(gpus)}
    locations = []
    for size, gpu in zip(sizes, gpus):
        need = align_up(size, page)
        if need <= left[gpu]:
            left[gpu] -= need
            locations.append(gpu)
        else:
            locations.append(HOST)
    return locations


def row_runs(rows: torch.Tensor) -> torch.Tensor:  # rows: [K] row indices, any order, repeats allowed
    """[R, 2] runs [start, stop) of consecutive rows covering `rows`, sorted."""
    assert rows.dim() == 1, f"rows must be 1-D, got {tuple(rows.shape)}"
    rows = torch.unique(rows.long())  # sorted
    if rows.numel() == 0:
        return torch.empty((0, 2), dtype=torch.long, device=rows.device)
    breaks = torch.nonzero(rows[1:] != rows[:-1] + 1).flatten() + 1
    starts = torch.cat([rows[:1], rows[breaks]])
    stops = torch.cat([rows[breaks - 1] + 1, rows[-1:] + 1])
    return torch.stack([starts, stops], dim=1)


def prefetch_ranges(
    byte_runs: torch.Tensor,  # [R, 2] byte ranges [start, stop) to read, in any order
    extent: Span,  # (start, bytes) of the chunk holding them: ranges never leave its pages
    page: int = PAGE_BYTES,
    max_ranges: int = MAX_PREFETCH_RANGES,
) -> List[Span]:
    """The page-aligned (address, bytes) ranges to prefetch for `byte_runs`: each run widened to whole
    pages, clipped to the pages of `extent`, overlapping or touching pages merged, and at most
    `max_ranges` of them (the smallest gaps between ranges are closed first, prefetching a few pages
    not read rather than issuing many tiny calls)."""
    assert byte_runs.dim() == 2 and byte_runs.shape[1] == 2, f"byte_runs must be [R, 2], got {tuple(byte_runs.shape)}"
    assert max_ranges >= 1
    start, size = extent
    lo_page, hi_page = align_down(start, page) // page, align_up(start + size, page) // page
    runs = byte_runs.long().cpu()
    runs = runs[runs[:, 1] > runs[:, 0]]
    lo = torch.clamp(runs[:, 0] // page, lo_page, hi_page)
    hi = torch.clamp(-(-runs[:, 1] // page), lo_page, hi_page)
    keep = hi > lo
    order = torch.argsort(lo[keep], stable=True)
    lo, hi = lo[keep][order], hi[keep][order]
    if lo.numel() == 0:
        return []
    hi = torch.cummax(hi, 0).values  # the furthest page reached so far: a range starting beyond it starts anew
    lo, hi = _merge(lo, hi, lo[1:] > hi[:-1])
    if lo.numel() > max_ranges:
        gaps = lo[1:] - hi[:-1]
        widest = torch.sort(gaps, descending=True, stable=True).indices[: max_ranges - 1]
        split = torch.zeros_like(gaps, dtype=torch.bool)
        split[widest] = True
        lo, hi = _merge(lo, hi, split)
    return [(int(a) * page, int(b - a) * page) for a, b in zip(lo, hi)]


def _merge(lo: torch.Tensor, hi: torch.Tensor, split: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Join consecutive page ranges ([n] lo, [n] hi nondecreasing) except where `split` ([n - 1]) is set."""
    assert lo.shape == hi.shape and split.shape[0] == lo.shape[0] - 1
    starts = torch.cat([torch.tensor([0]), torch.nonzero(split).flatten() + 1])
    ends = torch.cat([starts[1:] - 1, torch.tensor([lo.shape[0] - 1])])
    return lo[starts], hi[ends]


def rows_to_prefetch(
    rows: Optional[torch.Tensor],  # [K] rows of the chunk to be read (chunk-local), None for all
    chunk_rows: int,
    row_bytes: int,
    address: int,  # where the chunk's row 0 lies
    page: int = PAGE_BYTES,
    max_ranges: int = MAX_PREFETCH_RANGES,
) -> List[Span]:
    """`prefetch_ranges` for rows of a chunk of `chunk_rows` rows starting at `address`."""
    if rows is None:
        runs = torch.tensor([[0, chunk_rows]], dtype=torch.long)
    else:
        runs = row_runs(rows.cpu())
        assert runs.numel() == 0 or (runs[0, 0] >= 0 and runs[-1, 1] <= chunk_rows), f"rows outside [0, {chunk_rows})"
    return prefetch_ranges(runs * row_bytes + address, (address, chunk_rows * row_bytes), page, max_ranges)
