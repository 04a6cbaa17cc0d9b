"""Per-operator time of the kernel sets on a random scene (forward and backward), one camera, with the
rasterizer's measured Gaussian-pixel evaluations, its GFLOP/s and its fraction of the cores' FP32 peak,
and gsplat 1.4.0's pure-PyTorch functions as a peer where they run on the CPU.

    .venv/bin/python benchmarks/kernels.py --gaussians 100000 --kernels cpu reference
    .venv/bin/python benchmarks/kernels.py --gaussians 100000 --kernels cpu --trees /tmp/kold . --tag kernels_old_new

Every (tree, kernel set) runs in its own subprocess, round after round in alternation (A, B, A, B, ...),
each round a warm-up then `per-round` timed calls of every operator, so the load of the shared machine
falls on all of them alike; min, median and max over all timed calls are reported. `--trees` points
the worker at other checkouts (e.g. `git worktree add /tmp/kold <commit>` before a change), which is how
the before/after figures are taken. Prints a table and writes benchmarks/results/<tag>_<N>.json.

gsplat 1.4.0 (`gsplat.cuda._torch_impl`, importable without building anything) has pure-PyTorch
projection, tile intersection and spherical harmonics, which run on the CPU and are timed as the peer
"gsplat-torch". Its `_rasterize_to_pixels` cannot run on the CPU: it asks gsplat's CUDA kernel
`rasterize_to_indices_in_range` for the (Gaussian, pixel) pairs, which JIT-builds gsplat's CUDA
extension (no CUDA: `_get_cuda_arch_flags` fails), and its `accumulate` composites through nerfacc's
packed scans, which raise "Only support cuda inputs."; the run records that error as it happens. Our
`reference` kernel set is the pure-PyTorch rasterizer with gsplat's semantics.

GFLOP/s = measured forward evaluations (the kernel's own counter) x FLOPS_PER_EVALUATION / median wall
time; "per busy core" divides by the process's CPU time instead (robust to other jobs taking cores), and
compares with one core's peak. The peak is read from /proc/cpuinfo (cores x GHz x SIMD lanes x 2 FMA
pipes x 2); the issue's 360 GFLOP/s assumed AVX-512, which this machine's cpuinfo does not list.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
FLOPS_PER_EVALUATION = 30
"""Flops of one Gaussian-pixel evaluation in the forward pass, as the issue counts them (offset 2, conic
form 9, exp about 12, alpha and transmittance 5, colour 6 for D = 3, rounded down)."""


@dataclass
class KernelBenchConfig:
    gaussians: int = 100_000
    """Number of Gaussians in the random scene."""
    width: int = 256
    height: int = 192
    kernels: List[str] = field(default_factory=lambda: ["cpu"])
    """Kernel sets to time ("gsplat-torch" is gsplat 1.4.0's pure-PyTorch peer)."""
    trees: List[str] = field(default_factory=list)
    """Checkouts to time the kernel sets of (default: this one); "." is this one."""
    rounds: int = 4
    """Alternating rounds; each runs every (tree, kernel set) in a fresh subprocess."""
    per_round: int = 5
    """Timed calls of each operator per round (after one warm-up call)."""
    threads: int = 0
    """OMP/torch threads of the workers (0: the cores available to this process)."""
    tag: str = "kernels"
    output: Path = REPO / "benchmarks" / "results"


# ----------------------------------------------------------------------------- machine


def fp32_peak_gflops() -> Dict[str, float]:
    """The cores' FP32 peak from /proc/cpuinfo: cores x GHz x SIMD lanes x 2 FMA pipes x 2 flops."""
    flags, mhz = "", 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = line
            if line.startswith("cpu MHz") and not mhz:
                mhz = float(line.split(":")[1])
    except OSError:
        pass
    lanes = 16 if " avx512f" in flags else 8 if " avx2" in flags else 4
    cores = len(os.sched_getaffinity(0))
    ghz = mhz / 1e3 if mhz else 2.8
    return {"cores": cores, "ghz": ghz, "fp32_lanes": lanes, "fma": " fma" in flags,
            "peak_gflops": cores * ghz * lanes * 2 * 2, "issue_peak_gflops": 360.0}


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ----------------------------------------------------------------------------- worker (one subprocess)


def scene(n: int, width: int, height: int):
    import torch

    g = torch.Generator().manual_seed(0)
    means = torch.randn(n, 3, generator=g) * torch.tensor([3.0, 2.0, 1.0]) + torch.tensor([0.0, 0.0, 8.0])
    return dict(
        means=means.requires_grad_(), quats=torch.randn(n, 4, generator=g).requires_grad_(),
        scales=(torch.rand(n, 3, generator=g) * 0.05 + 0.005).requires_grad_(),
        opacities=torch.rand(n, generator=g) * 0.9 + 0.05, sh=torch.randn(n, 16, 3, generator=g) * 0.3,
        viewmats=torch.eye(4)[None], Ks=torch.tensor([[[float(width), 0, width / 2], [0, float(width), height / 2], [0, 0, 1]]]),
    )


def _gsplat_peer():
    """gsplat 1.4.0's pure-PyTorch functions behind our kernel interface (those that run on the CPU)."""
    import torch
    from types import SimpleNamespace

    import gsplat.cuda._torch_impl as ti

    def project(means, quats, scales, viewmats, Ks, W, H):
        covars, _ = ti._quat_scale_to_covar_preci(quats, scales, compute_preci=False, triu=False)
        radii, means2d, depths, conics, comp = ti._fully_fused_projection(means, covars, viewmats, Ks, W, H)
        return radii.int(), means2d, depths, conics, comp

    def spherical_harmonics(degree, dirs, coeffs, masks=None):
        return ti._spherical_harmonics(degree, dirs, coeffs)

    def rasterize_to_pixels(m, q, c, o, W, H, tile, offsets, flat, **kw):
        return ti._rasterize_to_pixels(m, q, c, o, W, H, tile, offsets, flat)

    return SimpleNamespace(project=project, spherical_harmonics=spherical_harmonics, isect_tiles=ti._isect_tiles,
                           isect_offset_encode=ti._isect_offset_encode, rasterize_to_pixels=rasterize_to_pixels,
                           __name__="gsplat.cuda._torch_impl")


def worker(tree: str, name: str, config: KernelBenchConfig) -> dict:
    """Times every operator of kernel set `name` of the checkout this process imported: a warm-up call,
    then `per_round` timed calls each; returns the times and the rasterizer's evaluation counts."""
    import torch

    import ms_splatfacto
    from ms_splatfacto.backend.kernels import get_kernels

    assert Path(ms_splatfacto.__file__).resolve().parents[1] == Path(tree).resolve(), \
        f"imported {ms_splatfacto.__file__}, expected the checkout {tree}"
    k = _gsplat_peer() if name == "gsplat-torch" else get_kernels(name)
    s, (W, H) = scene(config.gaussians, config.width, config.height), (config.width, config.height)
    tw, th = math.ceil(W / 16), math.ceil(H / 16)
    proj = k.project(s["means"], s["quats"], s["scales"], s["viewmats"], s["Ks"], W, H)
    radii, means2d, depths, conics, _ = proj
    dirs = s["means"].detach()[None].clone().requires_grad_()  # camera at the origin
    sh_out = k.spherical_harmonics(3, dirs, s["sh"].requires_grad_(), masks=radii > 0)
    _, isect_ids, flatten_ids = k.isect_tiles(means2d, radii, depths, 16, tw, th)
    offsets = k.isect_offset_encode(isect_ids, 1, tw, th)
    gen = torch.Generator().manual_seed(1)
    m2d, con = means2d.detach().requires_grad_(), conics.detach().requires_grad_()
    col = torch.rand(1, config.gaussians, 3, generator=gen).requires_grad_()
    opa = s["opacities"][None].clone().requires_grad_()
    raster = lambda: k.rasterize_to_pixels(m2d, con, col, opa, W, H, 16, offsets, flatten_ids)  # noqa: E731
    ops: Dict[str, Callable[[], object]] = {
        "project fwd": lambda: k.project(s["means"], s["quats"], s["scales"], s["viewmats"], s["Ks"], W, H),
        "project bwd": lambda: torch.autograd.grad((means2d.sum(), conics.sum(), depths.sum()), (s["means"], s["quats"], s["scales"]), retain_graph=True),
        "SH3 fwd": lambda: k.spherical_harmonics(3, dirs, s["sh"], masks=radii > 0),
        "SH3 bwd": lambda: torch.autograd.grad(sh_out.sum(), (dirs, s["sh"]), retain_graph=True),
        "isect + offsets": lambda: k.isect_offset_encode(k.isect_tiles(means2d, radii, depths, 16, tw, th)[1], 1, tw, th),
    }
    result: dict = {"intersections": int(flatten_ids.numel()), "errors": {}}
    try:
        image, _ = raster()
        weights = torch.randn(image.shape, generator=gen)
        ops["raster fwd"] = raster
        ops["raster bwd"] = lambda: torch.autograd.grad((image * weights).sum(), (m2d, con, col, opa), retain_graph=True)
    except Exception as err:  # gsplat's pure-PyTorch rasterizer needs CUDA (see the module docstring)
        import traceback

        frames = [f for f in traceback.extract_tb(err.__traceback__) if "gsplat" in f.filename]
        where = f" in {Path(frames[-1].filename).name}:{frames[-1].lineno} `{frames[-1].line}`" if frames else ""
        result["errors"]["raster"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}{where}"
    counts = getattr(k, "evaluation_counts", None)
    times: Dict[str, List[float]] = {}
    cpu_times: Dict[str, List[float]] = {}
    for op, fn in ops.items():
        fn()  # warm-up
        if counts is not None and op.startswith("raster"):
            counts(reset=True)
        times[op], cpu_times[op] = [], []
        for _ in range(config.per_round):
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            times[op].append(time.perf_counter() - start)
            cpu_times[op].append(time.process_time() - cpu_start)
        if counts is not None and op.startswith("raster"):
            result[f"{op} counts"] = {key: v // config.per_round for key, v in counts(reset=True).items()}
    result["times"], result["cpu_times"] = times, cpu_times
    result["threads"] = torch.get_num_threads()
    return result


# ----------------------------------------------------------------------------- driver


def run_worker(tree: Path, name: str, config: KernelBenchConfig) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(config.threads))
    spec = json.dumps({"tree": str(tree), "name": name, "config": {k: v for k, v in vars(config).items() if k != "output"}})
    out = subprocess.run([sys.executable, __file__, "--worker", spec], cwd=tree, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker {name} in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(values: List[float]) -> Dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def main(config: KernelBenchConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    config.threads = config.threads or len(os.sched_getaffinity(0))
    trees = [Path(t).resolve() for t in (config.trees or ["."])]
    runs = [(tree, name) for tree in trees for name in config.kernels
            if name != "gsplat-torch" or tree == trees[-1]]  # the peer does not depend on the checkout
    label = {run: (name if len(trees) == 1 else f"{name}@{tree.name if tree != REPO else 'this'}") for run in runs for tree, name in [run]}
    collected: Dict[tuple, List[dict]] = {run: [] for run in runs}
    loads = [load()]
    for r in range(config.rounds):
        for run in runs if r % 2 == 0 else runs[::-1]:  # A B, B A, ...: neither always goes first
            collected[run].append(run_worker(*run, config))
        loads.append(load())
    peak = fp32_peak_gflops()
    results: Dict[str, dict] = {}
    for run in runs:
        rounds = collected[run]
        ops = rounds[0]["times"]
        entry = {"tree": str(run[0]), "kernels": run[1], "intersections": rounds[0]["intersections"],
                 "errors": rounds[0]["errors"], "threads": rounds[0]["threads"],
                 "seconds": {op: spread([t for rd in rounds for t in rd["times"][op]]) for op in ops},
                 "cpu_seconds": {op: spread([t for rd in rounds for t in rd["cpu_times"][op]]) for op in ops}}
        for op in ("raster fwd", "raster bwd"):
            if f"{op} counts" in rounds[0]:
                c = rounds[0][f"{op} counts"]
                median = entry["seconds"][op]["median"]
                entry[f"{op} counts"] = c
                if op == "raster fwd":
                    gflops = c["evaluations"] * FLOPS_PER_EVALUATION / median / 1e9
                    entry["raster fwd gflops"] = gflops
                    entry["raster fwd fraction of peak"] = gflops / peak["peak_gflops"]
                    entry["raster fwd fraction of issue peak"] = gflops / peak["issue_peak_gflops"]
                    # Per CPU-second of the process (all its threads): what the cores did while they
                    # ran this kernel, whatever share of them the other jobs on the machine took.
                    cpu_median = entry["cpu_seconds"][op]["median"]
                    per_core = c["evaluations"] * FLOPS_PER_EVALUATION / cpu_median / 1e9
                    entry["raster fwd gflops per busy core"] = per_core
                    entry["raster fwd fraction of peak per busy core"] = per_core / (peak["peak_gflops"] / peak["cores"])
        results[label[run]] = entry
    names = list(results)
    table = Table(title=f"{config.gaussians} Gaussians, {config.width}x{config.height}, 1 camera, {config.threads} threads, "
                        f"ms median (min-max) of {config.rounds} x {config.per_round}; load {loads[0]} -> {loads[-1]}")
    table.add_column("operator")
    for name in names:
        table.add_column(name, justify="right")
    all_ops = list(dict.fromkeys(op for e in results.values() for op in e["seconds"]))
    for op in all_ops:
        cells = []
        for name in names:
            s = results[name]["seconds"].get(op)
            cells.append(f"{s['median'] * 1e3:.1f} ({s['min'] * 1e3:.1f}-{s['max'] * 1e3:.1f})" if s else "cannot run")
        table.add_row(op, *cells)
    table.add_row("intersections", *(str(results[n]["intersections"]) for n in names))
    for key, fmt in (("raster fwd counts", lambda c: f"{c['evaluations'] / 1e6:.2f} M ({c['lanes'] / 1e6:.2f} M lanes)"),
                     ("raster fwd gflops", lambda g: f"{g:.1f}"),
                     ("raster fwd fraction of peak", lambda f: f"{100 * f:.1f}% of {peak['peak_gflops']:.0f}"),
                     ("raster fwd fraction of issue peak", lambda f: f"{100 * f:.1f}% of 360"),
                     ("raster fwd gflops per busy core", lambda g: f"{g:.1f}"),
                     ("raster fwd fraction of peak per busy core", lambda f: f"{100 * f:.1f}% of {peak['peak_gflops'] / peak['cores']:.0f}")):
        table.add_row(key.replace("counts", "evaluations"), *(fmt(results[n][key]) if key in results[n] else "-" for n in names))
    console = Console()
    console.print(table)
    for name in names:
        for what, err in results[name]["errors"].items():
            console.print(f"{name}: {what} cannot run on the CPU: {err}")
    config.output.mkdir(parents=True, exist_ok=True)
    path = config.output / f"{config.tag}_{config.gaussians}.json"
    path.write_text(json.dumps({
        "command": "benchmarks/kernels.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"platform": platform.platform(), **peak}, "load_before_after": [loads[0], loads[-1]],
        "flops_per_evaluation": FLOPS_PER_EVALUATION, "config": {k: v for k, v in vars(config).items() if k != "output"},
        "results": results}, indent=2))
    console.print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        spec = json.loads(sys.argv[2])
        print(json.dumps(worker(spec["tree"], spec["name"], KernelBenchConfig(**spec["config"]))))
    else:
        import tyro

        main(tyro.cli(KernelBenchConfig))
