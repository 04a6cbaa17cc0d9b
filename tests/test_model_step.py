"""Whole training steps of MsSplatfactoModel (forward, loss, backward, Adam, densification statistics and
one refinement) on three or four CPU members give bit for bit the parameters of one member, without any
fallback: member partial sums are float64 and round once, like one member's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.scene_box import SceneBox

from ms_splatfacto.backend.aggregate import fallback_counts, is_aggregate, reset_fallback_counts, to_plain
from ms_splatfacto.model import GAUSSIAN_PARAMS, MsSplatfactoModelConfig

WIDTH, HEIGHT, STEPS = 64, 48, 5


def make_model(spec: str, **overrides):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    points = torch.randn(600, 3, generator=g) * torch.tensor([1.5, 1.0, 0.5]) + torch.tensor([0.0, 0.0, -5.0])
    colors = torch.randint(0, 256, (600, 3), generator=g, dtype=torch.uint8)
    config = MsSplatfactoModelConfig(
        devices=spec, warmup_length=1, refine_every=2, densify_grad_thresh=2e-4, sh_degree_interval=2,
        background_color="black", **overrides,
    )
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-3.0] * 3, [3.0] * 3])), num_train_data=1, seed_points=(points, colors))
    model.train()
    return model


def camera_and_image():
    g = torch.Generator().manual_seed(1)
    camera = Cameras(
        camera_to_worlds=torch.eye(4)[None, :3, :], fx=60.0, fy=60.0, cx=WIDTH / 2, cy=HEIGHT / 2, width=WIDTH, height=HEIGHT
    )
    image = torch.rand(HEIGHT, WIDTH, 3, generator=g)
    return camera, {"image": image}


def optimize(model, optimizers, loss, step: int) -> None:
    """What ns-train does with a step's loss: zero the gradients, backward, Adam, then the strategy's hook."""
    for optimizer in optimizers.values():
        optimizer.zero_grad()
    loss.backward()
    for optimizer in optimizers.values():
        optimizer.step()
    model.step_post_backward(step)


def train_steps(spec: str):
    model = make_model(spec)
    camera, batch = camera_and_image()
    lrs = {"means": 1.6e-4, "scales": 5e-3, "quats": 1e-3, "features_dc": 2.5e-3, "features_rest": 1.25e-4, "opacities": 5e-2}
    optimizers = {name: torch.optim.Adam(params, lr=lrs[name], eps=1e-15) for name, params in model.get_gaussian_param_groups().items()}
    torch.manual_seed(2)  # the split's noise
    reset_fallback_counts()
    log = []
    for step in range(STEPS):
        model.step_cb(SimpleNamespace(optimizers=optimizers), step)
        outputs = model.get_outputs(camera.to("cpu"))
        loss = sum(model.get_loss_dict(outputs, batch).values())
        optimize(model, optimizers, loss, step)
        log.append((float(loss), model.num_points))
    return model, optimizers, log, fallback_counts()


@pytest.fixture(scope="module")
def one_member():
    return train_steps("cpu")


@pytest.mark.parametrize("spec", ["cpu:4", "cpu:3"])
def test_training_steps_on_members_equal_one_member(one_member, spec: str):
    model1, optimizers1, log1, _ = one_member
    model4, optimizers4, log4, fallbacks = train_steps(spec)
    assert fallbacks == {}
    assert log1[-1][1] > log1[0][1], "the refinement at step 4 should have grown the model"
    assert [n for _, n in log4] == [n for _, n in log1]
    assert [loss for loss, _ in log4] == [loss for loss, _ in log1]
    for name in GAUSSIAN_PARAMS:
        p4 = model4.gauss_params[name]
        assert is_aggregate(p4) and str(p4.members) == spec
        assert max(p4._layout.counts) - min(p4._layout.counts) <= 1, f"{name} is not evenly striped"
        assert torch.equal(to_plain(p4.detach()), to_plain(model1.gauss_params[name].detach())), name
        state4 = optimizers4[name].state[p4]
        state1 = optimizers1[name].state[model1.gauss_params[name]]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(to_plain(state4[key]), to_plain(state1[key])), (name, key)
    for key in ("grad2d", "count", "radii"):
        assert torch.equal(to_plain(model4.strategy_state[key]), to_plain(model1.strategy_state[key])), key


def test_exporter_and_viewer_properties_are_ordinary_tensors():
    model = make_model("cpu:4")
    for name in GAUSSIAN_PARAMS:
        value = getattr(model, name)
        assert not is_aggregate(value)
        assert torch.equal(value, to_plain(model.gauss_params[name].detach()))
    assert model.num_points == 600


def batch_of_cameras(count: int):
    """`count` cameras around the seed cloud (one image size) and a random image for each."""
    g = torch.Generator().manual_seed(3)
    poses = torch.eye(4)[None, :3, :].repeat(count, 1, 1)
    poses[:, 0, 3] = torch.linspace(-0.4, 0.4, count)
    poses[:, 1, 3] = torch.linspace(0.2, -0.2, count)
    camera = Cameras(camera_to_worlds=poses, fx=60.0, fy=60.0, cx=WIDTH / 2, cy=HEIGHT / 2, width=WIDTH, height=HEIGHT)
    return camera, {"image": torch.rand(count, HEIGHT, WIDTH, 3, generator=g)}


def batched_step(spec: str):
    model = make_model(spec)
    camera, batch = batch_of_cameras(3)
    optimizers = {name: torch.optim.Adam(params, lr=1e-3) for name, params in model.get_gaussian_param_groups().items()}
    model.step_cb(SimpleNamespace(optimizers=optimizers), 0)
    outputs = model.get_outputs(camera)
    loss = model.get_loss_dict(outputs, batch)["main_loss"]
    loss.backward()
    for optimizer in optimizers.values():
        optimizer.step()
    model.step_post_backward(0)
    return model, outputs, loss


def test_a_batch_of_cameras_trains_alike_on_any_member_count():
    model1, outputs1, loss1 = batched_step("cpu")
    model4, outputs4, loss4 = batched_step("cpu:4")
    # [B * H, W, 3] over the members' pixel rows (at splatfacto's initial downscale)
    assert is_aggregate(outputs4["rgb"]) and outputs4["rgb"].shape[0] == 3 * model4.last_size[0]
    assert torch.equal(to_plain(outputs4["rgb"]), to_plain(outputs1["rgb"])) and float(loss4) == float(loss1)
    for name in GAUSSIAN_PARAMS:
        assert torch.equal(to_plain(model4.gauss_params[name].detach()), to_plain(model1.gauss_params[name].detach())), name
    assert torch.equal(to_plain(model4.strategy_state["count"]), to_plain(model1.strategy_state["count"]))
    assert to_plain(model1.strategy_state["count"]).max() > 1, "some Gaussian should be seen by several cameras"


def test_batched_loss_is_the_mean_of_per_camera_losses():
    model = make_model("cpu:2")
    camera, batch = batch_of_cameras(3)
    model.eval()  # fixed background, so each camera renders alike alone and in the batch
    with torch.no_grad():
        together = model.get_loss_dict(model.get_outputs(camera), batch)["main_loss"]
        alone = [model.get_loss_dict(model.get_outputs(camera[i : i + 1]), {"image": batch["image"][i]})["main_loss"] for i in range(3)]
    assert float(together) == pytest.approx(float(sum(alone) / 3), rel=1e-6)
