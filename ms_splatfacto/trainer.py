"""Trainer for ms-splatfacto: nerfstudio's, with the device taken from the model's device spec,
checkpoints that load on any member count (written atomically, refused when they do not fit), and
steps with non-finite values skipped."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Tuple, Type

import torch
from nerfstudio.engine.trainer import TRAIN_INTERATION_OUTPUT, Trainer, TrainerConfig
from nerfstudio.utils.rich_utils import CONSOLE

from ms_splatfacto.backend import DeviceSpecError, parse_devices
from ms_splatfacto.checkpoints import checkpoint_state, first_nonfinite, read_checkpoint, restore
from ms_splatfacto.data_checks import check_images_readable, preflight
from ms_splatfacto.errors import InputError, TrainingStopped
from ms_splatfacto.io import atomic_torch_save


@dataclass
class MsTrainerConfig(TrainerConfig):
    """TrainerConfig whose device follows `--pipeline.model.devices` (no `--machine.device-type` needed)."""

    _target: Type = field(default_factory=lambda: MsTrainer)
    max_nonfinite_steps: int = 10
    """Consecutive training steps with a non-finite loss or gradient (each one skipped: no optimizer step, no densification statistics) after which training stops, naming the value that went bad first."""


class MsTrainer(Trainer):
    config: MsTrainerConfig

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
        self.nonfinite_steps = 0
        """Steps skipped for non-finite values in this run."""
        self.nonfinite_streak: Optional[Tuple[int, int, str]] = None
        """(first step, length, what went bad first) of the current run of skipped steps."""

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
        """nerfstudio's `--load-dir` / `--load-step` / `--load-checkpoint`, on any member count, refusing a
        checkpoint that does not fit the model with one line saying what differs."""
        path = self._checkpoint_to_load()
        if path is None:
            CONSOLE.print("No Nerfstudio checkpoint to load, so training from scratch.")
            return
        loaded = read_checkpoint(path)
        restore(loaded, self._unwrapped_pipeline(), self.optimizers, self.grad_scaler, self.config.load_scheduler)
        self._start_step = loaded["step"] + 1
        layout = loaded.get("layout") or {}
        written = f" written on {layout['devices']} (rows per member {layout['rows_per_member']})" if layout else ""
        CONSOLE.print(f"Done loading Nerfstudio checkpoint from {path}{written} onto {self.pipeline.model.members}.")

    def _checkpoint_to_load(self) -> Optional[Path]:
        """The checkpoint `--load-dir` (latest, or `--load-step`) or `--load-checkpoint` names. Unlike
        nerfstudio's, other files in the folder (a temporary left by a killed save) are ignored."""
        load_dir, step = self.config.load_dir, self.config.load_step
        if load_dir is None:
            return self.config.load_checkpoint
        if step is None:
            names = (re.fullmatch(r"step-(\d+)\.ckpt", p.name) for p in Path(load_dir).glob("step-*.ckpt"))
            steps = sorted(int(m.group(1)) for m in names if m)
            if not steps:
                raise InputError(f"No checkpoint (step-*.ckpt) in {load_dir}.")
            step = steps[-1]
        return Path(load_dir) / f"step-{step:09d}.ckpt"

    def _unwrapped_pipeline(self):
        return self.pipeline.module if hasattr(self.pipeline, "module") else self.pipeline

    def save_checkpoint(self, step: int) -> None:
        """As nerfstudio's, with the layout recorded, never from non-finite parameters, and written
        atomically (the temporary beside the checkpoint folder, so nerfstudio's loaders never see it):
        an interrupted save keeps the previous checkpoint."""
        pipeline = self._unwrapped_pipeline()
        bad = first_nonfinite(pipeline.model.named_parameters())
        if bad is not None:
            CONSOLE.log(f"[yellow]Checkpoint of step {step} not written: {bad} holds non-finite values.[/yellow]")
            return
        path = self.checkpoint_dir / f"step-{step:09d}.ckpt"
        atomic_torch_save(checkpoint_state(step, pipeline, self.optimizers, self.grad_scaler), path, self.checkpoint_dir.parent)
        if self.config.save_only_latest_checkpoint:
            for old in self.checkpoint_dir.glob("*.ckpt"):
                if old != path:
                    old.unlink()

    def train_iteration(self, step: int) -> TRAIN_INTERATION_OUTPUT:
        """nerfstudio's iteration, except that a step whose loss or any gradient is not finite is skipped
        (gradients zeroed; no optimizer, scheduler or densification-statistics step) and counted, and
        `max_nonfinite_steps` skipped in a row stop training."""
        if self.grad_scaler.is_enabled():  # mixed precision: the scaler skips steps whose gradients overflowed
            return super().train_iteration(step)
        groups = list(self.optimizers.parameters)
        accumulate = self.gradient_accumulation_steps
        self.optimizers.zero_grad_some([g for g in groups if step % accumulate[g] == 0])
        _, loss_dict, metrics_dict = self.pipeline.get_train_loss_dict(step=step)
        loss = functools.reduce(torch.add, loss_dict.values())
        loss.backward()
        model = self.pipeline.model
        params = list(model.named_parameters())
        bad = first_nonfinite([("the loss", loss), *((f"the gradient of {n}", p.grad) for n, p in params)])
        model.skip_step = bad is not None  # read by the model's step_post_backward
        if bad is None:
            self.nonfinite_streak = None
            self.optimizers.optimizer_scaler_step_some(self.grad_scaler, [g for g in groups if step % accumulate[g] == accumulate[g] - 1])
            self.optimizers.scheduler_step_all(step)
        else:
            self._skip_step(step, first_nonfinite((f"parameter {n}", p) for n, p in params) or bad)
        if self.config.log_gradients:
            norms = {f"Gradients/{n}": p.grad.norm() for n, p in params if p.grad is not None}
            metrics_dict.update(norms, **{"Gradients/Total": sum(norms.values())})
        metrics_dict["nonfinite_steps"] = self.nonfinite_steps
        return loss, loss_dict, metrics_dict

    def _skip_step(self, step: int, bad: str) -> None:
        """Drop this step's gradients, count it, and stop after `max_nonfinite_steps` in a row."""
        self.optimizers.zero_grad_all()
        self.nonfinite_steps += 1
        first, streak, first_bad = self.nonfinite_streak or (step, 0, bad)
        self.nonfinite_streak = (first, streak + 1, first_bad)
        CONSOLE.log(f"[yellow]Step {step} skipped: {bad} is not finite ({streak + 1} in a row).[/yellow]")
        if streak + 1 >= self.config.max_nonfinite_steps:
            raise TrainingStopped(
                f"Training stopped after {streak + 1} steps in a row with non-finite values, from step {first} on: "
                f"{first_bad} went bad first. Checkpoints hold no step with non-finite values."
            )
