"""The splatting backend: device specs, kernel sets and the rendering pipeline. Needs torch alone."""

from ms_splatfacto.backend.devices import DeviceSpecError, available_devices, parse_devices
from ms_splatfacto.backend.kernels import get_kernels, kernels_for
from ms_splatfacto.backend.rendering import rasterization

__all__ = ["DeviceSpecError", "available_devices", "parse_devices", "get_kernels", "kernels_for", "rasterization"]
