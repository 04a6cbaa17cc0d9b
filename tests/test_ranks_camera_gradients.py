"""Replicated inputs get their gradients: with nerfstudio's camera optimizer on, every member
differentiates the camera it reads (the reference kernels: the CPU projection kernel has no pose
gradient) and the members' pose gradients are summed, in member order on
every rank, so the pose gradient on several members (in one process or on ranks) is the one member's."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig

from tests.ranks import run_ranks
from tests.test_model_step import camera_and_image, make_model


def pose_gradient(spec: str) -> torch.Tensor:
    """d(loss)/d(pose adjustment) of one training camera ([1, 6]) on `spec` (this rank's members)."""
    model = make_model(spec, camera_optimizer=CameraOptimizerConfig(mode="SO3xR3"), kernels="reference")
    camera, batch = camera_and_image()
    camera.metadata = {"cam_idx": 0}
    model.step_cb(SimpleNamespace(optimizers={}), 0)
    outputs = model.get_outputs(camera)
    sum(model.get_loss_dict(outputs, batch).values()).backward()
    return model.camera_optimizer.pose_adjustment.grad.detach().clone()


def test_pose_gradients_on_members_and_ranks_equal_one_member(tmp_path: Path):
    one = pose_gradient("cpu")
    four = pose_gradient("cpu:4")
    assert one.abs().sum() > 0, "the loss should depend on the pose"
    # per-member partial sums add in another order than one member's: equal to float32 rounding
    torch.testing.assert_close(four, one, rtol=1e-4, atol=1e-7)
    ranks = run_ranks(2, pose_gradient, "cpu", tmp=tmp_path)
    assert torch.equal(ranks[0], ranks[1]), "every rank must hold the same (all-reduced) pose gradient"
    torch.testing.assert_close(ranks[0], one, rtol=1e-4, atol=1e-7)
