"""One interface, several kernel sets: `reference` (pure PyTorch), `cpu` (C++/OpenMP), `cuda` (gsplat).

A kernel set is a module exposing the five functions of `reference` with the same signatures:
`project`, `spherical_harmonics`, `isect_tiles`, `isect_offset_encode`, `rasterize_to_pixels`.
Sets are imported lazily, so importing the backend needs torch alone.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

KERNEL_SETS = {
    "reference": "ms_splatfacto.backend.kernels.reference",
    "cpu": "ms_splatfacto.backend.kernels.cpu",
    "cuda": "ms_splatfacto.backend.kernels.gsplat_cuda",
}
"""Kernel set name -> module implementing it."""

DEFAULT_FOR_DEVICE_TYPE = {"cpu": "cpu", "cuda": "cuda"}
"""Which kernel set runs tensors of a given device type when none is named."""


def get_kernels(name: str) -> ModuleType:
    """The kernel set called `name` (see `KERNEL_SETS`)."""
    if name not in KERNEL_SETS:
        raise ValueError(f"Unknown kernel set {name!r}; choose one of {sorted(KERNEL_SETS)}.")
    return importlib.import_module(KERNEL_SETS[name])


def kernels_for(device: torch.device) -> ModuleType:
    """The default kernel set for tensors on `device`."""
    if device.type not in DEFAULT_FOR_DEVICE_TYPE:
        raise ValueError(
            f"No kernels for device type {device.type!r}; supported: {sorted(DEFAULT_FOR_DEVICE_TYPE)}."
        )
    return get_kernels(DEFAULT_FOR_DEVICE_TYPE[device.type])
