"""Trainer for ms-splatfacto: nerfstudio's, with the device taken from the model's device spec,
checkpoints that load on any ranks x members (written atomically, refused when they do not fit), and
steps with non-finite values skipped.

Under torchrun every rank runs this same trainer (SPMD; see `launch.py`): nerfstudio sees one process
(no DDP wrap: the parameters are already striped), rank 0 alone prints, writes the config, events and
checkpoint metadata, and the ranks refuse to start when they disagree on data, members or code.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Literal, Optional, Tuple, Type

import torch
from nerfstudio.engine.trainer import TRAIN_INTERATION_OUTPUT, Trainer, TrainerConfig
from nerfstudio.utils.rich_utils import CONSOLE

from ms_splatfacto import launch
from ms_splatfacto.backend import DeviceSpecError, parse_devices
from ms_splatfacto.backend.aggregate import world
from ms_splatfacto.backend.threads import available_cores, choose_threads, configure_threads, wait_policy_note
from ms_splatfacto.checkpoints import (
    checkpoint_path,
    checkpoint_state,
    first_nonfinite,
    install_eval_loader,
    read_checkpoint,
    restore,
    write_checkpoint,
)
from ms_splatfacto.data_checks import check_images_readable, preflight
from ms_splatfacto.errors import InputError, TrainingStopped

install_eval_loader()  # where eval_utils is already imported; else when eval_setup reads the config


@dataclass
class MsTrainerConfig(TrainerConfig):
    """TrainerConfig whose device follows `--pipeline.model.devices` (no `--machine.device-type` needed)."""

    _target: Type = field(default_factory=lambda: MsTrainer)
    max_nonfinite_steps: int = 10
    """Consecutive training steps with a non-finite loss or gradient (each one skipped: no optimizer step, no densification statistics) after which training stops, naming the value that went bad first."""
    cpu_threads: int = 0
    """Threads per process for torch and the CPU kernels (0: the cores this process may run on, divided among this machine's ranks). Never more than those cores: threads sharing a core wait for each other at every barrier."""
    collective_timeout_s: float = 180.0
    """Under torchrun: seconds a rank waits for the others in a collective. A rank that died or hangs makes the others stop within it, with one line naming it; the last complete checkpoint stays loadable."""

    def __setstate__(self, state) -> None:
        """How `eval_setup` (ns-viewer, ns-eval, ns-export) builds this config from config.yml, once its
        module is complete: the moment to let it read sharded checkpoints."""
        install_eval_loader()
        self.__dict__.update(state)

    def set_timestamp(self) -> None:
        """nerfstudio's first call after parsing: under torchrun, join the ranks here, so that every rank
        uses rank 0's timestamp (one output folder) and only rank 0 prints and saves the config."""
        if launch.join(self.collective_timeout_s):
            launch.adapt_config(self)
        super().set_timestamp()
        if world.active():
            self.timestamp = world.all_gather_object(self.timestamp)[0]

    def print_to_terminal(self) -> None:
        if world.rank() == 0:
            super().print_to_terminal()

    def save_config(self) -> None:
        if world.rank() == 0:
            super().save_config()


def restart_with_passive_waits(argv: List[str]) -> None:
    """Start `ns-train ms-splatfacto` again, the same command, with OMP_WAIT_POLICY=PASSIVE where torch
    started the OpenMP runtime before the package could set it and more than one thread may run: spinning
    threads made a step with a competing job on the machine 3.9x slower instead of 2x
    (benchmarks/under_load.py). Called while nerfstudio discovers the method, before anything is written
    or any rank joins the others (under torchrun each rank restarts in place, keeping its process and
    environment); never in a Python session, a test, or another command."""
    import ms_splatfacto

    if ms_splatfacto.WAIT_POLICY_APPLIED or Path(argv[0]).name != "ns-train" or argv[1:2] != ["ms-splatfacto"]:
        return
    requested = argv[argv.index("--cpu-threads") + 1] if "--cpu-threads" in argv[:-1] else None
    if choose_threads(available_cores(), os.environ, int(requested) if requested and requested.isdigit() and requested != "0" else None) <= 1:
        return
    print("ms-splatfacto: restarting with OMP_WAIT_POLICY=PASSIVE, so OpenMP threads sleep rather than spin while they "
          "wait (set OMP_WAIT_POLICY yourself to skip this)", flush=True)
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))


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
        if launch.join(config.collective_timeout_s):
            launch.adapt_config(config)
            with launch.collective_failures(None):
                launch.agree(launch.start_identity(config, members))
            # nerfstudio's `local_rank == 0` decides who serves the viewer: rank 0 of the whole run. One
            # process as far as nerfstudio knows (world_size 1): no DDP wrap of striped parameters.
            local_rank, world_size = world.rank(), 1
        threads = configure_threads(config.cpu_threads or None)
        if device.type == "cpu":
            CONSOLE.log(f"CPU threads per process: {threads} (of {available_cores()} cores this process may run on)")
            if wait_policy_note(threads):
                CONSOLE.log(wait_policy_note(threads))
        super().__init__(config, local_rank, world_size)
        self.device = str(device)
        self.nonfinite_steps = 0
        """Steps skipped for non-finite values in this run."""
        self.nonfinite_streak: Optional[Tuple[int, int, str]] = None
        """(first step, length, what went bad first) of the current run of skipped steps."""

    def setup(self, test_mode: Literal["test", "val", "inference"] = "val") -> None:
        datamanager = self.config.pipeline.datamanager
        preflight(datamanager.dataparser, datamanager.data)
        with self._collective_failures():
            try:
                super().setup(test_mode)
            except OSError as err:  # unreadable or vanished files, named by the error itself
                raise InputError(f"Cannot read the dataset: {err}") from None
            datamanager = self.pipeline.datamanager
            streamed = getattr(datamanager, "images_mode", "cache") == "stream"  # unreadable ones are skipped and counted
            for dataset in [datamanager.eval_dataset] if streamed else [datamanager.train_dataset, datamanager.eval_dataset]:
                check_images_readable(dataset.image_filenames)
            if world.active():
                launch.agree(launch.data_identity(self.pipeline.datamanager))

    def train(self) -> None:
        with self._collective_failures():
            super().train()

    def _collective_failures(self):
        return launch.collective_failures(self.checkpoint_dir)

    def _load_checkpoint(self) -> None:
        """nerfstudio's `--load-dir` / `--load-step` / `--load-checkpoint`, on any ranks x members, refusing
        a checkpoint that does not fit the model with one line saying what differs."""
        path = self._checkpoint_to_load()
        if path is None:
            CONSOLE.print("No Nerfstudio checkpoint to load, so training from scratch.")
            return
        loaded = read_checkpoint(path, self._unwrapped_pipeline().model.members)
        restore(loaded, self._unwrapped_pipeline(), self.optimizers, self.grad_scaler, self.config.load_scheduler)
        self._start_step = loaded["step"] + 1
        layout = loaded.get("layout") or {}
        written = f" written on {layout['devices']} (rows per member {layout['rows_per_member']})" if layout else ""
        CONSOLE.print(f"Done loading Nerfstudio checkpoint from {path}{written} onto {self.pipeline.model.members}.")

    def _checkpoint_to_load(self) -> Optional[Path]:
        """The checkpoint `--load-dir` (latest, or `--load-step`) or `--load-checkpoint` names. Unlike
        nerfstudio's, other files in the folder (a temporary left by a killed save) are ignored."""
        if self.config.load_dir is None:
            return self.config.load_checkpoint
        return checkpoint_path(self.config.load_dir, self.config.load_step)

    def _unwrapped_pipeline(self):
        return self.pipeline.module if hasattr(self.pipeline, "module") else self.pipeline

    def save_checkpoint(self, step: int) -> None:
        """As nerfstudio's, with the layout, random generators and camera order recorded, never from
        non-finite parameters, and written atomically (see `write_checkpoint`; several members, in one
        process or over ranks, write one sharded folder, each its own rows): an interrupted save keeps
        the previous checkpoint."""
        pipeline = self._unwrapped_pipeline()
        bad = first_nonfinite(pipeline.model.named_parameters())
        if bad is not None:
            CONSOLE.log(f"[yellow]Checkpoint of step {step} not written: {bad} holds non-finite values.[/yellow]")
            return
        path = write_checkpoint(checkpoint_state(step, pipeline, self.optimizers, self.grad_scaler), self.checkpoint_dir, step)
        if self.config.save_only_latest_checkpoint and world.rank() == 0:
            for old in self.checkpoint_dir.glob("*.ckpt"):
                if old != path:
                    shutil.rmtree(old) if old.is_dir() else old.unlink()

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
