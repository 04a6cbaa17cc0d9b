"""Host syncs per training step: where a GPU would wait for the device. A training iteration of
MsTrainer (forward, loss, backward, non-finite guard, Adam, densification statistics) reads device data
on the host at most 4 times whatever the member count: every per-member size is read for all members
at once (`host_syncs.read_ints`)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from nerfstudio.configs.method_configs import all_methods

from ms_splatfacto.backend.host_syncs import HostSyncCounter, read_ints
from ms_splatfacto.trainer import MsTrainer
from tests.test_checkpoints import build
from tests.test_guards import TrainPipeline, iteration

MAX_SYNCS_PER_STEP = 4


def make_trainer(tmp_path: Path, spec: str) -> MsTrainer:
    config = copy.deepcopy(all_methods["ms-splatfacto"])
    config.output_dir = tmp_path
    config.pipeline.model.devices = spec
    trainer = config.setup(local_rank=0, world_size=1)
    pipeline, trainer.optimizers = build(spec)
    trainer.pipeline = TrainPipeline(pipeline.model)
    return trainer


@pytest.mark.parametrize("spec", ["cpu", "cpu:4", "cpu:8"])
def test_a_training_step_reads_the_device_at_most_four_times(tmp_path: Path, spec: str):
    trainer = make_trainer(tmp_path, spec)
    iteration(trainer, 0)  # warm-up: kernels built, optimizer state made
    counts = []
    for step in (1, 2, 3):
        with HostSyncCounter() as syncs:
            loss, _, _ = iteration(trainer, step)
        counts.append(syncs.total)
        assert syncs.total <= MAX_SYNCS_PER_STEP, f"step {step} on {spec}: {dict(syncs.sites)}"
    assert torch.isfinite(loss)
    assert min(counts) > 0, "the counter saw no read at all: it is not watching the step"


def test_the_counter_sees_each_kind_of_read():
    """Each read the counter exists for, made from package code, is counted once (and torch's own are not)."""
    t = torch.tensor([3])
    with HostSyncCounter() as syncs:
        read_ints({0: t, 1: torch.tensor([1, 2])})  # one batched read
        torch.optim.Adam([torch.zeros(1, requires_grad=True)]).step()  # torch's own bookkeeping
    assert syncs.total == 1 and list(syncs.sites) == [next(iter(syncs.sites))]
    assert next(iter(syncs.sites)).startswith("host_syncs.py:")


def test_read_ints_returns_each_members_values():
    got = read_ints({2: torch.tensor([5, 6, 7]), 0: torch.zeros(0, dtype=torch.long), 1: torch.tensor([9], dtype=torch.int32)})
    assert got == {2: [5, 6, 7], 0: [], 1: [9]}
    with pytest.raises(AssertionError, match="integer"):
        read_ints({0: torch.tensor([1.5])})
