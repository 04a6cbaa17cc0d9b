"""CPU kernel set: C++/OpenMP kernels from `csrc/cpu`, same interface as `reference`."""

from ms_splatfacto.backend.kernels._cpu_projection import project, spherical_harmonics, spherical_harmonics_backward
from ms_splatfacto.backend.kernels._cpu_rasterize import (evaluation_counts, isect_offset_encode, isect_tiles,
                                                             rasterize_to_pixels, rasterize_to_pixels_direct,
                                                             rasterize_to_pixels_direct_backward)

KEEPS_FLOAT64_SUMS = True
"""`rasterize_to_pixels(..., float64_sums={})` hands back the per-Gaussian gradient sums unrounded, so
the tile rasterizer sends them to their owners in float64."""

__all__ = ["project", "spherical_harmonics", "spherical_harmonics_backward", "isect_tiles", "isect_offset_encode", "rasterize_to_pixels",
           "evaluation_counts", "rasterize_to_pixels_direct", "rasterize_to_pixels_direct_backward"]
