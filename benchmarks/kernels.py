"""Per-operator time of a kernel set on a random scene (forward and backward), one camera.

    .venv/bin/python benchmarks/kernels.py --gaussians 100000 --kernels cpu
    .venv/bin/python benchmarks/kernels.py --gaussians 5000 --kernels cpu reference

Prints a table and writes benchmarks/results/kernels_<N>.json.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List

import torch
import tyro
from rich.console import Console
from rich.table import Table

from ms_splatfacto.backend.kernels import get_kernels

REPO = Path(__file__).resolve().parents[1]


@dataclass
class KernelBenchConfig:
    gaussians: int = 100_000
    """Number of Gaussians in the random scene."""
    width: int = 256
    height: int = 192
    kernels: List[str] = field(default_factory=lambda: ["cpu"])
    """Kernel sets to time."""
    repeats: int = 5
    """Timed repeats after one warm-up; the median is reported."""
    output: Path = REPO / "benchmarks" / "results"


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def scene(n: int, width: int, height: int):
    g = torch.Generator().manual_seed(0)
    means = torch.randn(n, 3, generator=g) * torch.tensor([3.0, 2.0, 1.0]) + torch.tensor([0.0, 0.0, 8.0])
    return dict(
        means=means.requires_grad_(), quats=torch.randn(n, 4, generator=g).requires_grad_(),
        scales=(torch.rand(n, 3, generator=g) * 0.05 + 0.005).requires_grad_(),
        opacities=torch.rand(n, generator=g) * 0.9 + 0.05, sh=torch.randn(n, 16, 3, generator=g) * 0.3,
        viewmats=torch.eye(4)[None], Ks=torch.tensor([[[float(width), 0, width / 2], [0, float(width), height / 2], [0, 0, 1]]]),
    )


def time_kernels(name: str, config: KernelBenchConfig) -> dict:
    k, s, (W, H) = get_kernels(name), scene(config.gaussians, config.width, config.height), (config.width, config.height)
    tw, th = math.ceil(W / 16), math.ceil(H / 16)
    proj = k.project(s["means"], s["quats"], s["scales"], s["viewmats"], s["Ks"], W, H)
    radii, means2d, depths, conics, _ = proj
    dirs = s["means"].detach()[None].clone().requires_grad_()  # camera at the origin
    sh_out = k.spherical_harmonics(3, dirs, s["sh"].requires_grad_(), masks=radii > 0)
    _, isect_ids, flatten_ids = k.isect_tiles(means2d, radii, depths, 16, tw, th)
    offsets = k.isect_offset_encode(isect_ids, 1, tw, th)
    m2d, con, col = means2d.detach().requires_grad_(), conics.detach().requires_grad_(), torch.rand(1, config.gaussians, 3).requires_grad_()
    opa = s["opacities"][None].clone().requires_grad_()
    raster = lambda: k.rasterize_to_pixels(m2d, con, col, opa, W, H, 16, offsets, flatten_ids)  # noqa: E731
    image, _ = raster()
    weights = torch.randn_like(image)
    timings = {
        "project fwd": lambda: k.project(s["means"], s["quats"], s["scales"], s["viewmats"], s["Ks"], W, H),
        "project bwd": lambda: torch.autograd.grad((means2d.sum(), conics.sum(), depths.sum()), (s["means"], s["quats"], s["scales"]), retain_graph=True),
        "SH3 fwd": lambda: k.spherical_harmonics(3, dirs, s["sh"], masks=radii > 0),
        "SH3 bwd": lambda: torch.autograd.grad(sh_out.sum(), (dirs, s["sh"]), retain_graph=True),
        "isect + offsets": lambda: k.isect_offset_encode(k.isect_tiles(means2d, radii, depths, 16, tw, th)[1], 1, tw, th),
        "raster fwd": raster,
        "raster bwd": lambda: torch.autograd.grad((image * weights).sum(), (m2d, con, col, opa), retain_graph=True),
    }
    return {"intersections": int(flatten_ids.numel()),
            **{op: median_seconds(fn, config.repeats) for op, fn in timings.items()}}


def main(config: KernelBenchConfig) -> None:
    results = {name: time_kernels(name, config) for name in config.kernels}
    ops = [op for op in next(iter(results.values())) if op != "intersections"]
    table = Table(title=f"{config.gaussians} Gaussians, {config.width}x{config.height}, 1 camera, "
                        f"{torch.get_num_threads()} threads (median ms)")
    table.add_column("operator")
    for name in config.kernels:
        table.add_column(name, justify="right")
    for op in ops:
        table.add_row(op, *(f"{results[name][op] * 1e3:.1f}" for name in config.kernels))
    table.add_row("intersections", *(str(results[name]["intersections"]) for name in config.kernels))
    Console().print(table)
    config.output.mkdir(parents=True, exist_ok=True)
    (config.output / f"kernels_{config.gaussians}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(tyro.cli(KernelBenchConfig))
