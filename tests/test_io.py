"""Checkpoint writing: atomic replacement, and contents that torch's safe loader accepts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ms_splatfacto.io import atomic_path, atomic_torch_save
from ms_splatfacto.checkpoints import plain_numbers


def test_failed_write_keeps_the_previous_file(tmp_path: Path):
    target = tmp_path / "step-000000001.ckpt"
    atomic_torch_save({"step": 1, "x": torch.arange(3)}, target)
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_path(target) as partial:
            partial.write_bytes(b"half a checkpoint")
            raise RuntimeError("interrupted")
    assert torch.equal(torch.load(target)["x"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary left behind


def test_successful_write_replaces_the_file(tmp_path: Path):
    target = tmp_path / "ckpt"
    atomic_torch_save({"step": 1}, target)
    atomic_torch_save({"step": 2}, target)
    assert torch.load(target)["step"] == 2 and len(list(tmp_path.iterdir())) == 1


def test_numpy_scalars_become_numbers_the_safe_loader_accepts(tmp_path: Path):
    state = {"optimizers": {"means": {"param_groups": [{"lr": np.float64(1.6e-4), "params": [0]}]}},
             "schedulers": {"means": {"_last_lr": [np.float64(1.6e-4)]}}, "step": 7, "t": torch.ones(2)}
    torch.save(state, tmp_path / "raw")
    with pytest.raises(Exception, match="numpy"):
        torch.load(tmp_path / "raw", weights_only=True)  # what nerfstudio's loaders do under torch >= 2.6
    atomic_torch_save(plain_numbers(state), tmp_path / "plain")
    loaded = torch.load(tmp_path / "plain", weights_only=True)
    assert loaded["optimizers"]["means"]["param_groups"][0]["lr"] == pytest.approx(1.6e-4)
    assert type(loaded["schedulers"]["means"]["_last_lr"][0]) is float and torch.equal(loaded["t"], torch.ones(2))
