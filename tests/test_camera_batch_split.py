"""Camera batches (cameras-per-step > 1) stay split over the members' pixel rows in training: the
rasterizer's [C * H, W, ...] split outputs and their gradients equal the assembled images' bit for bit
(member bounds falling mid-camera), the split loss is `banded_l1_ssim`'s mean over the C images (no SSIM
window crosses a camera's end), and whole training steps with two cameras per step on several members
or two ranks equal one member's bit for bit, without any fallback."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Dict

import pytest
import torch

from ms_splatfacto.backend.aggregate import (
    aggregate,
    exchange,
    fallback_counts,
    is_aggregate,
    members,
    reset_exchange,
    reset_fallback_counts,
    to_plain,
)
from ms_splatfacto.backend.aggregate.layout import Layout
from ms_splatfacto.backend.aggregate.redistribute import relayout
from ms_splatfacto.backend.ops.loss import banded_l1_ssim, split_l1_ssim
from ms_splatfacto.backend.ops.render import rasterization
from ms_splatfacto.backend.ops.row_inputs import gt_row_spans, ssim_span
from ms_splatfacto.model import GAUSSIAN_PARAMS
from tests.ranks import run_ranks
from tests.test_model_step import batch_of_cameras, make_model, optimize

C, H, W = 3, 40, 56
LAMBDA = 0.2


def scene():
    g = torch.Generator().manual_seed(0)
    n = 3000
    means = torch.randn(n, 3, generator=g) * 0.6 + torch.tensor([0, 0, 3.0])
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.05 + 0.01
    opacities = torch.rand(n, generator=g) * 0.8 + 0.1
    colors = torch.rand(n, 3, generator=g)
    view = torch.eye(4)[None].repeat(C, 1, 1)
    view[1, 0, 3], view[2, 1, 3] = 0.2, -0.2
    K = torch.tensor([[50.0, 0, W / 2], [0, 50.0, H / 2], [0, 0, 1]])[None].repeat(C, 1, 1)
    return (means, quats, scales, opacities, colors), view, K


@pytest.mark.parametrize("spec", ["cpu:2", "cpu:4"])
def test_split_camera_batch_renders_and_differentiates_like_the_assembled_images(spec: str):
    tensors, view, K = scene()
    weights = torch.rand(C * H, W, 3, generator=torch.Generator().manual_seed(1))

    def run(split: bool):
        params = [torch.nn.Parameter(aggregate(t.clone(), spec)) for t in tensors]
        rgb, alpha, _ = rasterization(*params, view, K, W, H, split_images=split)  # alpha unused: a zero gradient
        flat = rgb if split else rgb.reshape(C * H, W, 3)
        (flat * weights).sum().backward()  # the image's gradient is `weights` exactly, on either path
        return params, rgb, to_plain(flat.detach())

    whole_params, whole, whole_flat = run(False)
    split_params, split, split_flat = run(True)
    assert not is_aggregate(whole) and tuple(whole.shape) == (C, H, W, 3)
    assert is_aggregate(split) and tuple(split.shape) == (C * H, W, 3)
    bounds = split._layout.bounds
    assert any(0 < b < C * H and b % H for b in bounds), f"some member bound should fall mid-camera: {bounds}"
    assert torch.equal(split_flat, whole_flat)
    for a, b in zip(whole_params, split_params):
        assert torch.equal(to_plain(a.grad), to_plain(b.grad))


def test_ssim_spans_stop_at_each_camera_end():
    # 2 cameras of 20 rows: map rows are 0..9 and 20..29; member rows [5, 25) read up to row 34 (= 24 + 10)
    assert ssim_span(5, 25, 20) == (True, 35)
    assert ssim_span(12, 20, 20) == (False, 20)  # only the last 10 rows of camera 0: no window starts
    assert ssim_span(12, 22, 20) == (True, 32)  # rows 20, 21 start windows of camera 1
    assert ssim_span(3, 7, 20) == (True, 17)
    assert ssim_span(5, 8, 6) == (True, 8)  # images shorter than the window: no halo
    assert gt_row_spans([0, 25, 40], 40, 20) == [(0, 35), (25, 40)]
    assert gt_row_spans([0, 30, 48], 48) == [(0, 40), (30, 48)]  # one image, as before
    with pytest.raises(AssertionError, match="stack of images"):
        gt_row_spans([0, 40], 40, 15)


def split_loss(pred0: torch.Tensor, gt: torch.Tensor, spec: str, bounds, image_height: int):
    """The split loss of the float32 [C * H, W, 3] rows `pred0` with `bounds`, summed in float64 as the
    model does on the CPU: (loss, gradient of pred0)."""
    m = members(spec)
    pred = relayout(aggregate(pred0, m), Layout(tuple(bounds), m)).requires_grad_(True)
    loss = split_l1_ssim(pred.to(torch.float64), gt, LAMBDA, image_height).to(torch.float32)
    loss.backward()
    return loss.detach(), to_plain(pred.grad)


@pytest.mark.parametrize("hw", [(40, 56), (23, 17), (8, 30)])
def test_split_loss_of_a_camera_batch_is_the_banded_loss_of_its_images(hw):
    h, w = hw
    g = torch.Generator().manual_seed(2)
    gt = torch.rand(C, h, w, 3, generator=g, dtype=torch.float64)
    pred0 = (0.7 * gt + 0.3 * torch.rand(C, h, w, 3, generator=g, dtype=torch.float64)).clamp(0, 1).to(torch.float32)
    ref = pred0.clone().requires_grad_(True)
    expected = banded_l1_ssim(ref.to(torch.float64), gt, LAMBDA, [0, h]).to(torch.float32)
    expected.backward()
    rows = C * h
    results = {}
    for spec, bounds in [("cpu", [0, rows]), ("cpu:3", [0, h // 2, h + 3, rows]),
                         ("cpu:4", [0, h - 4, h + 9, 2 * h + h // 3, rows]), ("cpu:4", [0, 0, 2 * h - 1, 2 * h - 1, rows])]:
        reset_exchange()
        loss, grad = split_loss(pred0.reshape(rows, w, 3), gt.reshape(rows, w, 3), spec, bounds, h)
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, ref.grad.reshape(rows, w, 3), rtol=1e-5, atol=1e-9)
        assert (exchange.exchange_totals().get("other", 0) > 0) == (spec != "cpu")
        results[(spec, tuple(bounds))] = (loss, grad)
    (loss1, grad1), *others = results.values()
    for loss, grad in others:  # float64 partials combined in member order: the same bits on any member count
        assert torch.equal(loss, loss1) and torch.equal(grad, grad1)
    # treating the rows as one tall image would let windows cross cameras: a different loss
    if h >= 11:
        tall, _ = split_loss(pred0.reshape(rows, w, 3), gt.reshape(rows, w, 3), "cpu", [0, rows], rows)
        assert not torch.allclose(tall, expected.detach(), rtol=1e-4, atol=0)


def test_split_loss_refuses_rows_that_are_not_a_stack_of_images():
    pred = aggregate(torch.rand(30, 12, 3, dtype=torch.float64), "cpu:2")
    with pytest.raises(AssertionError, match="stack images"):
        split_l1_ssim(pred, torch.rand(30, 12, 3, dtype=torch.float64), LAMBDA, 7)


STEPS = 5
FULL_SIZE = dict(num_downscales=0)
"""48-row images (3 tile rows) from the first step, so member bounds fall mid-camera."""


def batch_steps(spec: str, count: int = 2, masked: bool = False) -> Dict[str, object]:
    """`STEPS` training steps of `count` cameras per step (forward, PSNR, loss, backward, Adam, densification
    statistics and one refinement) on `spec`, as ordinary tensors."""
    reset_exchange()
    model = make_model(spec, **FULL_SIZE)
    camera, batch = batch_of_cameras(count)
    if masked:
        g = torch.Generator().manual_seed(5)
        batch["mask"] = torch.rand(*batch["image"].shape[:-1], 1, generator=g) > 0.2
    optimizers = {name: torch.optim.Adam(params, lr=1e-3, eps=1e-15) for name, params in model.get_gaussian_param_groups().items()}
    torch.manual_seed(2)  # the split's noise
    reset_fallback_counts()
    log, split = [], []
    for step in range(STEPS):
        model.step_cb(SimpleNamespace(optimizers=optimizers), step)
        outputs = model.get_outputs(camera)
        rgb = outputs["rgb"]
        split.append(is_aggregate(rgb) and rgb.shape[0] == count * model.last_size[0])
        mid_camera = any(b % model.last_size[0] for b in rgb._layout.bounds)
        psnr = model.get_metrics_dict(outputs, batch)["psnr"]
        losses = model.get_loss_dict(outputs, batch)
        loss = sum(losses.values())
        optimize(model, optimizers, loss, step)
        log.append((float(loss), float(psnr), model.num_points))
    out: Dict[str, object] = {"log": log, "split": split, "fallbacks": fallback_counts(), "members": str(model.members),
                              "mid_camera": mid_camera}
    for name in GAUSSIAN_PARAMS:
        p = model.gauss_params[name]
        out[name] = to_plain(p.detach())
        out[name + " exp_avg_sq"] = to_plain(optimizers[name].state[p]["exp_avg_sq"])
    for key in ("grad2d", "count", "radii"):
        out["strategy " + key] = to_plain(model.strategy_state[key])
    return out


@pytest.fixture(scope="module")
def one_member() -> Dict[str, object]:
    return batch_steps("cpu")


def assert_same_training(got: Dict[str, object], reference: Dict[str, object]) -> None:
    assert got["fallbacks"] == {} and all(got["split"]) and got["mid_camera"]
    assert got["log"] == reference["log"]
    for key, value in reference.items():
        if torch.is_tensor(value):
            assert torch.equal(got[key], value), key


@pytest.mark.parametrize("spec,masked", [("cpu:4", False), ("cpu:3", True)])
def test_camera_batch_steps_on_members_equal_one_member(one_member, spec: str, masked: bool):
    reference = one_member if not masked else batch_steps("cpu", masked=True)
    assert reference["log"][-1][2] > reference["log"][0][2], "the refinement should have grown the model"
    assert_same_training(batch_steps(spec, masked=masked), reference)


def test_split_camera_batch_loss_matches_the_assembled_loss():
    """The model's split loss of a two-camera batch against `banded_l1_ssim` of the gathered images."""
    model = make_model("cpu:4", **FULL_SIZE)
    camera, batch = batch_of_cameras(2)
    optimizers = {name: torch.optim.Adam(params, lr=1e-3) for name, params in model.get_gaussian_param_groups().items()}
    model.step_cb(SimpleNamespace(optimizers=optimizers), 0)
    outputs = model.get_outputs(camera)
    rgb = outputs["rgb"]
    h, w = model.last_size
    assert is_aggregate(rgb) and tuple(rgb.shape) == (2 * h, w, 3)
    assert any(b % h for b in rgb._layout.bounds), f"some member bound should fall mid-camera: {rgb._layout.bounds}"
    got = model.get_loss_dict(outputs, batch)["main_loss"]
    gt = model._gt_images(batch, outputs["background"])
    assert tuple(gt.shape) == (2, h, w, 3)
    expected = banded_l1_ssim(to_plain(rgb.detach()).view(2, h, w, 3).double(), gt.double(), model.config.ssim_lambda, [0, h])
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)


def test_camera_batch_steps_on_two_ranks_equal_one_member(tmp_path: Path, one_member):
    for rank, got in enumerate(run_ranks(2, batch_steps, "cpu:2", tmp=tmp_path)):
        assert got["members"] == "2 ranks x cpu:2", rank
        assert_same_training(got, one_member)


def datamanager_steps(lund_tiny: Path, spec: str, steps: int = 6) -> Dict[str, object]:
    """`steps` steps on the datamanager's real camera batches (two cameras per step, uint8 images stacked
    to [2, H, W, 3]) on `spec`: the losses, PSNRs and parameters."""
    from ms_splatfacto.model import MsSplatfactoModelConfig
    from tests.test_streaming_data import lund

    datamanager = lund(lund_tiny, "cache", cache_images_type="uint8", cameras_per_step=2, camera_res_scale_factor=0.25)
    torch.manual_seed(0)
    metadata = datamanager.train_dataparser_outputs.metadata
    model = MsSplatfactoModelConfig(devices=spec, num_downscales=0, warmup_length=2, refine_every=3).setup(
        scene_box=datamanager.train_dataset.scene_box, num_train_data=len(datamanager.train_dataset),
        seed_points=(metadata["points3D_xyz"], metadata["points3D_rgb"]),
    )
    model.train()
    optimizers = {name: torch.optim.Adam(params, lr=1e-3, eps=1e-15) for name, params in model.get_gaussian_param_groups().items()}
    reset_fallback_counts()
    log = []
    for step in range(steps):
        model.step_cb(SimpleNamespace(optimizers=optimizers), step)
        cameras, batch = datamanager.next_train(step)
        assert batch["image"].shape[0] == 2
        outputs = model.get_outputs(cameras)
        assert is_aggregate(outputs["rgb"]) and outputs["rgb"].shape[0] == 2 * model.last_size[0]
        psnr = model.get_metrics_dict(outputs, batch)["psnr"]
        loss = sum(model.get_loss_dict(outputs, batch).values())
        optimize(model, optimizers, loss, step)
        log.append((float(loss), float(psnr), model.num_points))
    bounds = outputs["rgb"]._layout.bounds
    out = {"log": log, "fallbacks": fallback_counts(), "mid_camera": any(b % model.last_size[0] for b in bounds)}
    out.update({name: to_plain(model.gauss_params[name].detach()) for name in GAUSSIAN_PARAMS})
    return out


def test_datamanager_camera_batches_train_alike_on_any_member_count(lund_tiny: Path):
    one, four = datamanager_steps(lund_tiny, "cpu"), datamanager_steps(lund_tiny, "cpu:4")
    assert four["fallbacks"] == {} and four["mid_camera"]
    assert four["log"] == one["log"]
    for name in GAUSSIAN_PARAMS:
        assert torch.equal(four[name], one[name]), name
