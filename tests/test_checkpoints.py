"""Checkpoints across member counts: saved on cpu:4, resumed on cpu:1 and cpu:3 bit for bit (parameters,
Adam moments, learning rates, densification statistics, and the next step with its refinement); refused
with one line when they do not fit the model; never left half-written by a killed save."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch
from nerfstudio.configs.method_configs import all_methods
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.engine.optimizers import Optimizers
from nerfstudio.pipelines.base_pipeline import VanillaPipeline
from torch.cuda.amp.grad_scaler import GradScaler

from ms_splatfacto.backend.aggregate import is_aggregate, to_plain
from ms_splatfacto.checkpoints import checkpoint_state, read_checkpoint, restore
from ms_splatfacto.errors import InputError
from ms_splatfacto.io import atomic_torch_save
from ms_splatfacto.model import GAUSSIAN_PARAMS, MsSplatfactoModelConfig
from tests.conftest import REPO, ns
from tests.test_model_step import camera_and_image

SAVE_STEP = 3
"""Saved between refinements (statistics half gathered); the step after it refines."""


class ModelPipeline(VanillaPipeline):
    """nerfstudio's pipeline (its state dict and `load_pipeline`) around a model, without a datamanager."""

    def __init__(self, model) -> None:
        torch.nn.Module.__init__(self)
        self._model = model


def build(spec: str, sh_degree: int = 3) -> Tuple[ModelPipeline, Optimizers]:
    """The model of tests/test_model_step.py on `spec`, with the method's optimizers and schedulers."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    points = torch.randn(600, 3, generator=g) * torch.tensor([1.5, 1.0, 0.5]) + torch.tensor([0.0, 0.0, -5.0])
    colors = torch.randint(0, 256, (600, 3), generator=g, dtype=torch.uint8)
    config = MsSplatfactoModelConfig(
        devices=spec, sh_degree=sh_degree, warmup_length=1, refine_every=2, densify_grad_thresh=2e-4,
        sh_degree_interval=2, background_color="black",
    )
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-3.0] * 3, [3.0] * 3])), num_train_data=1, seed_points=(points, colors))
    model.train()
    return ModelPipeline(model), Optimizers(all_methods["ms-splatfacto"].optimizers, model.get_param_groups())


def train_step(pipeline: ModelPipeline, optimizers: Optimizers, step: int) -> None:
    """One step as the trainer takes it (callbacks, loss, Adam, schedulers, densification)."""
    model = pipeline.model
    model.step_cb(optimizers, step)
    camera, batch = camera_and_image()
    loss = sum(model.get_loss_dict(model.get_outputs(camera), batch).values())
    optimizers.zero_grad_all()
    loss.backward()
    optimizers.optimizer_step_all()
    optimizers.scheduler_step_all(step)
    model.step_post_backward(step)


def snapshot(pipeline: ModelPipeline, optimizers: Optimizers) -> Dict[str, torch.Tensor]:
    """Plain copies of everything training carries: parameters, Adam state, learning rates, statistics."""
    model, out = pipeline.model, {}
    for name in GAUSSIAN_PARAMS:
        p = model.gauss_params[name]
        optimizer = optimizers.optimizers[name]
        assert optimizer.param_groups[0]["params"][0] is p, f"the {name} optimizer holds a stale tensor"
        out[name] = to_plain(p.detach()).clone()
        out.update({f"{name}.{key}": to_plain(value).clone() for key, value in optimizer.state[p].items()})
        out[f"{name}.lr"] = torch.tensor(float(optimizer.param_groups[0]["lr"]), dtype=torch.float64)
    out.update({f"strategy.{k}": to_plain(v).clone() for k, v in model.strategy_state.items() if torch.is_tensor(v)})
    return out


def assert_same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [key for key in a if a[key].shape != b[key].shape or not torch.equal(a[key], b[key])]
    assert not differ, f"differ: {differ}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    """A cpu:4 run saved after step SAVE_STEP, its state then, and its state after one more step."""
    pipeline, optimizers = build("cpu:4")
    for step in range(SAVE_STEP + 1):
        train_step(pipeline, optimizers, step)
    path = tmp_path_factory.mktemp("ckpt") / f"step-{SAVE_STEP:09d}.ckpt"
    atomic_torch_save(checkpoint_state(SAVE_STEP, pipeline, optimizers, GradScaler(enabled=False)), path)
    at_save, rows = snapshot(pipeline, optimizers), pipeline.model.num_points
    torch.manual_seed(5)  # the split's noise
    train_step(pipeline, optimizers, SAVE_STEP + 1)
    assert pipeline.model.num_points > rows, "the step after the save should refine"
    return path, at_save, snapshot(pipeline, optimizers)


def test_checkpoint_records_the_layout(saved):
    path, at_save, _ = saved
    loaded = torch.load(path, weights_only=True)
    rows = at_save["means"].shape[0]
    assert loaded["layout"] == {
        "format": 1, "method": "ms-splatfacto", "devices": "cpu:4", "members": 4,
        "rows_per_member": [rows // 4 + (d < rows % 4) for d in range(4)], "num_gaussians": rows,
        "sh_degree": 3, "features_rest": [15, 3],
    }
    assert not any(is_aggregate(t) for t in loaded["pipeline"].values())
    assert torch.equal(loaded["pipeline"]["_model.gauss_params.means"], at_save["means"])  # global row order


@pytest.mark.parametrize("spec", ["cpu:1", "cpu:3"])
def test_resume_on_another_member_count_is_bit_exact(saved, spec: str):
    path, at_save, after_next = saved
    pipeline, optimizers = build(spec)
    restore(read_checkpoint(path), pipeline, optimizers, GradScaler(enabled=False))
    model = pipeline.model
    for name in GAUSSIAN_PARAMS:
        p = model.gauss_params[name]
        assert is_aggregate(p) and str(p.members) == spec and max(p._layout.counts) - min(p._layout.counts) <= 1
        assert all(is_aggregate(optimizers.optimizers[name].state[p][k]) for k in ("exp_avg", "exp_avg_sq"))
    assert_same(snapshot(pipeline, optimizers), at_save)
    torch.manual_seed(5)
    train_step(pipeline, optimizers, SAVE_STEP + 1)
    assert_same(snapshot(pipeline, optimizers), after_next)


def damaged(path: Path, tmp_path: Path, damage: str) -> Path:
    """A copy of the checkpoint at `path` with `damage` done to it."""
    out = tmp_path / path.name
    if damage == "truncated":
        out.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return out
    state = torch.load(path, weights_only=True)
    gaussians = [k for k in state["pipeline"] if k.startswith("_model.gauss_params.")]
    if damage == "not a checkpoint":
        state = {"step": 3, "means": state["pipeline"]["_model.gauss_params.means"]}
    elif damage == "another method":
        state["pipeline"] = {"_model.field.mlp_base.params": torch.zeros(8)}
        del state["layout"]
    elif damage == "missing key":
        del state["pipeline"]["_model.gauss_params.opacities"]
    elif damage == "layout of another method":
        state["layout"]["method"] = "splatfacto-w"
    elif damage == "count differs from layout":
        state["layout"]["num_gaussians"] += 1
    elif damage == "optimizer moments":
        state["optimizers"]["scales"]["state"][0]["exp_avg"] = torch.zeros(5, 3)
    elif damage == "optimizer of another model":
        state["optimizers"]["field"] = state["optimizers"].pop("means")
    assert gaussians
    torch.save(state, out)
    return out


@pytest.mark.parametrize(
    "damage, sh_degree, message",
    [
        ("truncated", 3, r"Cannot read checkpoint .*step-000000003.ckpt \(.*\); it may be truncated"),
        ("not a checkpoint", 3, r"is not a nerfstudio checkpoint: it lacks pipeline, optimizers, scalers"),
        ("another method", 3, r"holds no splatfacto model: it lacks gauss_params.means, .* \(it holds field.mlp_base.params"),
        ("missing key", 3, r"lacks gauss_params.opacities \(it holds"),
        ("layout of another method", 3, r"written by splatfacto-w, not ms-splatfacto"),
        ("count differs from layout", 3, r"layout records \d+ Gaussians, its parameters hold \d+"),
        ("optimizer moments", 3, r"scales optimizer exp_avg has shape \[5, 3\], its parameter \[\d+, 3\]"),
        ("optimizer of another model", 3, r"optimizer state does not fit the model: state for field the model lacks"),
        ("none", 1, r"checkpoint has SH degree 3 \(features_rest \[\d+, 15, 3\]\), the model --pipeline.model.sh-degree 1 \(features_rest \[N, 3, 3\]\)"),
    ],
)
def test_checkpoint_that_does_not_fit_is_refused_in_one_line(saved, tmp_path: Path, damage: str, sh_degree: int, message: str):
    path = saved[0] if damage == "none" else damaged(saved[0], tmp_path, damage)
    pipeline, optimizers = build("cpu:1", sh_degree)
    with pytest.raises(InputError, match=message) as refusal:
        restore(read_checkpoint(path), pipeline, optimizers, GradScaler(enabled=False))
    assert "\n" not in str(refusal.value) and str(refusal.value).startswith("ms-splatfacto: ")


def test_ns_train_load_dir_refuses_another_sh_degree_in_one_line(saved, tmp_path: Path, lund_tiny: Path):
    """Through nerfstudio's --load-dir, with a stray temporary in the folder (which nerfstudio's own
    loader would take for a step number)."""
    folder = tmp_path / "nerfstudio_models"
    folder.mkdir()
    (folder / saved[0].name).write_bytes(saved[0].read_bytes())
    (folder / ".step-000000100.ckpt.x.tmp").write_bytes(b"half")
    result = ns(
        "ns-train", "ms-splatfacto", "--output-dir", str(tmp_path / "out"), "--max-num-iterations", "5",
        "--vis", "tensorboard", "--load-dir", str(folder), "--pipeline.model.sh-degree", "1",
        "--pipeline.model.devices", "cpu:3", "colmap", "--data", str(lund_tiny), "--colmap-path", "sparse/0", check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output[-3000:]
    assert "ms-splatfacto: The checkpoint has SH degree 3" in output and "sh-degree 1" in output, output[-3000:]


CHILD = r"""
import sys, time, torch
from pathlib import Path
from ms_splatfacto.backend.aggregate import aggregate
from ms_splatfacto.io import atomic_torch_save
target = Path(sys.argv[1])
atomic_torch_save({"step": 1, "means": aggregate(torch.arange(12.0).reshape(4, 3), "cpu:4")}, target, target.parent.parent)
print("saved", flush=True)
written = 0

def stall_after_a_mebibyte(n, total):  # the kill then lands midway on any machine, fast or slow
    global written
    written += n
    if written >= 1 << 20:
        print("midway", flush=True)
        time.sleep(600)

atomic_torch_save({"step": 2, "means": torch.ones(1 << 22)}, target, target.parent.parent, progress=stall_after_a_mebibyte)
print("done", flush=True)
"""


def test_save_killed_midway_leaves_the_previous_checkpoint(tmp_path: Path):
    folder = tmp_path / "nerfstudio_models"
    folder.mkdir(parents=True)
    target = folder / "step-000000001.ckpt"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(target)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        for wanted in ("saved", "midway"):
            ready, _, _ = select.select([child.stdout], [], [], 300)
            assert ready and child.stdout.readline().strip() == wanted
        partial = [p for p in folder.parent.glob(".step-000000001.ckpt.*.tmp") if p.stat().st_size > 0]
        assert partial, "no partial file with bytes in it beside the folder"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    loaded = torch.load(target, weights_only=True)
    assert loaded["step"] == 1 and torch.equal(loaded["means"], torch.arange(12.0).reshape(4, 3))
    assert [p.name for p in folder.iterdir()] == [target.name]  # the partial file lies beside the folder
    assert partial[0].exists()  # killed before the rename
