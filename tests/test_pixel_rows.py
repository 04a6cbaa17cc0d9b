"""Pixels where they are rendered (issue 13 part 2): each member decodes only the ground-truth rows it
renders plus the SSIM halo, bit for bit what nerfstudio's cache path decodes; the members' bands make the
whole image; training on them equals training on whole images; ranks decode only their members' rows."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from PIL import Image

from ms_splatfacto.backend.aggregate import to_plain
from ms_splatfacto.backend.ops.row_inputs import gt_row_spans
from ms_splatfacto.datamanager import MsDatamanagerConfig
from ms_splatfacto.image_rows import COUNTS, ImageRows, file_rows
from ms_splatfacto.image_stream import decode
from tests.ranks import run_ranks
from tests.test_model_step import optimize


def lund(lund_tiny: Path, images: str, **overrides):
    dataparser = ColmapDataParserConfig(data=lund_tiny, colmap_path=Path("sparse/0"))
    return MsDatamanagerConfig(dataparser=dataparser, images=images, **overrides).setup(device="cpu")


def photos(data: Path, images: str, **overrides):
    return MsDatamanagerConfig(dataparser=NerfstudioDataParserConfig(data=data, load_3D_points=True), images=images, **overrides).setup(device="cpu")


def file_bytes(path: Path) -> torch.Tensor:
    return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)


def pil_array(path: Path) -> np.ndarray:
    array = np.array(Image.open(path))
    return array[..., None] if array.ndim == 2 else array


def spans_of(height: int):
    return [(0, height), (0, 1), (5, 37), (17, 18), (33, height - 20), (height - 1, height), (40, 40)]


@pytest.fixture(scope="module")
def city(tmp_path_factory) -> dict:
    """The procedural city, 6 views of 96x72, as JPEG (4:4:4) and as PNG."""
    from ms_splatfacto.scenes.city import generate_city_scene

    root = tmp_path_factory.mktemp("city")
    return {fmt: generate_city_scene(root / fmt, 6, 96, 72, num_points=3000, image_format=fmt, workers=1) for fmt in ("jpeg", "png")}


def check_file_rows(path: Path) -> None:
    whole, data = pil_array(path), file_bytes(path)
    for lo, hi in spans_of(whole.shape[0]):
        COUNTS.reset()
        rows = file_rows(data, lo, hi)
        assert rows is not None and np.array_equal(rows, whole[lo:hi]), (path.name, lo, hi)
        reconstructed = COUNTS.records[-1][3]
        assert reconstructed == (hi - lo if path.suffix == ".jpg" else hi), (path.name, lo, hi, reconstructed)


def test_lund_tiny_jpeg_rows_equal_pil(lund_tiny: Path):
    images = sorted((lund_tiny / "images").glob("*.jpg"))[:4]
    assert Image.open(images[0]).layer[0][1:3] == (2, 2), "lund_tiny's photos are 4:2:0: fancy upsampling across the skip"
    for path in images:
        check_file_rows(path)


def test_city_jpeg_444_png_and_other_layouts_equal_pil(city: dict, tmp_path: Path):
    jpegs, pngs = sorted((city["jpeg"] / "images").glob("*.jpg")), sorted((city["png"] / "images").glob("*.png"))
    assert jpegs and pngs and all(sampling[1:3] == (1, 1) for sampling in Image.open(jpegs[0]).layer), "city JPEGs are 4:4:4"
    pixels = np.random.default_rng(0).integers(0, 256, (70, 53, 4), dtype=np.uint8)
    extra = {"rgba.png": (pixels, {}), "grey.png": (pixels[..., 0], {}), "grey.jpg": (pixels[..., 0], {}),
             "422.jpg": (pixels[..., :3], {"subsampling": 1}), "progressive.jpg": (pixels[..., :3], {"progressive": True})}
    for name, (array, options) in extra.items():
        Image.fromarray(array).save(tmp_path / name, **options)
    for path in jpegs[:3] + pngs[:3] + [tmp_path / name for name in extra]:
        check_file_rows(path)
    content = jpegs[0].read_bytes()
    cut = torch.frombuffer(bytearray(content[: len(content) // 2]), dtype=torch.uint8)
    assert np.array_equal(file_rows(cut, 0, 2), pil_array(jpegs[0])[:2]), "the rows before the cut still decode"
    with pytest.raises(OSError, match="truncated"):
        file_rows(cut, 60, 72)


@pytest.mark.parametrize("image_type", ["uint8", "float32"])
def test_undistorted_lund_tiny_rows_equal_the_cache_decode(lund_tiny: Path, image_type: str):
    datamanager = lund(lund_tiny, "stream", cache_images_type=image_type)
    dataset, raw = datamanager.train_dataset, datamanager._raw_train
    assert raw.distortion_params.abs().sum() > 0
    for idx in (0, 7, len(dataset) - 1):
        whole = decode(dataset, raw, idx, image_type)["image"]
        height, width = whole.shape[:2]
        rows = ImageRows(dataset, raw, idx, image_type, file_bytes(dataset.image_filenames[idx]), (height, width))
        for lo, hi in spans_of(height):
            got = rows.read(lo, hi, member=0)
            assert got.dtype == whole.dtype and torch.equal(got, whole[lo:hi]), (idx, lo, hi)
        band = rows.reads[2]  # rows [5, 37): the source span the undistortion maps read, not the image
        assert (band[1], band[2]) == (5, 37) and 32 <= band[3] < height // 2, band


def model_on(datamanager, spec: str, num_downscales: int = 0):
    from ms_splatfacto.model import MsSplatfactoModelConfig

    torch.manual_seed(0)
    metadata = datamanager.train_dataparser_outputs.metadata
    model = MsSplatfactoModelConfig(
        devices=spec, num_downscales=num_downscales, resolution_schedule=3, warmup_length=2, refine_every=3,
    ).setup(scene_box=datamanager.train_dataset.scene_box, num_train_data=len(datamanager.train_dataset),
            seed_points=(metadata["points3D_xyz"], metadata["points3D_rgb"]))
    model.train()
    optimizers = {name: torch.optim.Adam(params, lr=1e-3, eps=1e-15) for name, params in model.get_gaussian_param_groups().items()}
    model.step_cb(SimpleNamespace(optimizers=optimizers), 0)
    return model, optimizers


def check_bands(city: dict, spec: str, num_downscales: int):
    datamanager = photos(city["jpeg"], "stream", cache_images_type="uint8")
    assert datamanager.member_rows
    model, _ = model_on(datamanager, spec, num_downscales)
    camera, batch = datamanager.next_train(0)
    assert "image" not in batch, "the stream hands rows, not a decoded image"
    source = batch["image_rows"]
    outputs = model.get_outputs(camera)
    metrics = model.get_metrics_dict(outputs, batch)
    loss = model.get_loss_dict(outputs, batch, metrics)["main_loss"]
    scale = 2**num_downscales
    pred = outputs["rgb"]
    bounds, height = pred._layout.bounds, pred.shape[0]
    spans = gt_row_spans(bounds, height)
    members = len(bounds) - 1
    assert sorted(read for read in source.reads if read[2] > read[1]) == sorted((r, lo * scale, stop * scale, (stop - lo) * scale) for r, (lo, stop) in enumerate(spans) if stop > lo)
    if members > 1:
        assert all(n < source.rows for _, _, _, n in source.reads), "no member decodes the whole image"
    whole_batch = {"image": source.read(0, source.rows)}
    whole = model._gt_images(whole_batch, outputs["background"])
    bands = model._gt_bands(outputs, batch)
    assert torch.equal(torch.cat([bands.band(r)[: bounds[r + 1] - bounds[r]] for r in range(members)]), whole)
    for r, (lo, stop) in enumerate(spans):
        assert torch.equal(bands.band(r), whole[lo:stop]), r
    # the loss from the bands equals the whole image's bit for bit; the PSNR sums float64 partials (the same
    # on any member count), torchmetrics a float32 whole
    assert torch.equal(loss, model.get_loss_dict(outputs, whole_batch)["main_loss"])
    torch.testing.assert_close(metrics["psnr"], model.psnr(to_plain(pred.detach()), whole), rtol=1e-6, atol=0)
    return float(metrics["psnr"]), float(loss.detach())


@pytest.mark.parametrize("num_downscales", [0, 1])
def test_members_bands_make_the_whole_ground_truth_and_each_reads_only_its_rows(city: dict, num_downscales: int):
    """cpu:1, cpu:3 and cpu:4 at full and half resolution: the bands concatenate to the whole ground truth,
    each member decoded exactly its span, and PSNR and loss are the same bits on every member count."""
    results = {spec: check_bands(city, spec, num_downscales) for spec in ("cpu:1", "cpu:3", "cpu:4")}
    assert results["cpu:3"] == results["cpu:1"] and results["cpu:4"] == results["cpu:1"], results


def train(datamanager, spec: str, steps: int, whole_images: bool = False):
    model, optimizers = model_on(datamanager, spec, num_downscales=1)  # steps 0-2 at half resolution, then full
    log, psnrs = [], []
    for step in range(steps):
        model.step_cb(SimpleNamespace(optimizers=optimizers), step)
        camera, batch = datamanager.next_train(step)
        if whole_images:  # the path before member rows: the whole ground truth, sliced per member by the loss
            batch.pop("image_rows")
        outputs = model.get_outputs(camera)
        metrics = model.get_metrics_dict(outputs, batch)
        loss = sum(model.get_loss_dict(outputs, batch, metrics).values())
        optimize(model, optimizers, loss, step)
        log.append((float(loss.detach()), model.num_points))
        psnrs.append(float(metrics["psnr"]))
    return {name: to_plain(p.detach()) for name, p in model.gauss_params.items()}, log, psnrs


def test_training_on_members_rows_equals_training_on_whole_images(lund_tiny: Path):
    """cpu:4, undistorted lund_tiny at half then full resolution: streamed rows, the cache's slices and the
    whole-image path give the same losses and model bit for bit."""
    streamed = lund(lund_tiny, "stream", cache_images_type="uint8")
    assert streamed.member_rows
    runs = {
        "stream rows": train(streamed, "cpu:4", 6),
        "cache rows": train(lund(lund_tiny, "cache", cache_images_type="uint8"), "cpu:4", 6),
        "whole": train(lund(lund_tiny, "cache", cache_images_type="uint8"), "cpu:4", 6, whole_images=True),
    }
    params, log, psnrs = runs["whole"]
    for name, (got, got_log, got_psnrs) in runs.items():
        assert got_log == log, name
        assert got_psnrs == pytest.approx(psnrs, rel=1e-6), name  # float64 partials against torchmetrics' float32 sum
        for key, value in params.items():
            assert torch.equal(got[key], value), (name, key)


def ranked_step(data: Path):
    """One training step's loss on this rank's members (cpu:2 each), and what each member decoded."""
    datamanager = photos(data, "stream", cache_images_type="uint8")
    model, _ = model_on(datamanager, "cpu:2")
    camera, batch = datamanager.next_train(0)
    outputs = model.get_outputs(camera)
    loss = model.get_loss_dict(outputs, batch)["main_loss"]
    loss.backward()
    rgb = outputs["rgb"]
    psnr = float(model.get_metrics_dict(outputs, batch)["psnr"])
    return {"loss": float(loss), "psnr": psnr, "reads": list(batch["image_rows"].reads), "local": list(rgb.members.local),
            "spans": gt_row_spans(rgb._layout.bounds, rgb.shape[0]), "rows": batch["image_rows"].rows}


def test_each_rank_decodes_only_its_members_rows(city: dict, tmp_path: Path):
    per_rank = run_ranks(2, ranked_step, city["jpeg"], tmp=tmp_path)
    one = photos(city["jpeg"], "stream", cache_images_type="uint8")
    model, _ = model_on(one, "cpu:4")
    camera, batch = one.next_train(0)
    outputs = model.get_outputs(camera)
    reference = (float(model.get_loss_dict(outputs, batch)["main_loss"]), float(model.get_metrics_dict(outputs, batch)["psnr"]))
    for rank, got in enumerate(per_rank):
        assert got["local"] == [2 * rank, 2 * rank + 1] and (got["loss"], got["psnr"]) == reference, rank
        expected = [(r, *got["spans"][r], got["spans"][r][1] - got["spans"][r][0]) for r in got["local"] if got["spans"][r][1] > got["spans"][r][0]]
        reads = [read for read in got["reads"] if read[2] > read[1]]
        assert sorted(reads) == expected and sum(n for *_, n in reads) < got["rows"], (rank, reads)
