"""The aggregate device across processes: every rule run by ranks that each hold only their own members
(torch.distributed, gloo on loopback) gives the same bits as one process holding all the members, run
member by member; every rank ends with the same ordinary results; and the bytes the exchange counts
between ranks are the bytes it handed to torch.distributed."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest
import torch

from ms_splatfacto.backend.aggregate import (
    aggregate,
    exchange_counts,
    fallback_counts,
    members,
    parameter,
    per_member_execution,
    reset_exchange,
    reset_fallback_counts,
    to_plain,
    wire_totals,
)
from ms_splatfacto.backend.aggregate.exchange import KINDS
from ms_splatfacto.backend.aggregate.members import CPU_ROW_ALIGN
from tests.ranks import run_ranks
from tests.test_aggregate_ops import REDUCTIONS, ROW_OPS, SELECTIONS, rows_of

EXTRA = {
    "sort": lambda x: torch.sort(x[:, 0], stable=True),
    "sort rows descending": lambda x: torch.sort(x, dim=0, descending=True, stable=True),
    "topk": lambda x: torch.topk(x[:, 1], min(5, x.shape[0])),
    "cumsum": lambda x: torch.cumsum(x, 0),
    "cummax": lambda x: torch.cummax(x[:, 2], 0),
    "flip": lambda x: x.flip(0),
    "unique": lambda x: torch.unique((x[:, 0] * 2).round(), return_inverse=True, return_counts=True),
    "nonzero": lambda x: torch.nonzero(x[:, 0] > 0),
    "searchsorted": lambda x: torch.searchsorted(torch.sort(x[:, 0]).values, torch.linspace(-2, 2, 7)),
    "argsort index": lambda x: x[torch.argsort(x[:, 1], stable=True)],
    "scalar": lambda x: torch.tensor(float(x.sum().item())),
}


def program(spec: str, n: int, align=None) -> Dict[str, object]:
    """Every rule family on `n` rows over the members `spec` names (this rank's); ordinary results."""
    reset_fallback_counts()
    reset_exchange()
    out: Dict[str, object] = {}
    with per_member_execution():
        m = members(spec, align=align)
        x0, y0 = rows_of(n, 1), rows_of(n, 2)
        for name, (fn, _, differentiable) in ROW_OPS.items():
            ax = aggregate(x0, m).requires_grad_(differentiable)
            ay = aggregate(y0, m).requires_grad_(differentiable)
            got = fn(ax, ay)
            out[name] = to_plain(got.detach())
            if differentiable:
                (got * aggregate(torch.ones(got.shape), m)).sum().backward()
                out[name + " grad"] = to_plain(ax.grad)
        for name, fn in REDUCTIONS.items():
            ax = aggregate(x0, m).requires_grad_(True)
            got = fn(ax)
            out[name] = got.detach()
            if got.requires_grad:
                got.sum().backward()
                out[name + " grad"] = to_plain(ax.grad)
        index = torch.randint(-n, n, (2 * n + 1,), generator=torch.Generator().manual_seed(6))
        for name, fn in SELECTIONS.items():
            ax = aggregate(x0, m).requires_grad_(True)
            got = fn(ax, ax[:, 0] > 0, index)
            out[name] = to_plain(got.detach())
            (got * aggregate(rows_of(got.shape[0], 7), m)).sum().backward()
            out[name + " grad"] = to_plain(ax.grad)
        for name, fn in EXTRA.items():
            got = fn(aggregate(x0, m))
            out[name] = tuple(to_plain(t) for t in got) if isinstance(got, tuple) else to_plain(got)
        z = aggregate(x0, m)
        z.index_put_((index % n,), aggregate(y0, m)[index % n], accumulate=True)
        z[z[:, 1] > 0] = 0.0
        out["row writes"] = to_plain(z)
        p = parameter(x0, m)
        adam = torch.optim.Adam([p], lr=0.1)
        for _ in range(2):
            adam.zero_grad()
            (p * p).sum().backward()
            adam.step()
        out["adam"] = (to_plain(p.detach()), to_plain(adam.state[p]["exp_avg"]), to_plain(adam.state[p]["exp_avg_sq"]))
    ranks = m.ranks
    crossing = {k: sum(b for (s, r), b in exchange_counts(k).items() if ranks[s] != ranks[r]) for k in KINDS}
    out["_counts"] = exchange_counts()
    out["_crossing"], out["_wire"] = crossing, wire_totals()
    out["_fallbacks"] = fallback_counts()
    return out


def _equal(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("world,local,n", [(2, "cpu", 300), (2, "cpu:2", 520), (3, "cpu", 300), (2, "cpu:2", 3)])
def test_ranks_give_the_bits_of_one_process(tmp_path: Path, world: int, local: str, n: int):
    per_rank = run_ranks(world, program, local, n, tmp=tmp_path)
    total = world * (int(local.split(":")[1]) if ":" in local else 1)
    one = program(f"cpu:{total}", n, CPU_ROW_ALIGN)  # laid out as the ranks are
    assert one["_fallbacks"] == {}
    for rank, got in enumerate(per_rank):
        assert got["_fallbacks"] == {}, rank
        for name, value in one.items():
            if not name.startswith("_"):
                assert _equal(got[name], value), f"rank {rank} of {world}: {name}"
        for kind in KINDS:  # what the exchange counted as crossing ranks is what went to torch.distributed
            assert got["_crossing"][kind] == got["_wire"].get(kind, 0), (rank, kind, got["_crossing"], got["_wire"])
    assert any(got["_wire"].get("other", 0) > 0 for got in per_rank), "rows should have crossed ranks"
