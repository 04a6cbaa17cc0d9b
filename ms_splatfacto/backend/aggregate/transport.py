"""The exchange's transport between ranks: torch.distributed (gloo on the CPU, NCCL on GPUs).

Part of the exchange (only `exchange.py` calls it). It moves the pieces whose source and destination
members live on different ranks, as bytes in one `all_to_all_single` per call, and counts the bytes it
hands to torch.distributed, by kind, so tests can hold the exchange's own counts against them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

_WIRE: Dict[str, int] = defaultdict(int)


def wire_totals() -> Dict[str, int]:
    """Bytes this rank handed to torch.distributed to send, per kind ("meta": sizes and counts)."""
    return dict(_WIRE)


def reset_wire() -> None:
    _WIRE.clear()


def _buffer_device(fallback: torch.device) -> torch.device:
    return fallback if dist.get_backend() == "nccl" else torch.device("cpu")


def _as_bytes(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    flat = t.detach().reshape(-1)
    if flat.stride(0) != 1:  # a lone element may keep any stride; viewing as bytes needs 1
        flat = flat.clone(memory_format=torch.contiguous_format).as_strided((flat.numel(),), (1,))
    return flat.view(torch.uint8).to(device)


def exchange_rows(
    members,
    local_rows: Mapping[int, Sequence[int]],  # local s -> [n] row counts it sends (its row of the matrix)
) -> List[List[int]]:
    """The full [n, n] matrix of row counts (s sends rows[s][r] to r), every rank filling its members'
    rows: one small all-reduce."""
    n = len(members)
    matrix = torch.zeros((n, n), dtype=torch.long, device=_buffer_device(members.device))
    for s in members.local:
        matrix[s] = torch.tensor(list(local_rows[s]), dtype=torch.long)
    _WIRE["meta"] += matrix.numel() * matrix.element_size()
    dist.all_reduce(matrix)
    return matrix.tolist()


def all_to_all(
    members,
    send: Mapping[int, Sequence[torch.Tensor]],
    rows: Sequence[Sequence[int]],  # [n, n]: rows[s][r] sent from s to r (read for local r only)
    recv: Dict[int, List[Optional[torch.Tensor]]],  # local r -> [n], filled here for remote s
    trailing: Sequence[int],
    dtype: torch.dtype,
    kind: str,
    record: Callable[[int, int, int, str], None],
) -> None:
    """Move the pieces between members of different ranks in one all_to_all_single of bytes."""
    n, rank = len(members), members.rank
    by_rank: List[List[int]] = [[] for _ in range(members.world_size)]
    for d in range(n):
        by_rank[members.ranks[d]].append(d)
    row_bytes = torch.Size(trailing).numel() * dtype.itemsize
    device = _buffer_device(members.device)
    parts: List[torch.Tensor] = []
    in_splits: List[int] = []
    for q, theirs in enumerate(by_rank):
        size = 0
        if q != rank:
            for s in members.local:
                for r in theirs:
                    piece = send[s][r]
                    if piece.shape[0]:
                        parts.append(_as_bytes(piece, device))
                    size += piece.shape[0] * row_bytes
                    record(s, r, piece.shape[0] * row_bytes, kind)
        in_splits.append(size)
    out_splits = [
        0 if p == rank else sum(rows[s][r] for s in theirs for r in members.local) * row_bytes
        for p, theirs in enumerate(by_rank)
    ]
    payload = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=device)
    output = torch.empty(sum(out_splits), dtype=torch.uint8, device=device)
    _WIRE[kind] += sum(in_splits)
    dist.all_to_all_single(output, payload, out_splits, in_splits)
    offset = 0
    for p, theirs in enumerate(by_rank):
        if p == rank:
            continue
        for s in theirs:
            for r in members.local:
                nbytes = rows[s][r] * row_bytes
                piece = output[offset : offset + nbytes].view(dtype).view(rows[s][r], *trailing)
                recv[r][s] = piece.to(members.devices[r])
                offset += nbytes


def sum_ints(members, values: Sequence[int]) -> List[int]:
    """Element-wise sum over the ranks of each rank's integers: one small all-reduce."""
    t = torch.tensor([int(v) for v in values], dtype=torch.long, device=_buffer_device(members.device))
    _WIRE["meta"] += t.numel() * t.element_size()
    dist.all_reduce(t)
    return t.tolist()
