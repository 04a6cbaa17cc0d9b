"""Per-member figures while training: the scalars reach the event file of a short `ns-train` run, and the
memory and count helpers agree with the tensors they describe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ms_splatfacto.observability import MemberMonitor, member_counts, member_memory, phase, track
from tests.conftest import REPO
from tests.test_model_step import make_model

STEPS, MEMBERS = 4, 3
LAUNCHER = """
import sys
from ms_splatfacto.model import MsSplatfactoModel
from ms_splatfacto.observability import MemberMonitor, member_callbacks

original = MsSplatfactoModel.get_training_callbacks

def with_member_callbacks(self, attributes):
    callbacks = original(self, attributes)
    if not any(isinstance(getattr(c.func, "__self__", None), MemberMonitor) for c in callbacks):  # not wired yet
        callbacks = callbacks + member_callbacks(self)
    return callbacks

MsSplatfactoModel.get_training_callbacks = with_member_callbacks
from nerfstudio.scripts.train import entrypoint
sys.argv = ["ns-train", *sys.argv[1:]]
entrypoint()
"""


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory, lund_tiny: Path) -> EventAccumulator:
    out = tmp_path_factory.mktemp("observe")
    args = [
        "ms-splatfacto", "--output-dir", str(out), "--max-num-iterations", str(STEPS), "--vis", "tensorboard",
        "--logging.steps-per-log", "1", "--viewer.quit-on-train-completion", "True", "--steps-per-eval-image", "100000",
        "--steps-per-eval-all-images", "100000", "--steps-per-save", "100000", "--pipeline.model.num-downscales", "0",
        "--pipeline.model.devices", f"cpu:{MEMBERS}", "colmap", "--data", str(lund_tiny), "--colmap-path", "sparse/0",
    ]
    result = subprocess.run([sys.executable, "-c", LAUNCHER, *args], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (path,) = out.glob("*/ms-splatfacto/*/events.out.tfevents.*")
    accumulator = EventAccumulator(str(path))
    accumulator.Reload()
    return accumulator


def values(events: EventAccumulator, tag: str) -> dict:
    return {e.step: e.value for e in events.Scalars(tag)}


def test_per_member_scalars_are_in_the_event_file(events: EventAccumulator):
    tags = set(events.Tags()["scalars"])
    for key in ("gaussians", "memory_MB", "sent_bytes", "received_bytes"):
        for d in range(MEMBERS):
            assert f"Members/{key}/member{d}" in tags, (key, d)
    total = values(events, "Train Metrics Dict/gaussian_count")
    per_member = [values(events, f"Members/gaussians/member{d}") for d in range(MEMBERS)]
    assert set(total) == set(range(STEPS))
    for step, count in total.items():
        counts = [m[step] for m in per_member]
        assert sum(counts) == count and max(counts) - min(counts) <= 1, (step, counts)
    for step in total:
        memory = [values(events, f"Members/memory_MB/member{d}")[step] for d in range(MEMBERS)]
        # parameters (59 floats at SH 3) at least, on every member
        assert all(mb * 1e6 >= 59 * 4 * n[step] for mb, n in zip(memory, per_member)), (step, memory)
        sent = sum(values(events, f"Members/sent_bytes/member{d}")[step] for d in range(MEMBERS))
        received = sum(values(events, f"Members/received_bytes/member{d}")[step] for d in range(MEMBERS))
        assert sent == received > 0


def test_member_memory_counts_parameters_gradients_adam_and_statistics():
    model = make_model("cpu:4")
    optimizers = {name: torch.optim.Adam(p, lr=1e-3) for name, p in model.get_gaussian_param_groups().items()}
    model.optimizers = optimizers
    assert member_counts(model) == [150] * 4
    params_only = member_memory(model)
    assert params_only == [150 * 59 * 4] * 4
    for p in model.gauss_params.values():
        p.grad = torch.zeros_like(p)
    for optimizer in optimizers.values():
        optimizer.step()
    assert member_memory(model) == [150 * 59 * 4 * 4] * 4  # parameters, gradients, two Adam moments
    monitor = MemberMonitor(model)
    monitor.before_step(0)
    monitor.after_step(1)
    assert monitor.last["sent_bytes"] == [0] * 4 and monitor.table(1).row_count == 4
    model.strategy.refine_start_iter, model.strategy.refine_every, model.strategy.pause_refine_after_reset = 1, 2, 0
    assert [s for s in range(8) if monitor.refined(s)] == [2, 4, 6]


def test_progress_helpers_run_to_completion():
    with phase("writing a checkpoint") as advance:
        advance()
    assert list(track(range(3), "exporting")) == [0, 1, 2]


def test_byte_progress_shows_bytes_and_rate(capsys):
    """A bar whose total is known only once the phase has begun, in bytes; rich prints it finished once
    when the output is not a terminal."""
    with phase("writing checkpoint step-1", unit="bytes") as advance:
        advance(0, total=3_000_000)
        for _ in range(3):
            advance(1_000_000)
    out = capsys.readouterr().out
    assert "writing checkpoint step-1" in out and "100%" in out and "3.0/3.0 MB" in out and "/s" in out, out


def test_progress_only_on_rank_0(capsys, monkeypatch):
    from ms_splatfacto.backend.aggregate import world

    monkeypatch.setattr(world, "rank", lambda: 1)
    with phase("exporting", unit="bytes") as advance:
        advance(10, total=10)
    assert "exporting" not in capsys.readouterr().out
