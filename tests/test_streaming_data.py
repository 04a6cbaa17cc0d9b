"""`--pipeline.datamanager.images stream`: the same images, cameras and order as `cache` bit for bit, a
byte-bounded cache, step 0 before the dataset is read, unreadable images skipped and counted, flat memory
at thousands of cameras."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import List

import pytest
import torch
from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParser, ColmapDataParserConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

from benchmarks.data_stream import city_dataset, run_probe, subset_dataset, write_photo_dataset
from ms_splatfacto.datamanager import MsDatamanagerConfig
from ms_splatfacto.errors import InputError
from ms_splatfacto.image_rows import ImageRows
from ms_splatfacto.image_stream import ImageStream
from tests.conftest import train
from tests.ranks import run_ranks
from tests.test_model_step import optimize

CAMERA_FIELDS = ("camera_to_worlds", "fx", "fy", "cx", "cy", "width", "height", "distortion_params", "camera_type")


def lund(lund_tiny: Path, images: str, **overrides):
    dataparser = ColmapDataParserConfig(data=lund_tiny, colmap_path=Path("sparse/0"))
    return MsDatamanagerConfig(dataparser=dataparser, images=images, **overrides).setup(device="cpu")


def photos(data: Path, images: str, **overrides):
    return MsDatamanagerConfig(dataparser=NerfstudioDataParserConfig(data=data), images=images, **overrides).setup(device="cpu")


def assert_same_cameras(a, b):
    for name in CAMERA_FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def assert_same_steps(stream, cache, steps: int):
    """The same cameras and pixels; with one camera per step the stream hands the members' row source
    (`image_rows`, no decoded `image`), whose whole image is then read here, once, and compared."""
    for step in range(steps):
        (cam_s, batch_s), (cam_c, batch_c) = stream.next_train(step), cache.next_train(step)
        assert cam_s.metadata["cam_idx"] == cam_c.metadata["cam_idx"], step
        assert_same_cameras(cam_s, cam_c)
        if stream.member_rows:
            assert "image" not in batch_s and isinstance(batch_s["image_rows"], ImageRows), step
            batch_s = {**batch_s, "image": batch_s["image_rows"].read(0, batch_s["image_rows"].rows)}
            batch_s["image_rows"] = batch_c["image_rows"]
        assert batch_s.keys() == batch_c.keys()
        for key, value in batch_c.items():
            if key == "image_rows":
                assert torch.equal(value.read(0, value.rows), batch_c["image"]), step  # the cache's rows slice its image
            elif torch.is_tensor(value):
                assert value.dtype == batch_s[key].dtype and torch.equal(value, batch_s[key]), (step, key)
            else:
                assert value == batch_s[key], (step, key)


def test_lund_tiny_has_distortion_and_stream_knows_the_undistorted_cameras_before_step_0(lund_tiny: Path):
    raw = ColmapDataParser(ColmapDataParserConfig(data=lund_tiny, colmap_path=Path("sparse/0"))).get_dataparser_outputs("train").cameras
    assert raw.distortion_params.abs().sum() > 0, "lund_tiny's SIMPLE_RADIAL k1 makes this test meaningful"
    stream = lund(lund_tiny, "stream", prefetch_steps=2)
    cache = lund(lund_tiny, "cache")
    cache.cached_train, cache.cached_eval  # nerfstudio undistorts the cameras as it caches the images
    assert_same_cameras(stream.train_dataset.cameras, cache.train_dataset.cameras)
    assert_same_cameras(stream.eval_dataset.cameras, cache.eval_dataset.cameras)
    assert_same_cameras(stream.train_cameras, cache.train_cameras)
    assert not torch.equal(stream.train_cameras.width, raw.width), "undistortion crops: the sizes must have changed"
    assert stream._stream.decodes <= 3, "the cameras came from no image"


@pytest.mark.parametrize("cameras_per_step, image_type", [(1, "float32"), (3, "uint8")])
def test_stream_and_cache_give_identical_batches_for_100_steps(lund_tiny: Path, cameras_per_step: int, image_type: str):
    options = dict(cameras_per_step=cameras_per_step, cache_images_type=image_type)
    stream = lund(lund_tiny, "stream", **options)
    assert stream.member_rows == (cameras_per_step == 1)
    assert_same_steps(stream, lund(lund_tiny, "cache", **options), 100)


def test_masks_and_mixed_distortion_stream_like_cache(tmp_path: Path):
    data = write_photo_dataset(tmp_path / "d", 20, sizes=((256, 192), (200, 150)), k1=(0.0, 0.05, -0.03), masks=True)
    stream, cache = photos(data, "stream", cache_images_type="uint8"), photos(data, "cache", cache_images_type="uint8")
    assert_same_steps(stream, cache, 40)
    assert "mask" in cache.next_train(40)[1]
    assert_same_cameras(stream.eval_dataset.cameras, cache.eval_dataset.cameras)
    for (cam_s, data_s), (cam_c, data_c) in zip(stream.fixed_indices_eval_dataloader, cache.fixed_indices_eval_dataloader):
        assert_same_cameras(cam_s, cam_c)
        assert torch.equal(data_s["image"], data_c["image"]) and torch.equal(data_s["mask"], data_c["mask"])


@pytest.mark.parametrize("strategy", ["random", "fps"])
def test_the_order_drawn_ahead_is_the_order_drawn(tmp_path: Path, strategy: str):
    """The prefetch window is nerfstudio's own seeded order (across epochs, fps included), and drawing it
    ahead leaves the real order untouched: stream and cache still draw the same cameras."""
    data = write_photo_dataset(tmp_path / "d", 24, sizes=((256, 192), (192, 144)))
    options = dict(train_cameras_sampling_strategy=strategy, cameras_per_step=3, prefetch_steps=4)
    stream = photos(data, "stream", **options)
    ahead = stream.upcoming(30)  # 30 steps of at most 3 of 21 cameras: several epochs
    drawn = [stream.next_train(step)[0].metadata["cam_idx"] for step in range(30)]
    assert [b if isinstance(b, list) else [b] for b in drawn] == ahead
    cache = photos(data, "cache", **options)  # after: fps draws from numpy's global generator, which it seeds
    for step in range(30):
        assert cache.next_train(step)[0].metadata["cam_idx"] == drawn[step], step  # the real order was not moved


def model_for(datamanager):
    """The ms-splatfacto model on one CPU member, seeded from the scene's COLMAP points."""
    from ms_splatfacto.model import MsSplatfactoModelConfig

    torch.manual_seed(0)
    metadata = datamanager.train_dataparser_outputs.metadata
    model = MsSplatfactoModelConfig(devices="cpu", num_downscales=0, warmup_length=5, refine_every=5).setup(
        scene_box=datamanager.train_dataset.scene_box, num_train_data=len(datamanager.train_dataset),
        seed_points=(metadata["points3D_xyz"], metadata["points3D_rgb"]),
    )
    model.train()
    return model


def train_in_process(datamanager, steps: int) -> dict:
    model = model_for(datamanager)
    optimizers = {name: torch.optim.Adam(params, lr=1e-3, eps=1e-15) for name, params in model.get_gaussian_param_groups().items()}
    for step in range(steps):
        model.step_cb(SimpleNamespace(optimizers=optimizers), step)
        cameras, batch = datamanager.next_train(step)
        loss = sum(model.get_loss_dict(model.get_outputs(cameras), batch).values())
        optimize(model, optimizers, loss, step)
    return {name: model.gauss_params[name].detach().clone() for name in model.gauss_params}, float(loss)


def test_training_on_streamed_images_equals_training_on_cached_ones(lund_tiny: Path):
    options = dict(cache_images_type="uint8", cameras_per_step=2, camera_res_scale_factor=0.25)  # 64x48: cheap steps
    streamed, loss_s = train_in_process(lund(lund_tiny, "stream", **options), 10)
    cached, loss_c = train_in_process(lund(lund_tiny, "cache", **options), 10)
    assert loss_s == loss_c
    for name, value in cached.items():
        assert torch.equal(streamed[name], value), name


@pytest.mark.slow
def test_ns_train_checkpoints_equal_with_stream_and_cache(tmp_path: Path, lund_tiny: Path):
    extra = ("--pipeline.datamanager.camera-res-scale-factor", "0.5")  # 128x96 photos: cheaper steps
    runs = {mode: train(tmp_path / mode, lund_tiny, 20, "--pipeline.datamanager.images", mode, *extra) for mode in ("stream", "cache")}
    assert "Streaming 25 training images" in runs["stream"].stdout
    loaded = {mode: torch.load(next(run.checkpoint_dir.glob("step-*.ckpt")), weights_only=False)["pipeline"]
              for mode, run in runs.items()}
    params = [key for key in loaded["cache"] if "gauss_params" in key]
    assert len(params) == 6
    for key, value in loaded["cache"].items():
        assert torch.equal(loaded["stream"][key], value), key


def test_cache_never_exceeds_its_byte_budget(lund_tiny: Path):
    image_bytes = 256 * 192 * 3  # uint8 RGB, the undistorted image a cropped view of the full decode
    budget = 5 * image_bytes
    datamanager = lund(lund_tiny, "stream", cache_images_type="uint8", cache_bytes=budget, prefetch_steps=3, prefetch_workers=2,
                       member_rows=False)  # decoded images (member rows cache the files' bytes, a few KB each)
    stream = datamanager._stream
    for step in range(100):  # four epochs of 25 cameras
        datamanager.next_train(step)
        assert stream.held_bytes <= budget, step
    assert 0 < stream.peak_held_bytes <= budget
    assert stream.peak_decoding <= 2, "at most the workers' images are in flight beyond the budget"
    assert stream.decodes > 75, "a budget of 5 images cannot keep 25: every epoch decodes them again"


def fake_stream(budget: int, decoded: List[int]) -> ImageStream:
    def decode(idx: int):
        decoded.append(idx)
        if idx == 9:
            raise OSError("image file is truncated")
        return {"image": torch.zeros(100, dtype=torch.uint8)}

    return ImageStream(decode, lambda idx: 100, budget, workers=1)


def test_lru_evicts_least_recently_used_and_never_a_pinned_image():
    decoded: List[int] = []
    stream = fake_stream(300, decoded)
    for idx in (0, 1, 2):
        stream.get(idx)
    stream.get(0)  # now 1 is the least recently used
    stream.plan([3])
    stream.get(3)
    assert stream.ready(0) and not stream.ready(1) and stream.ready(2) and stream.ready(3)
    stream.plan([2, 3, 4], keep=1)  # pinned 2, 3, 4: 0 must go although 2 was used before it
    stream.get(4)
    assert not stream.ready(0) and stream.ready(2) and stream.ready(3) and stream.ready(4)
    assert stream.held_bytes == stream.peak_held_bytes == 300
    assert stream.get(9) is None and "truncated" in stream.bad[9] and stream.get(9) is None
    assert decoded.count(9) == 1, "a bad image is tried once"
    stream.close()


def test_step_0_arrives_before_the_images_are_read(tmp_path: Path):
    data = write_photo_dataset(tmp_path / "d", 200)
    datamanager = photos(data, "stream", prefetch_steps=4)
    datamanager.next_train(0)
    assert len(datamanager.train_dataset) == 180
    assert datamanager._stream.decodes <= 4 + 1, "step 0 should wait for its window at most, not for 180 images"


def order_dataset(tmp_path: Path, cameras: int = 40):
    """A photo dataset and its training cameras' seeded order (as nerfstudio draws it)."""
    data = write_photo_dataset(tmp_path / "d", cameras)
    probe = photos(data, "cache")
    return data, list(probe.train_unseen_cameras), probe.train_dataset.image_filenames


def test_a_truncated_image_is_skipped_with_one_line_and_counted(tmp_path: Path, capsys):
    data, order, files = order_dataset(tmp_path)
    bad = order[10]
    content = files[bad].read_bytes()
    files[bad].write_bytes(content[: len(content) // 2])
    datamanager = photos(data, "stream")
    drawn = [datamanager.next_train(step)[0].metadata["cam_idx"] for step in range(2 * len(order))]
    lines = [line for line in capsys.readouterr().out.splitlines() if files[bad].name in line]
    assert len(lines) == 1 and "Skipped unreadable training image" in lines[0] and "truncated" in lines[0], lines
    assert datamanager.skipped_images.keys() == {bad}
    assert drawn[:11] == order[:10] + [order[11]], "the step meeting it takes the next camera"
    first_epoch = drawn[: len(order) - 1]
    assert sorted(first_epoch) == sorted(set(order) - {bad}) and bad not in drawn


def test_a_truncated_evaluation_image_is_skipped_with_one_line_and_counted(tmp_path: Path, capsys):
    data = write_photo_dataset(tmp_path / "d", 40)
    datamanager = photos(data, "stream")
    files = datamanager.eval_dataset.image_filenames
    bad = 1
    files[bad].write_bytes(files[bad].read_bytes()[:900])
    readable = [i for i in range(len(files)) if i != bad]
    drawn = [int(datamanager.next_eval_image(step)[1]["image_idx"]) for step in range(2 * len(readable))]
    whole = list(datamanager.fixed_indices_eval_dataloader)
    lines = [line for line in capsys.readouterr().out.splitlines() if files[bad].name in line]
    assert len(lines) == 1 and "Skipped unreadable evaluation image" in lines[0] and "truncated" in lines[0], lines
    assert datamanager.skipped_eval_images.keys() == {bad}
    assert sorted(drawn[: len(readable)]) == readable, "each readable image once per round"
    assert [int(batch["image_idx"]) for _, batch in whole] == readable
    assert all(batch["image"].shape[:2] == (192, 256) for _, batch in whole)


def _draw_on_this_rank(folders: List[str], steps: int):
    """One rank's training cameras for `steps` steps from its own copy of the dataset, and what it skipped."""
    from ms_splatfacto.backend.aggregate import world

    datamanager = photos(Path(folders[world.rank()]), "stream")
    drawn = [datamanager.next_train(step)[0].metadata["cam_idx"] for step in range(steps)]
    return drawn, datamanager.skipped_images


def test_a_file_unreadable_on_one_rank_only_is_skipped_by_every_rank(tmp_path: Path):
    data, order, files = order_dataset(tmp_path)
    copy = tmp_path / "rank1"
    shutil.copytree(data, copy)
    bad = order[6]
    broken = copy / files[bad].relative_to(data)
    broken.write_bytes(broken.read_bytes()[:900])  # rank 1's copy only
    (drawn0, skipped0), (drawn1, skipped1) = run_ranks(2, _draw_on_this_rank, [str(data), str(copy)], len(order), tmp=tmp_path)
    assert drawn0 == drawn1 and bad not in drawn0 and drawn0[:7] == order[:6] + [order[7]]
    assert skipped0.keys() == skipped1.keys() == {bad}
    assert "unreadable on rank 1 but not here" in skipped0[bad] and "truncated" in skipped1[bad]


def test_too_many_unreadable_images_stop_training_with_one_clear_line(tmp_path: Path):
    data, order, files = order_dataset(tmp_path)  # 36 training images: 5% allows one
    for position, content in ((2, b""), (5, b"not a jpeg"), (8, None)):
        files[order[position]].write_bytes(content if content is not None else files[order[position]].read_bytes()[:900])
    datamanager = photos(data, "stream")
    with pytest.raises(InputError) as stop:
        for step in range(len(order)):
            datamanager.next_train(step)
    message = str(stop.value)
    assert "\n" not in message and "2 of 36 training images cannot be read" in message, message
    assert "max-bad-image-fraction 0.05" in message and files[order[5]].name in message
    tolerant = photos(data, "stream", max_bad_image_fraction=0.1)
    for step in range(len(order)):
        tolerant.next_train(step)
    assert len(tolerant.skipped_images) == 3


def test_auto_streams_above_the_threshold_from_the_decoded_size(lund_tiny: Path):
    decoded = 25 * 256 * 192 * 3  # uint8 RGB
    assert lund(lund_tiny, "auto", cache_images_type="uint8", stream_above_bytes=decoded).images_mode == "cache"
    assert lund(lund_tiny, "auto", cache_images_type="uint8", stream_above_bytes=decoded - 1).images_mode == "stream"
    assert lund(lund_tiny, "auto", cache_images_type="float32", stream_above_bytes=decoded).images_mode == "stream"


def test_impossible_settings_are_refused_naming_the_option(lund_tiny: Path):
    with pytest.raises(InputError, match=re.escape("--pipeline.datamanager.prefetch-workers must be at least 1, got 0")):
        lund(lund_tiny, "stream", prefetch_workers=0)


@pytest.mark.slow
def test_memory_stays_flat_from_500_to_2000_cameras(tmp_path: Path):
    """The procedural city at 2,000 views of 256x192 and an evenly spread 500 of them; the data path alone
    (datamanager, 50 steps of 4 cameras, no model: full training of 2,000 cameras is too slow on this CPU)
    in fresh processes; peak RSS is the process's own high-water mark (see `probe`)."""
    budget, margin = 16 * 2**20, 100 * 2**20
    city = city_dataset(tmp_path / "city", 2000)
    runs = {}
    for cameras in (500, 2000):
        data = subset_dataset(city, tmp_path / str(cameras), cameras) if cameras < 2000 else city
        runs[cameras] = run_probe(data, "stream", steps=50, step_s=0.0, cache_bytes=budget, cameras_per_step=4)
    big = runs[2000]
    assert big["train_images"] == 1800 and big["train_images"] * 256 * 192 * 3 > 10 * budget
    assert big["peak_held_bytes"] <= budget
    assert big["data_peak_bytes"] < budget + margin, big
    assert big["peak_rss_bytes"] - runs[500]["peak_rss_bytes"] < 150 * 2**20, runs
