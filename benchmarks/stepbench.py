"""One training step of MsSplatfactoModel on lund_tiny's cameras, timed by phase, and its peak memory.

The scene: lund_tiny's 29 COLMAP cameras at full resolution (256x192) and N synthetic Gaussians sampled
around its 1804 SfM points (each a jittered copy of a random SfM point, jitter and scale from that point's
nearest-neighbour distance shrunk by (N / 1804)^(1/3), so density grows with N and the image stays covered),
SH degree 3, colours from the points. A step is what `ns-train` does per iteration, in phases:
forward (`get_outputs`), loss (`get_loss_dict`), backward, Adam, and the densification statistics.

As a subprocess (one peak-memory measurement per process):

    .venv/bin/python benchmarks/stepbench.py --gaussians 200000 --devices cpu:4 --steps 2

prints one JSON line: baseline and peak resident memory (bytes) and the step's timings. With
`--time-steps R` it instead times R steps after `--warmup` steps (Morton row order, as training has after
its first refinement) and prints each step's phase times: what `benchmarks/step_table.py` runs in
alternating subprocesses.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ms_splatfacto  # noqa: E402,F401  (before torch: OpenMP threads wait passively, see backend/threads.py)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ms_splatfacto.backend.aggregate import exchange_totals, parameter, reset_exchange  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "lund_tiny"
STEP = 1001
"""The model's step counter during timing: SH degree 3 is on and no refinement falls on it."""
PHASES = ("forward", "loss", "backward", "adam", "stats")


@functools.lru_cache(maxsize=None)
def scene(data: Path = DATA):
    """(train cameras, their image paths, SfM points [P, 3], colours [P, 3] uint8) of a COLMAP scene."""
    from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig

    if not (data / "sparse" / "0").is_dir():
        raise FileNotFoundError(f"Benchmark scene missing: expected COLMAP data at {data} (../shared/data beside the checkout).")
    outputs = ColmapDataParserConfig(data=data, colmap_path=Path("sparse/0"), load_3D_points=True).setup().get_dataparser_outputs("train")
    return outputs.cameras, outputs.image_filenames, outputs.metadata["points3D_xyz"].float(), outputs.metadata["points3D_rgb"]


def synthetic_gaussians(n: int, sh_degree: int = 3, seed: int = 0) -> Dict[str, torch.Tensor]:
    """N Gaussians around the SfM points (see the module doc), as plain tensors in random row order."""
    from scipy.spatial import cKDTree

    _, _, points, rgb = scene()
    g = torch.Generator().manual_seed(seed)
    nn_dist = torch.from_numpy(cKDTree(points.numpy()).query(points.numpy(), k=2)[0][:, 1]).float().clamp(min=1e-4)
    parent = torch.randint(0, points.shape[0], (n,), generator=g)
    spacing = nn_dist[parent] * (points.shape[0] / n) ** (1 / 3) * 4
    means = points[parent] + torch.randn(n, 3, generator=g) * spacing[:, None]
    quats = torch.randn(n, 4, generator=g)
    features = torch.zeros(n, (sh_degree + 1) ** 2, 3)
    features[:, 0] = (rgb[parent].float() / 255 - 0.5) / 0.28209479177387814
    features[:, 1:] = torch.randn(n, (sh_degree + 1) ** 2 - 1, 3, generator=g) * 0.01
    return {
        "means": means,
        "scales": torch.log(spacing)[:, None].repeat(1, 3),
        "quats": quats / quats.norm(dim=-1, keepdim=True),
        "features_dc": features[:, 0].contiguous(),
        "features_rest": features[:, 1:].contiguous(),
        "opacities": torch.full((n, 1), math.log(0.5 / 0.5)),
    }


def build_model(devices: str, kernels: str = "cpu", sh_degree: int = 3):
    """MsSplatfactoModel on `devices` seeded with the SfM points (its Gaussians are replaced by `load`)."""
    from nerfstudio.data.scene_box import SceneBox

    from ms_splatfacto.model import MsSplatfactoModelConfig

    cameras, _, points, rgb = scene()
    config = MsSplatfactoModelConfig(devices=devices, kernels=kernels, sh_degree=sh_degree, sh_degree_interval=1, background_color="black")
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=len(cameras), seed_points=(points, rgb))
    model.train()
    return model


def load(model, gaussians: Dict[str, torch.Tensor], fused_adam: bool = False) -> Dict[str, torch.optim.Optimizer]:
    """Give the model these Gaussians (consumed: the plain tensors are dropped) and fresh Adam optimizers
    (`fused_adam`: torch's one-kernel Adam, which makes no [N, ...] temporaries)."""
    for name in list(gaussians):
        model.gauss_params[name] = parameter(gaussians.pop(name), model.members)
    model.strategy_state = model.strategy.initialize_state(scene_scale=1.0)
    lrs = {"means": 1.6e-4, "scales": 5e-3, "quats": 1e-3, "features_dc": 2.5e-3, "features_rest": 1.25e-4, "opacities": 5e-2}
    optimizers = {name: torch.optim.Adam(params, lr=lrs[name], eps=1e-15, fused=fused_adam or None) for name, params in model.get_gaussian_param_groups().items()}
    model.step, model.optimizers = STEP, optimizers
    return optimizers


@functools.lru_cache(maxsize=None)
def camera_batch(index: int):
    cameras, paths, _, _ = scene()
    image = torch.from_numpy(np.asarray(Image.open(paths[index]).convert("RGB"), dtype=np.float32) / 255.0)
    return cameras[index : index + 1], {"image": image}


def train_step(model, optimizers, camera_index: int) -> Tuple[Dict[str, float], Dict[str, int], int]:
    """One step; returns (seconds per phase, exchange bytes per kind, tile intersections)."""
    camera, batch = camera_batch(camera_index)
    times = {}
    reset_exchange()
    t0 = time.perf_counter()
    for optimizer in optimizers.values():  # first, as ns-train's trainer does: no gradients live in the forward
        optimizer.zero_grad()
    outputs = model.get_outputs(camera)
    t1 = time.perf_counter()
    loss = sum(model.get_loss_dict(outputs, batch).values())
    t2 = time.perf_counter()
    loss.backward()
    t3 = time.perf_counter()
    for optimizer in optimizers.values():
        optimizer.step()
    t4 = time.perf_counter()
    model.step_post_backward(STEP)
    t5 = time.perf_counter()
    times = dict(zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)))
    times["total"] = t5 - t0
    return times, exchange_totals(), int(model.info["n_isects"])


def timed_steps(model, optimizers, repeats: int, warmup: int = 1) -> Dict[str, object]:
    """Median phase times over `repeats` steps after `warmup` steps, cycling over the training cameras;
    exchange bytes and intersections are medians over the same steps."""
    n_cameras = len(scene()[0])
    for i in range(warmup):
        train_step(model, optimizers, i % n_cameras)
    runs = [train_step(model, optimizers, (warmup + i) % n_cameras) for i in range(repeats)]
    result = {key: statistics.median(r[0][key] for r in runs) for key in (*PHASES, "total")}
    result["exchange"] = {kind: int(statistics.median(r[1][kind] for r in runs)) for kind in runs[0][1]}
    result["n_isects"] = int(statistics.median(r[2] for r in runs))
    return result


def rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss() -> int:
    """Peak resident set size of this process since the last `reset_peak` (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (writing 5 to clear_refs); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_memory(gaussians: int, devices: str, steps: int, kernels: str = "cpu", sh_degree: int = 3,
                   fused_adam: bool = False) -> Dict[str, object]:
    """Peak resident memory of `steps` training steps over the resident memory before the Gaussians exist.

    Torch's CPU tensors come from malloc/mmap, not Python's allocator (tracemalloc misses them), so this
    reads the kernel's own counters: VmRSS before, VmHWM (the peak) after. Run once per process."""
    model = build_model(devices, kernels, sh_degree)
    train_step(model, load(model, {}), 0)  # kernels loaded, buffers of the 1804 seed Gaussians made and freed
    baseline = rss_now()
    reset_ok = reset_peak()
    optimizers = load(model, synthetic_gaussians(gaussians, sh_degree), fused_adam)
    times = [train_step(model, optimizers, i)[0]["total"] for i in range(steps)]
    peak = peak_rss()
    return {"gaussians": gaussians, "devices": devices, "sh_degree": sh_degree, "steps": steps, "baseline_rss": baseline,
            "peak_rss": peak, "peak_over_baseline": peak - baseline, "peak_reset": reset_ok, "step_s": times,
            "threads": torch.get_num_threads(), "fused_adam": fused_adam}


def measure_time(gaussians: int, devices: str, steps: int, warmup: int, kernels: str = "cpu", sh_degree: int = 3) -> Dict[str, object]:
    """Phase times of `steps` training steps after `warmup` untimed ones, Gaussians in Morton order."""
    from ms_splatfacto.backend.morton import morton_order

    model = build_model(devices, kernels, sh_degree)
    g = synthetic_gaussians(gaussians, sh_degree)
    order = morton_order(g["means"])
    optimizers = load(model, {k: v[order] for k, v in g.items()})
    n_cameras = len(scene()[0])
    for i in range(warmup):
        train_step(model, optimizers, i % n_cameras)
    runs = [train_step(model, optimizers, (warmup + i) % n_cameras)[0] for i in range(steps)]
    return {"gaussians": gaussians, "devices": devices, "sh_degree": sh_degree, "warmup": warmup, "threads": torch.get_num_threads(),
            "total_s": [r["total"] for r in runs], "phases_s": {k: [r[k] for r in runs] for k in PHASES}}


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gaussians", type=int, required=True)
    parser.add_argument("--devices", default="cpu:4")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--kernels", default="cpu")
    parser.add_argument("--sh-degree", type=int, default=3)
    parser.add_argument("--fused-adam", action="store_true", help="torch's fused Adam (no [N, ...] temporaries in its step)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--time-steps", type=int, default=0, help="time this many steps instead of measuring memory")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before --time-steps")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.time_steps:
        print(json.dumps(measure_time(args.gaussians, args.devices, args.time_steps, args.warmup, args.kernels, args.sh_degree)))
        return
    print(json.dumps(measure_memory(args.gaussians, args.devices, args.steps, args.kernels, args.sh_degree, args.fused_adam)))


if __name__ == "__main__":
    main()
