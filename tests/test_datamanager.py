"""The datamanager's batches of training cameras: the right cameras with their own images."""

from __future__ import annotations

from pathlib import Path

import torch
from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig

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
