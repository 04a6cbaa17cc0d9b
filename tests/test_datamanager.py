"""The datamanager's batches of training cameras: the right cameras with their own images, one image size per batch."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

from ms_splatfacto.datamanager import MsDatamanagerConfig


def test_batches_hold_distinct_cameras_with_their_images(lund_tiny: Path):
    config = MsDatamanagerConfig(
        dataparser=ColmapDataParserConfig(data=lund_tiny, colmap_path=Path("sparse/0")), cameras_per_step=3
    )
    datamanager = config.setup(device="cpu")
    seen = []
    for step in range(3):
        cameras, batch = datamanager.next_train(step)
        indices = cameras.metadata["cam_idx"]
        assert cameras.shape == (3,) and len(set(indices)) == 3
        assert batch["image"].shape == (3, int(cameras.height[0]), int(cameras.width[0]), 3)
        for i, index in enumerate(indices):
            assert torch.equal(batch["image"][i], datamanager.cached_train[index]["image"])
            assert torch.equal(cameras.camera_to_worlds[i], datamanager.train_cameras.camera_to_worlds[index])
        seen += indices
    assert len(set(seen)) == 9, "an epoch visits each camera once before repeating"


def test_mixed_image_sizes_batch_by_size_and_each_epoch_visits_every_camera_once(tmp_path: Path):
    from benchmarks.data_stream import write_photo_dataset

    data = write_photo_dataset(tmp_path / "d", 30, sizes=((256, 192), (256, 192), (192, 144)))
    datamanager = MsDatamanagerConfig(dataparser=NerfstudioDataParserConfig(data=data), cameras_per_step=4).setup(device="cpu")
    count = len(datamanager.train_dataset)
    drawn, sizes, short = [], set(), 0
    for step in range(40):
        cameras, batch = datamanager.next_train(step)
        indices = cameras.metadata["cam_idx"]
        size = {(int(h), int(w)) for h, w in zip(cameras.height.reshape(-1), cameras.width.reshape(-1))}
        assert len(size) == 1, f"step {step} mixes sizes {size}"
        (h, w), = size
        assert batch["image"].shape == (len(indices), h, w, 3)
        for i, index in enumerate(indices):
            assert torch.equal(batch["image"][i], datamanager.cached_train[index]["image"])
        drawn += indices
        sizes.add((h, w))
        short += len(indices) < 4
    assert sizes == {(192, 256), (144, 192)}
    epochs = len(drawn) // count
    assert epochs >= 4
    for epoch in range(epochs):
        assert sorted(drawn[epoch * count : (epoch + 1) * count]) == list(range(count)), f"epoch {epoch}"
    assert short <= 2 * (epochs + 1), "batches are short only where a size runs out in an epoch"


def test_the_model_trains_on_batches_of_two_sizes(tmp_path: Path):
    from benchmarks.data_stream import write_photo_dataset
    from ms_splatfacto.model import MsSplatfactoModelConfig

    data = write_photo_dataset(tmp_path / "d", 12, sizes=((128, 96), (96, 72)))
    datamanager = MsDatamanagerConfig(dataparser=NerfstudioDataParserConfig(data=data), cameras_per_step=4, images="stream").setup(device="cpu")
    torch.manual_seed(0)
    model = MsSplatfactoModelConfig(devices="cpu", num_random=300, random_scale=4.0, num_downscales=0).setup(
        scene_box=datamanager.train_dataset.scene_box, num_train_data=len(datamanager.train_dataset)
    )
    model.train()
    optimizers = {name: torch.optim.Adam(params, lr=1e-3) for name, params in model.get_gaussian_param_groups().items()}
    widths = set()
    for step in range(3):
        model.step_cb(SimpleNamespace(optimizers=optimizers), step)
        cameras, batch = datamanager.next_train(step)
        loss = sum(model.get_loss_dict(model.get_outputs(cameras), batch).values())
        loss.backward()
        assert torch.isfinite(loss)
        widths.add(int(cameras.width[0]))
    assert widths == {128, 96}
