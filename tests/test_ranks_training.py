"""Whole training steps of MsSplatfactoModel (forward, banded loss, backward, Adam, densification
statistics and a refinement with its Morton re-order) on ranks that each hold only their own members
(separate processes, gloo on loopback) give bit for bit what one process gives with the same members
and with one member, without any fallback; and what crosses ranks goes through torch.distributed."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest
import torch

from ms_splatfacto.backend.aggregate import exchange_totals, reset_exchange, to_plain, wire_totals
from ms_splatfacto.model import GAUSSIAN_PARAMS
from ms_splatfacto.observability import member_memory
from tests.ranks import run_ranks
from tests.test_model_step import train_steps


def snapshot(spec: str) -> Dict[str, object]:
    """A few training steps on `spec` (this rank's members), as ordinary tensors (collectives: every
    rank takes part)."""
    reset_exchange()
    model, optimizers, log, fallbacks = train_steps(spec)
    out: Dict[str, object] = {"log": log, "fallbacks": fallbacks, "members": str(model.members)}
    for name in GAUSSIAN_PARAMS:
        p = model.gauss_params[name]
        state = optimizers[name].state[p]
        out[name] = to_plain(p.detach())
        out[name + " exp_avg"] = to_plain(state["exp_avg"])
        out[name + " exp_avg_sq"] = to_plain(state["exp_avg_sq"])
    for key, value in model.strategy_state.items():
        if torch.is_tensor(value) and value.dim() > 0:
            out["strategy " + key] = to_plain(value)
    out["exchange"], out["wire"] = exchange_totals(), wire_totals()
    out["member_memory"] = member_memory(model)  # a collective: every rank's members, numbered globally
    return out


@pytest.fixture(scope="module")
def one_process() -> Dict[str, Dict[str, object]]:
    return {spec: snapshot(spec) for spec in ("cpu", "cpu:4")}


@pytest.mark.parametrize("world,local,same_as", [(2, "cpu", "cpu"), (2, "cpu:2", "cpu:4")])
def test_ranks_train_like_one_process(tmp_path: Path, one_process, world: int, local: str, same_as: str):
    reference = one_process[same_as]
    assert reference["log"][-1][1] > reference["log"][0][1], "the refinement should have grown the model"
    assert one_process["cpu"]["log"] == one_process["cpu:4"]["log"]
    per_rank = run_ranks(world, snapshot, local, tmp=tmp_path)
    # the remote reads and gradient reduce-scatter of the rasterizer really crossed the process boundary
    assert sum(got["wire"].get("remote_read", 0) for got in per_rank) > 0
    assert sum(got["wire"].get("reduce_scatter", 0) for got in per_rank) > 0
    memory = [got["member_memory"] for got in per_rank]
    members_total = world * (int(local.split(":")[1]) if ":" in local else 1)
    assert memory[0] == memory[1] and len(memory[0]) == members_total
    assert min(memory[0]) > 0 and sum(memory[0]) == sum(one_process[same_as]["member_memory"]), "the same bytes, wherever the rows live"
    for rank, got in enumerate(per_rank):
        assert got["members"] == f"{world} ranks x {local}" and got["fallbacks"] == {}, rank
        assert got["log"] == reference["log"], rank
        for key, value in reference.items():
            if torch.is_tensor(value):
                assert torch.equal(got[key], value), f"rank {rank}: {key}"
                assert torch.equal(got[key], one_process["cpu"][key]), f"rank {rank}: {key} (one member)"
        # with one member per rank everything the exchange counted is what torch.distributed was handed
        if local == "cpu":
            assert got["exchange"] == {k: got["wire"].get(k, 0) for k in got["exchange"]}, (rank, got["exchange"], got["wire"])
