"""Full-image datamanager that hands the model several training cameras per step.

Splitting tiles over members pays off most when a step renders several cameras: the camera-major tile
list is long enough for every member to get whole cameras' worth of tiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple, Type

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanager, FullImageDatamanagerConfig


@dataclass
class MsDatamanagerConfig(FullImageDatamanagerConfig):
    """nerfstudio's full-image datamanager with a batch of cameras per training step."""

    _target: Type = field(default_factory=lambda: MsDatamanager)
    cameras_per_step: int = 1
    """Training cameras rendered per step (all must share one image size); each epoch still visits every camera once."""


class MsDatamanager(FullImageDatamanager):
    config: MsDatamanagerConfig

    def next_train(self, step: int) -> Tuple[Cameras, Dict]:
        """One camera as nerfstudio gives it, or `cameras_per_step` of them: Cameras [B] and each
        per-image entry of the batch (image, mask) stacked to [B, H, W, ...]."""
        if self.config.cameras_per_step == 1:
            return super().next_train(step)
        indices, datas = [], []
        for _ in range(self.config.cameras_per_step):
            camera, data = super().next_train(step)
            indices.append(camera.metadata["cam_idx"])
            datas.append(data)
        sizes = {tuple(d["image"].shape) for d in datas}
        if len(sizes) != 1:
            raise ValueError(
                f"--pipeline.datamanager.cameras-per-step {self.config.cameras_per_step} needs training images of "
                f"one size, but this step drew images of sizes {sorted(sizes)}; use cameras-per-step 1."
            )
        cameras = self.train_cameras[torch.tensor(indices)].to(self.device)
        cameras.metadata = {"cam_idx": indices}
        batch = {key: torch.stack([d[key] for d in datas]) for key in datas[0] if torch.is_tensor(datas[0][key])}
        return cameras, batch
