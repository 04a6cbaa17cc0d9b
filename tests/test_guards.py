"""Numerical guards of MsTrainer.train_iteration: a step with a non-finite gradient or loss is skipped
(parameters, Adam state, learning rates and densification statistics untouched) and counted, no
checkpoint is written from non-finite parameters, and `max_nonfinite_steps` bad steps in a row stop
training with one line naming what went bad first."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from nerfstudio.configs.method_configs import all_methods

from ms_splatfacto.backend.aggregate import is_aggregate, to_plain
from ms_splatfacto.checkpoints import read_checkpoint
from ms_splatfacto.errors import TrainingStopped
from ms_splatfacto.trainer import MsTrainer
from tests.test_checkpoints import ModelPipeline, assert_same, build, snapshot
from tests.test_model_step import camera_and_image


class TrainPipeline(ModelPipeline):
    """The test model as a training pipeline: one fixed camera and image per step."""

    def get_train_loss_dict(self, step: int):
        camera, batch = camera_and_image()
        outputs = self.model.get_outputs(camera)
        return outputs, self.model.get_loss_dict(outputs, batch), {}


def make_trainer(tmp_path: Path, max_nonfinite_steps: int) -> MsTrainer:
    config = copy.deepcopy(all_methods["ms-splatfacto"])
    config.output_dir, config.max_nonfinite_steps = tmp_path, max_nonfinite_steps
    config.pipeline.model.devices = "cpu:4"
    trainer = config.setup(local_rank=0, world_size=1)
    pipeline, trainer.optimizers = build("cpu:4")
    trainer.pipeline = TrainPipeline(pipeline.model)
    return trainer


def iteration(trainer: MsTrainer, step: int):
    """What nerfstudio's training loop runs per step: callbacks around train_iteration."""
    model = trainer.pipeline.model
    model.step_cb(trainer.optimizers, step)
    out = trainer.train_iteration(step)
    model.step_post_backward(step)
    return out


def test_nan_gradient_is_skipped_counted_and_kept_out_of_the_checkpoint(tmp_path: Path):
    trainer = make_trainer(tmp_path, max_nonfinite_steps=3)
    model = trainer.pipeline.model
    for step in range(2):
        iteration(trainer, step)
    before = snapshot(trainer.pipeline, trainer.optimizers)
    hook = model.gauss_params["scales"].register_hook(lambda grad: grad * float("nan"))
    loss, _, metrics = iteration(trainer, 2)  # a refinement step: skipped, it must not refine either
    hook.remove()
    assert torch.isfinite(loss) and trainer.nonfinite_steps == 1 and metrics["nonfinite_steps"] == 1
    assert trainer.nonfinite_streak == (2, 1, "the gradient of gauss_params.scales")
    assert_same(snapshot(trainer.pipeline, trainer.optimizers), before)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())

    trainer.save_checkpoint(2)
    saved = read_checkpoint(trainer.checkpoint_dir / "step-000000002.ckpt")  # cpu:4 writes the sharded format
    gaussians = {k[len("_model.gauss_params."):]: v for k, v in saved["pipeline"].items() if k.startswith("_model.gauss_params.")}
    assert all(torch.isfinite(v).all() for v in gaussians.values()) and torch.equal(gaussians["scales"], before["scales"])
    assert saved["layout"]["devices"] == "cpu:4" and saved["layout"]["num_gaussians"] == before["means"].shape[0]

    _, _, metrics = iteration(trainer, 3)  # a good step trains again and ends the streak
    assert trainer.nonfinite_streak is None and metrics["nonfinite_steps"] == 1
    assert not torch.equal(to_plain(model.gauss_params["scales"].detach()), before["scales"])


def test_bad_steps_in_a_row_stop_training_naming_the_first(tmp_path: Path):
    trainer = make_trainer(tmp_path, max_nonfinite_steps=3)
    model = trainer.pipeline.model
    scales = model.gauss_params["scales"]
    hook = scales.register_hook(lambda grad: grad * float("inf"))
    iteration(trainer, 0)
    iteration(trainer, 1)
    hook.remove()
    iteration(trainer, 2)  # one good step: the streak starts again
    with torch.no_grad():  # a parameter gone bad makes the loss NaN, and is named as the cause
        model.gauss_params["features_dc"].mul_(torch.tensor([float("nan"), 1.0, 1.0]))
    for step in (3, 4):
        iteration(trainer, step)
    assert trainer.nonfinite_steps == 4 and trainer.nonfinite_streak == (3, 2, "parameter gauss_params.features_dc")
    trainer.save_checkpoint(4)
    assert not trainer.checkpoint_dir.exists() or not list(trainer.checkpoint_dir.iterdir()), "written from NaN parameters"
    with pytest.raises(TrainingStopped) as stop:
        iteration(trainer, 5)
    message = str(stop.value)
    assert "\n" not in message and message.startswith("ms-splatfacto: Training stopped after 3 steps in a row")
    assert "from step 3 on: parameter gauss_params.features_dc went bad first" in message
    assert is_aggregate(model.gauss_params["scales"]) and trainer.nonfinite_steps == 5
