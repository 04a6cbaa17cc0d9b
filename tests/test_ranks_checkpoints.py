"""Checkpoints and launch across ranks (gloo on loopback, one thread per rank): a sharded checkpoint
written by 2 ranks (1 and 2 members each) loads in one process (cpu, cpu:3) and on 3 ranks with the
same parameters, Adam moments and statistics bit for bit; a one-process checkpoint (one member: a file;
four: a sharded folder) loads on 2 ranks;
an incomplete one is refused in one line; ranks that disagree at start-up are refused in one line; a
peer that goes away stops the others in one line; `ns-train --load-dir` resumes bit for bit.
The killed-rank torchrun run is marked slow; the other end-to-end torchrun runs are in test_ranks_e2e.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

import psutil
import pytest
import torch
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.engine.optimizers import AdamOptimizerConfig, Optimizers
from nerfstudio.pipelines.base_pipeline import VanillaPipeline
from torch.amp.grad_scaler import GradScaler

from ms_splatfacto.backend.aggregate import aggregate, is_aggregate, to_plain, world
from ms_splatfacto.checkpoints import checkpoint_path, checkpoint_state, read_checkpoint, restore, write_checkpoint
from ms_splatfacto.errors import InputError, TrainingStopped
from ms_splatfacto.model import MsSplatfactoModelConfig
from tests.conftest import BIN, REPO, TRAIN_ARGS, train
from tests.ranks import free_port, run_ranks

STEP = 7
"""The step the checkpoints here are saved at."""

# Spawned ranks import this module: it stays clear of nerfstudio's method registry (13 s per process).


class ModelPipeline(VanillaPipeline):
    """nerfstudio's pipeline (its state dict and `load_pipeline`) around a model, without a datamanager."""

    def __init__(self, model) -> None:
        torch.nn.Module.__init__(self)
        self._model = model


def build(spec: str):
    """tests/test_checkpoints.py's 600-Gaussian model on `spec`, with an Adam optimizer per parameter."""
    g = torch.Generator().manual_seed(0)
    points = torch.randn(600, 3, generator=g) * torch.tensor([1.5, 1.0, 0.5]) + torch.tensor([0.0, 0.0, -5.0])
    colors = torch.randint(0, 256, (600, 3), generator=g, dtype=torch.uint8)
    torch.manual_seed(0)
    config = MsSplatfactoModelConfig(devices=spec, sh_degree=3, background_color="black")
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-3.0] * 3, [3.0] * 3])), num_train_data=1, seed_points=(points, colors))
    groups = model.get_param_groups()
    adam = {name: {"optimizer": AdamOptimizerConfig(lr=1e-3 * (i + 1), eps=1e-15), "scheduler": None} for i, name in enumerate(groups)}
    return ModelPipeline(model), Optimizers(adam, groups)


def snapshot(pipeline, optimizers) -> Dict[str, torch.Tensor]:
    """Plain copies (all rows) of the parameters, their Adam state and the densification statistics."""
    model, out = pipeline.model, {}
    for name, p in model.gauss_params.items():
        out[name] = to_plain(p.detach())
        out.update({f"{name}.{k}": to_plain(v) for k, v in optimizers.optimizers[name].state[p].items()})
    out.update({f"strategy.{k}": to_plain(v) for k, v in model.strategy_state.items() if torch.is_tensor(v)})
    return out


def assert_same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f"differ: {differ}"


def trained_state(spec: str):
    """The test model on `spec` with Adam moments (two steps of fixed gradients) and densification
    statistics, built directly: no rendering, so it needs nothing of the multi-rank training step."""
    pipeline, optimizers = build(spec)
    model = pipeline.model
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        for name, p in model.gauss_params.items():
            p.grad = aggregate(torch.randn(p.shape, generator=g), model.members)
        optimizers.optimizer_step_all()
    n = model.num_points
    model.strategy_state["grad2d"] = aggregate(torch.rand(n, generator=g), model.members)
    model.strategy_state["count"] = aggregate(torch.randint(0, 9, (n,), generator=g).float(), model.members)
    return pipeline, optimizers


def save_program(spec: str, folder: str) -> Dict[str, torch.Tensor]:
    """On each rank: train-like state on this rank's members `spec`, saved; its snapshot."""
    pipeline, optimizers = trained_state(spec)
    path = write_checkpoint(checkpoint_state(STEP, pipeline, optimizers, GradScaler("cpu", enabled=False)), Path(folder), STEP)
    assert path.is_dir() == world.active()
    return snapshot(pipeline, optimizers)


def load_program(spec: str, path: str) -> Dict[str, torch.Tensor]:
    """On each rank: a fresh model on `spec` restored from `path`; its snapshot (all rows)."""
    pipeline, optimizers = build(spec)
    model = pipeline.model
    restore(read_checkpoint(Path(path), model.members), pipeline, optimizers, GradScaler("cpu", enabled=False))
    for name, p in model.gauss_params.items():
        assert is_aggregate(p) and p.members is model.members and optimizers.optimizers[name].param_groups[0]["params"][0] is p
        for key in ("exp_avg", "exp_avg_sq"):
            moment = optimizers.optimizers[name].state[p][key]
            assert is_aggregate(moment) and moment._layout is p._layout, f"{name} {key} is not striped like its rows"
    assert is_aggregate(model.strategy_state["grad2d"])
    return snapshot(pipeline, optimizers)


@pytest.fixture(scope="module", params=["cpu", "cpu:2"], ids=["2x1", "2x2"])
def sharded(request, tmp_path_factory: pytest.TempPathFactory):
    """A checkpoint written by 2 ranks of `param` members each, and the state it holds."""
    tmp = tmp_path_factory.mktemp("sharded")
    folder = tmp / "nerfstudio_models"
    first, second = run_ranks(2, save_program, request.param, str(folder), tmp=tmp)
    assert_same(first, second)  # every rank sees the same model
    return folder / f"step-{STEP:09d}.ckpt", first


@pytest.mark.parametrize("spec", ["cpu", "cpu:3"])
def test_sharded_checkpoint_loads_in_one_process(sharded, spec: str):
    path, saved = sharded
    files = sorted(p.name for p in path.iterdir())
    assert ".metadata" in files and sum(f.endswith(".distcp") for f in files) == 2, files  # one file per rank
    assert_same(load_program(spec, str(path)), saved)


def test_sharded_checkpoint_loads_on_three_ranks(sharded, tmp_path: Path):
    path, saved = sharded
    for got in run_ranks(3, load_program, "cpu", str(path), tmp=tmp_path):
        assert_same(got, saved)


@pytest.mark.parametrize("spec", ["cpu", "cpu:4"])
def test_one_process_checkpoint_loads_on_two_ranks(tmp_path: Path, spec: str):
    """One member writes one file, four members in one process a sharded folder: both load on 2 ranks."""
    pipeline, optimizers = trained_state(spec)
    path = write_checkpoint(checkpoint_state(STEP, pipeline, optimizers, GradScaler("cpu", enabled=False)), tmp_path / "models", STEP)
    assert path.is_file() == (spec == "cpu") and path.is_dir() == (spec == "cpu:4")
    saved = snapshot(pipeline, optimizers)
    for got in run_ranks(2, load_program, "cpu:2", str(path), tmp=tmp_path):
        assert_same(got, saved)


def test_incomplete_sharded_checkpoint_is_ignored_or_refused_in_one_line(sharded, tmp_path: Path):
    path, _ = sharded
    folder = tmp_path / "nerfstudio_models"
    folder.mkdir()
    complete = folder / path.name
    shutil.copytree(path, complete)
    shutil.copytree(path, tmp_path / ".step-000000099.ckpt.partial")  # a save killed before its rename
    assert checkpoint_path(folder, None) == complete  # the temporary beside the folder is never taken
    no_metadata = folder / "step-000000100.ckpt"
    shutil.copytree(path, no_metadata)
    (no_metadata / ".metadata").unlink()
    truncated = folder / "step-000000101.ckpt"
    shutil.copytree(path, truncated)
    shard = sorted(truncated.glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    for bad, message in [(no_metadata, "incomplete sharded checkpoint"), (truncated, "cannot read the shards")]:
        with pytest.raises(InputError, match=message) as refusal:
            read_checkpoint(bad)
        assert "\n" not in str(refusal.value) and str(refusal.value).startswith("ms-splatfacto: Cannot read checkpoint")


def agree_program(identity: Dict[str, str]):
    from ms_splatfacto import launch

    mine = launch.start_identity(_Config(), [torch.device("cuda" if world.rank() == 1 and identity.get("cuda") else "cpu")])
    mine.update({k: v for k, v in identity.items() if k != "cuda" and world.rank() == 1})
    try:
        launch.agree(mine)
    except InputError as err:
        return str(err)
    return None


class _Config:
    """The few settings `start_identity` reads."""

    class pipeline:
        class datamanager:
            data = REPO.parent / "shared" / "data" / "lund_tiny"

    class machine:
        seed = 42

    max_num_iterations = 100


@pytest.mark.parametrize(
    "difference, message",
    [
        ({"cuda": "1"}, r"disagree on the member device type: rank 0 has cpu, rank 1 has cuda"),
        ({"dataset": "3 files, 10 bytes (digest 0)"}, r"disagree on the dataset: rank 0 has \d+ files, \d+ bytes .*, rank 1 has 3 files"),
        ({"code version": "0.0.1+deadbeef"}, r"disagree on the code version: rank 0 has .*, rank 1 has 0.0.1\+deadbeef"),
    ],
)
def test_ranks_that_disagree_at_start_up_are_refused_in_one_line(tmp_path: Path, difference, message):
    for refusal in run_ranks(2, agree_program, difference, tmp=tmp_path):
        assert refusal is not None and "\n" not in refusal, refusal
        assert refusal.startswith("ms-splatfacto: The ranks disagree") and __import__("re").search(message, refusal), refusal


def lost_peer_program():
    """Rank 1 leaves the process group; rank 0's next collective must stop with one line."""
    import torch.distributed as dist

    from ms_splatfacto import launch

    if world.rank() == 1:
        dist.destroy_process_group()
        return None
    time.sleep(1)
    try:
        with launch.collective_failures(Path("/ckpt")):
            dist.all_reduce(torch.ones(4))
    except TrainingStopped as err:
        return str(err)
    return "no failure"


def test_a_lost_peer_stops_the_others_in_one_line(tmp_path: Path):
    message, _ = run_ranks(2, lost_peer_program, tmp=tmp_path)
    assert message.startswith("ms-splatfacto: Rank 0 of 2 stopped: rank 1 died or did not answer") and "\n" not in message, message
    assert "The last complete checkpoint in /ckpt stays loadable" in message


RESUME_ARGS = [
    "--pipeline.model.warmup-length", "10", "--pipeline.model.refine-every", "10",
    "--pipeline.datamanager.camera-res-scale-factor", "0.5", "--pipeline.model.devices", "cpu:2",
]
"""Refinement every 10 steps, paused for the first epoch (26 training images + 10 steps), so the first
one (step 40) comes after the resume; half-size images keep it short."""


def comparable(path: Path) -> Dict[str, torch.Tensor]:
    """Every tensor and number of a checkpoint, flattened, so two checkpoints compare bit for bit."""
    out: Dict[str, torch.Tensor] = {}

    def walk(prefix: str, obj) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}/{i}", v)
        elif torch.is_tensor(obj):
            out[prefix] = obj
        elif isinstance(obj, (int, float, bool)):
            out[prefix] = torch.tensor(obj, dtype=torch.float64)

    walk("", read_checkpoint(path))
    return out


def test_resume_through_ns_train_is_bit_identical(tmp_path: Path, lund_tiny: Path):
    first = train(tmp_path / "first", lund_tiny, 25, *RESUME_ARGS)
    resumed = train(tmp_path / "resumed", lund_tiny, 25, "--load-dir", str(first.checkpoint_dir), *RESUME_ARGS)
    whole = train(tmp_path / "whole", lund_tiny, 50, *RESUME_ARGS)
    a, b = comparable(resumed.checkpoint_dir / "step-000000049.ckpt"), comparable(whole.checkpoint_dir / "step-000000049.ckpt")
    assert a["/layout/num_gaussians"] != comparable(first.checkpoint_dir / "step-000000024.ckpt")["/layout/num_gaussians"]
    assert_same(a, b)


def torchrun(output: Path, data: Path, steps: int, *extra: str, port: int, nproc: int = 2, node: str = ""):
    """`torchrun ... ns-train ms-splatfacto` on `nproc` ranks of one CPU member each (a Popen whose output
    goes to `output`/torchrun<node>.log: a pipe nobody reads would stall it)."""
    launcher = ["--nproc-per-node", str(nproc)] if not node else ["--nproc-per-node", "1", "--nnodes", "2", "--node-rank", node,
                                                                  "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]
    if not node:
        launcher += ["--master-port", str(port)]
    args = [str(BIN / "torchrun"), *launcher, str(BIN / "ns-train"), "ms-splatfacto", "--output-dir", str(output),
            "--experiment-name", "lund_tiny", "--max-num-iterations", str(steps), *TRAIN_ARGS, *extra,
            "colmap", "--data", str(data), "--colmap-path", "sparse/0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MS_SPLATFACTO_BACKEND="gloo")
    output.mkdir(parents=True, exist_ok=True)
    with open(output / f"torchrun{node}.log", "w") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)


# The 300-step torchrun runs (equal to cpu:1, read by ns-eval and ns-export, resumed across rank counts)
# are in tests/test_ranks_e2e.py.


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_killing_one_rank_stops_the_other_in_one_line_and_keeps_the_checkpoint(tmp_path: Path, lund_tiny: Path):
    port, timeout_s = free_port(), 30
    extra = ["--pipeline.datamanager.camera-res-scale-factor", "0.5", "--steps-per-save", "5", "--collective-timeout-s", str(timeout_s)]
    agents = [torchrun(tmp_path, lund_tiny, 100000, *extra, port=port, node="0")]
    try:
        while not _listening(port):  # the survivor's agent hosts the rendezvous store
            assert agents[0].poll() is None, (tmp_path / "torchrun0.log").read_text()[-3000:]
            time.sleep(0.2)
        agents.append(torchrun(tmp_path, lund_tiny, 100000, *extra, port=port, node="1"))
        deadline = time.monotonic() + 600
        while not [p for p in tmp_path.glob("lund_tiny/ms-splatfacto/*/nerfstudio_models/step-*.ckpt") if p.name >= "step-000000010"]:
            assert time.monotonic() < deadline and all(a.poll() is None for a in agents), "no checkpoint of step 10 or later"
            time.sleep(1)
        machine = psutil.Process(agents[1].pid)
        for process in [machine, *machine.children(recursive=True)]:  # the second "machine": its agent and its rank
            process.kill()
        killed = time.monotonic()
        agents[0].wait(timeout=timeout_s + 120)
        assert time.monotonic() - killed < timeout_s + 60, "the survivor took too long to stop"
    finally:
        for a in agents:
            with contextlib.suppress(psutil.NoSuchProcess):
                for process in [*psutil.Process(a.pid).children(recursive=True), psutil.Process(a.pid)]:
                    process.kill()
    assert agents[0].returncode != 0
    output = (tmp_path / "torchrun0.log").read_text()
    lines = [line for line in output.splitlines() if "ms-splatfacto: Rank 0 of 2 stopped" in line]
    assert lines and "rank 1 died or did not answer" in lines[0], output[-8000:]
    (models,) = tmp_path.glob("lund_tiny/ms-splatfacto/*/nerfstudio_models")
    latest = checkpoint_path(models, None)
    loaded = read_checkpoint(latest)
    assert loaded["step"] >= 10 and loaded["layout"]["members"] == 2
