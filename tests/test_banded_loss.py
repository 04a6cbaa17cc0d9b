"""The banded L1 + SSIM loss against splatfacto's own formula (pytorch_msssim.SSIM), its band layout,
and that it moves nothing (the image is on every rank)."""

from __future__ import annotations

import warnings

import pytest
import torch
from pytorch_msssim import SSIM

from ms_splatfacto.backend.aggregate import exchange
from ms_splatfacto.backend.ops.loss import band_rows, banded_l1_ssim

TILE = 16
LAMBDA = 0.2


def l1_ssim_reference(pred: torch.Tensor, gt: torch.Tensor, ssim_lambda: float) -> torch.Tensor:
    """SplatfactoModel.get_loss_dict's main loss (nerfstudio 1.1.5) for one [H, W, 3] image, or the mean
    over a [C, H, W, 3] batch."""
    if pred.dim() == 4:
        return torch.stack([l1_ssim_reference(p, g, ssim_lambda) for p, g in zip(pred, gt)]).mean()
    ssim = SSIM(data_range=1.0, size_average=True, channel=3)
    l1 = torch.abs(gt - pred).mean()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pytorch_msssim warns when it skips an axis shorter than the window
        simloss = 1 - ssim(gt.permute(2, 0, 1)[None, ...], pred.permute(2, 0, 1)[None, ...])
    return (1 - ssim_lambda) * l1 + ssim_lambda * simloss


def images(shape, dtype, seed=0):
    """A smooth-ish prediction and a noisy target in [0, 1], so SSIM is far from 0 and from 1."""
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(shape, generator=g, dtype=torch.float64)
    pred = (0.7 * gt + 0.3 * torch.rand(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return pred.to(dtype), gt.to(dtype)


TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-6, atol=1e-6)}


def check_against_reference(pred, gt, bands, dtype):
    pred = pred.clone().requires_grad_(True)
    ref = l1_ssim_reference(pred, gt, LAMBDA)
    (ref_grad,) = torch.autograd.grad(ref, pred)
    loss = banded_l1_ssim(pred, gt, LAMBDA, bands)
    (grad,) = torch.autograd.grad(loss, pred)
    assert loss.shape == () and loss.dtype == dtype
    torch.testing.assert_close(loss, ref.detach(), **TOL[dtype])
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(grad, ref_grad, rtol=TOL[dtype]["rtol"] * 100, atol=TOL[dtype]["atol"] * scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hw", [(64, 48), (37, 29), (256, 192)])
@pytest.mark.parametrize("members", [1, 2, 3, 4, 7])
def test_matches_splatfacto_loss_and_gradient(hw, members, dtype):
    pred, gt = images((*hw, 3), dtype)
    check_against_reference(pred, gt, band_rows(hw[0], members, TILE), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batch_is_mean_of_per_image_losses(dtype):
    pred, gt = images((3, 37, 29, 3), dtype, seed=1)
    check_against_reference(pred, gt, band_rows(37, 3, TILE), dtype)
    single = torch.stack([banded_l1_ssim(p, g, LAMBDA, band_rows(37, 3, TILE)) for p, g in zip(pred, gt)]).mean()
    torch.testing.assert_close(banded_l1_ssim(pred, gt, LAMBDA, band_rows(37, 3, TILE)), single, **TOL[dtype])


def test_more_members_than_tile_rows():
    """Empty bands compute nothing; band 1 reads the 5 rows of band 2 as its halo."""
    bands = band_rows(37, 7, TILE)
    assert bands == [0, 16, 32, 37, 37, 37, 37, 37]
    pred, gt = images((37, 29, 3), torch.float64)
    check_against_reference(pred, gt, bands, torch.float64)


@pytest.mark.parametrize("bands", [[0, 1, 2, 3, 40, 41, 64], [0, 5, 5, 12, 64], [0, 60, 64], [0, 64, 64]])
def test_arbitrary_bands_including_ones_shorter_than_the_halo(bands):
    pred, gt = images((64, 20, 3), torch.float64, seed=2)
    check_against_reference(pred, gt, bands, torch.float64)


@pytest.mark.parametrize("hw", [(8, 29), (37, 6), (5, 7)])
def test_images_smaller_than_the_window_skip_that_axis_like_pytorch_msssim(hw):
    pred, gt = images((*hw, 3), torch.float64, seed=3)
    check_against_reference(pred, gt, band_rows(hw[0], 3, 4), torch.float64)


@pytest.mark.parametrize("height", [0, 1, 15, 16, 17, 37, 64, 100, 1080])
@pytest.mark.parametrize("members", [1, 2, 3, 5, 8, 70])
@pytest.mark.parametrize("tile", [1, 8, 16])
def test_band_rows_properties(height, members, tile):
    rows = band_rows(height, members, tile)
    assert len(rows) == members + 1 and rows[0] == 0 and rows[-1] == height
    assert all(a <= b for a, b in zip(rows, rows[1:]))
    assert all(r % tile == 0 for r in rows[:-1] if r < height)
    tile_rows = [-(-(b - a) // tile) for a, b in zip(rows, rows[1:])]
    assert sum(tile_rows) == -(-height // tile)
    assert max(tile_rows) - min(tile_rows) <= 1
    assert tile_rows == sorted(tile_rows, reverse=True)


@pytest.mark.parametrize("members", [1, 2, 4])
def test_the_loss_moves_nothing(members: int):
    """The image is on every rank (the rasterizer assembled it there): no band reads anything remote."""
    exchange.reset_exchange()
    pred, gt = images((2, 32, 4, 3), torch.float64)
    banded_l1_ssim(pred, gt, LAMBDA, band_rows(32, members, 8))
    assert exchange.exchange_counts() == {}


@pytest.mark.parametrize(
    "pred_shape, gt_shape, bands, message",
    [
        ((16, 16, 4), (16, 16, 4), [0, 16], r"\[H, W, 3\] or \[C, H, W, 3\]"),
        ((16, 16), (16, 16), [0, 16], r"\[H, W, 3\] or \[C, H, W, 3\]"),
        ((1, 2, 16, 16, 3), (1, 2, 16, 16, 3), [0, 16], r"\[H, W, 3\] or \[C, H, W, 3\]"),
        ((16, 16, 3), (16, 15, 3), [0, 16], "same shape"),
        ((16, 16, 3), (16, 16, 3), [0, 8], "from 0 to H=16"),
        ((16, 16, 3), (16, 16, 3), [0, 10, 8, 16], "non-decreasing"),
        ((16, 16, 3), (16, 16, 3), [16], "row boundaries"),
        ((0, 16, 3), (0, 16, 3), [0, 0], "must not be empty"),
    ],
)
def test_bad_shapes_raise(pred_shape, gt_shape, bands, message):
    with pytest.raises(AssertionError, match=message):
        banded_l1_ssim(torch.rand(pred_shape), torch.rand(gt_shape), LAMBDA, bands)


def test_bad_dtype_and_band_arguments_raise():
    with pytest.raises(AssertionError, match="floating dtype"):
        image = torch.zeros(16, 16, 3, dtype=torch.uint8)
        banded_l1_ssim(image, image, LAMBDA, [0, 16])
    with pytest.raises(AssertionError, match="floating dtype"):
        banded_l1_ssim(torch.rand(16, 16, 3), torch.rand(16, 16, 3, dtype=torch.float64), LAMBDA, [0, 16])
    with pytest.raises(AssertionError, match="members >= 1"):
        band_rows(16, 0, 16)


@pytest.mark.parametrize("spec", ["cpu", "cpu:2", "cpu:3", "cpu:4"])
def test_split_loss_where_the_pixels_are_equals_the_banded_loss(spec: str):
    """Each member's rows of an aggregate image, halo rows read from the member below: the same loss as
    the banded loss with those bands (bit for bit) and gradient as one band (to float64 rounding); only
    partial sums and halo rows move."""
    from ms_splatfacto.backend.aggregate import aggregate, members, to_plain
    from ms_splatfacto.backend.aggregate.layout import Layout
    from ms_splatfacto.backend.aggregate.redistribute import relayout
    from ms_splatfacto.backend.ops.loss import split_l1_ssim

    pred0, gt = images((48, 40, 3), torch.float64, seed=4)
    ref = pred0.clone().requires_grad_(True)
    expected = banded_l1_ssim(ref, gt, LAMBDA, [0, 48])
    expected.backward()
    m = members(spec)
    bands = band_rows(48, len(m), 16)
    same_bands = banded_l1_ssim(pred0, gt, LAMBDA, bands)
    pred = relayout(aggregate(pred0, m), Layout(tuple(bands), m)).requires_grad_(True)
    exchange.reset_exchange()
    got = split_l1_ssim(pred, gt, LAMBDA)
    got.backward()
    assert got.item() == same_bands.item()
    torch.testing.assert_close(got.detach(), expected.detach(), rtol=1e-14, atol=0)
    torch.testing.assert_close(to_plain(pred.grad), ref.grad, rtol=1e-12, atol=1e-15)
    assert (exchange.exchange_totals()["other"] > 0) == (len(m) > 1)


def test_accumulation_is_float64_on_the_cpu_and_the_image_dtype_on_gpus():
    from ms_splatfacto.backend.ops.loss import accumulation_dtype

    assert accumulation_dtype(torch.device("cpu"), torch.float32) == torch.float64
    assert accumulation_dtype(torch.device("cuda", 1), torch.float32) == torch.float32
    assert accumulation_dtype(torch.device("cuda"), torch.float16) == torch.float16


@pytest.mark.parametrize("spec", ["cpu:2", "cpu:4"])
def test_float32_split_loss_is_repeatable_and_close_to_float64(spec: str):
    """The GPU precision (float32 sums) run on CPU members: the same bits on a second run (partials are
    combined in member order), and within float32 rounding of the float64 loss and gradient."""
    from ms_splatfacto.backend.aggregate import aggregate, members, to_plain
    from ms_splatfacto.backend.aggregate.layout import Layout
    from ms_splatfacto.backend.aggregate.redistribute import relayout
    from ms_splatfacto.backend.ops.loss import split_l1_ssim

    pred0, gt = images((48, 40, 3), torch.float64, seed=5)
    m = members(spec)
    layout = Layout(tuple(band_rows(48, len(m), 16)), m)

    def run(dtype):
        pred = relayout(aggregate(pred0.to(dtype), m), layout).requires_grad_(True)
        loss = split_l1_ssim(pred, gt.to(dtype), LAMBDA)
        loss.backward()
        return loss.detach(), to_plain(pred.grad)

    loss32, grad32 = run(torch.float32)
    again32, again_grad32 = run(torch.float32)
    loss64, grad64 = run(torch.float64)
    assert loss32.dtype == torch.float32
    assert torch.equal(loss32, again32) and torch.equal(grad32, again_grad32)
    torch.testing.assert_close(loss32.double(), loss64, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad32.double(), grad64, rtol=1e-4, atol=1e-9)
