"""Row layouts: which member owns which contiguous range of rows."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Tuple

import torch

from ms_splatfacto.backend.aggregate.members import Members


@dataclass(frozen=True)
class Layout:
    """Rows [bounds[d], bounds[d+1]) live on member d (bounds[0] == 0). Even layouts come from
    `even_layout`; a row slice of an aggregate tensor (a view) keeps the owners of its rows, so its
    layout may be uneven."""

    bounds: Tuple[int, ...]
    members: Members

    @property
    def rows(self) -> int:
        return self.bounds[-1]

    @functools.cached_property
    def counts(self) -> Tuple[int, ...]:
        return tuple(self.bounds[d + 1] - self.bounds[d] for d in range(len(self.members)))

    @functools.cached_property
    def is_even(self) -> bool:
        return self is even_layout(self.rows, self.members)

    @functools.cached_property
    def local_span(self) -> Tuple[int, int]:
        """[first, stop) of the global rows this rank holds (its members are contiguous)."""
        local = self.members.local
        return self.bounds[local[0]], self.bounds[local[-1] + 1]

    @property
    def local_rows(self) -> int:
        first, stop = self.local_span
        return stop - first

    def owners(self, rows: torch.Tensor) -> torch.Tensor:
        """The member owning each row index in `rows` (any shape, indices within this layout)."""
        edges = torch.tensor(self.bounds[1:-1], dtype=rows.dtype, device=rows.device)
        return torch.bucketize(rows, edges, right=True)

    def sliced(self, start: int, stop: int) -> "Layout":
        """The layout of rows [start, stop) of this one (the owners of the rows stay the same)."""
        bounds = tuple(min(max(b, start), stop) - start for b in self.bounds)
        if bounds == even_layout(stop - start, self.members).bounds:
            return even_layout(stop - start, self.members)
        return Layout(bounds, self.members)


def even_bounds(total: int, parts: int) -> List[int]:
    """[0, ..., total]: `total` items dealt into `parts` contiguous ranges, the first ones taking one
    more when they do not divide evenly. The one static split of rows, tiles and image bands."""
    base, extra = divmod(total, parts)
    bounds = [0]
    for d in range(parts):
        bounds.append(bounds[-1] + base + (1 if d < extra else 0))
    return bounds


@functools.lru_cache(maxsize=4096)
def even_layout(rows: int, members: Members) -> Layout:
    """The shared even layout of `rows` rows: groups of `members.align` rows dealt out evenly in
    contiguous chunks, the first members taking one more group when they do not divide evenly."""
    groups = -(-rows // members.align)
    bounds = tuple(min(rows, g * members.align) for g in even_bounds(groups, len(members)))
    return Layout(bounds, members)
