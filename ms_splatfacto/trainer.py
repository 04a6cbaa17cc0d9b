"""Trainer for ms-splatfacto: nerfstudio's, with the device taken from the model's device spec,
atomic checkpoints, and optimizers that follow the parameters a checkpoint load creates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Type

import numpy as np

from nerfstudio.engine.optimizers import Optimizers
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from torch.nn import Parameter

from ms_splatfacto.backend import DeviceSpecError, parse_devices
from ms_splatfacto.backend.aggregate import restripe_optimizer_state
from ms_splatfacto.data_checks import check_images_readable, preflight
from ms_splatfacto.errors import InputError
from ms_splatfacto.io import atomic_torch_save


@dataclass
class MsTrainerConfig(TrainerConfig):
    """TrainerConfig whose device follows `--pipeline.model.devices` (no `--machine.device-type` needed)."""

    _target: Type = field(default_factory=lambda: MsTrainer)


class MsTrainer(Trainer):
    def __init__(self, config: MsTrainerConfig, local_rank: int = 0, world_size: int = 1) -> None:
        spec = config.pipeline.model.devices
        try:
            members = parse_devices(spec)
        except DeviceSpecError as err:
            raise InputError(str(err)) from None
        device = members[0]  # the aggregate device reports its first member's device
        config.machine.device_type = device.type  # nerfstudio reads it for autocast and AMP decisions
        super().__init__(config, local_rank, world_size)
        self.device = str(device)

    def setup(self, test_mode: Literal["test", "val", "inference"] = "val") -> None:
        datamanager = self.config.pipeline.datamanager
        preflight(datamanager.dataparser, datamanager.data)
        try:
            super().setup(test_mode)
        except OSError as err:  # unreadable or vanished files, named by the error itself
            raise InputError(f"Cannot read the dataset: {err}") from None
        for dataset in (self.pipeline.datamanager.train_dataset, self.pipeline.datamanager.eval_dataset):
            check_images_readable(dataset.image_filenames)

    def _load_checkpoint(self) -> None:
        super()._load_checkpoint()
        repoint_optimizers(self.optimizers, self.pipeline.model.get_param_groups())
        for optimizer in self.optimizers.optimizers.values():
            restripe_optimizer_state(optimizer)  # loaded moments are ordinary; stripe them like their rows

    def save_checkpoint(self, step: int) -> None:
        """As nerfstudio's, but written atomically: an interrupted save keeps the previous checkpoint."""
        path = self.checkpoint_dir / f"step-{step:09d}.ckpt"
        pipeline = self.pipeline.module if hasattr(self.pipeline, "module") else self.pipeline
        atomic_torch_save(
            plain_numbers({
                "step": step,
                "pipeline": pipeline.state_dict(),
                "optimizers": {k: v.state_dict() for k, v in self.optimizers.optimizers.items()},
                "schedulers": {k: v.state_dict() for k, v in self.optimizers.schedulers.items()},
                "scalers": self.grad_scaler.state_dict(),
            }),
            path,
        )
        if self.config.save_only_latest_checkpoint:
            for old in self.checkpoint_dir.glob("*.ckpt"):
                if old != path:
                    old.unlink()


def repoint_optimizers(optimizers: Optimizers, param_groups: Dict[str, List[Parameter]]) -> None:
    """Make each optimizer hold the model's current parameters, carrying their state across.

    Loading a splatfacto checkpoint replaces the Gaussian parameters with new tensors of the saved
    size, while the optimizers still hold the old ones (nerfstudio issue 3554), so training after a
    resume would update tensors the model no longer uses.
    """
    for name, params in param_groups.items():
        optimizer = optimizers.optimizers.get(name)
        if optimizer is None:
            continue
        (group,) = optimizer.param_groups
        for old, new in zip(list(group["params"]), params):
            if old is not new and old in optimizer.state:
                optimizer.state[new] = optimizer.state.pop(old)
        group["params"] = list(params)
        optimizers.parameters[name] = list(params)


def plain_numbers(obj: Any) -> Any:
    """`obj` with numpy scalars turned into Python numbers.

    nerfstudio's schedulers leave numpy floats in optimizer and scheduler state, which
    `torch.load(weights_only=True)` (the default since torch 2.6) refuses, so the viewer, the exporter
    and resuming could not read the checkpoint.
    """
    if isinstance(obj, dict):
        return {key: plain_numbers(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain_numbers(value) for value in obj)
    return obj.item() if isinstance(obj, np.generic) else obj
