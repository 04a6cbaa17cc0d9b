"""The C++ rasterizer's backward scratch does not grow with the thread count, its results do not depend
on it (bit for bit), its evaluation counter counts real work, and its build cache is keyed by the flags
and the host CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ms_splatfacto.backend import build
from ms_splatfacto.backend.kernels import _cpu_rasterize as cpu

REPO = Path(__file__).resolve().parents[1]
W, H, TILE = 256, 192, 16


def _scene(n: int, seed: int = 0, C: int = 1, D: int = 3):
    """n small random Gaussians per camera over a W x H image, with their tile lists (CPU kernels)."""
    g = torch.Generator().manual_seed(seed)
    means2d = torch.rand(C, n, 2, generator=g) * torch.tensor([W, H])
    sx, sy = (torch.rand(C, n, generator=g) * 3 + 0.7 for _ in range(2))
    rho = torch.rand(C, n, generator=g) * 1.2 - 0.6
    det = (sx * sy) ** 2 * (1 - rho**2)
    conics = torch.stack([sy**2 / det, -rho * sx * sy / det, sx**2 / det], -1)
    colors = torch.rand(C, n, D, generator=g)
    opacities = torch.rand(C, n, generator=g) * 0.9 + 0.05
    radii = torch.ceil(3 * torch.maximum(sx, sy)).int()
    depths = torch.rand(C, n, generator=g) + 1
    tw, th = math.ceil(W / TILE), math.ceil(H / TILE)
    _, isect_ids, flatten_ids = cpu.isect_tiles(means2d, radii, depths, TILE, tw, th)
    offsets = cpu.isect_offset_encode(isect_ids, C, tw, th)
    return means2d, conics, colors, opacities, offsets, flatten_ids


def _render_and_grad(scene, backgrounds=None, seed: int = 5):
    means2d, conics, colors, opacities, offsets, flatten_ids = scene
    leaves = [t.clone().requires_grad_() for t in (means2d, conics, colors, opacities)]
    bg = None if backgrounds is None else backgrounds.clone().requires_grad_()
    sums: dict = {}
    image, alpha = cpu.rasterize_to_pixels(*leaves, W, H, TILE, offsets, flatten_ids, backgrounds=bg, absgrad=True,
                                           float64_sums=sums)
    g = torch.Generator().manual_seed(seed)
    w_image, w_alpha = torch.randn(image.shape, generator=g), torch.randn(alpha.shape, generator=g)
    ((image * w_image).sum() + (alpha * w_alpha).sum()).backward()
    out = {"image": image.detach(), "alpha": alpha.detach(), "absgrad": leaves[0].absgrad,
           **{f"grad{i}": t.grad for i, t in enumerate(leaves)}, **{f"f64_{k}": v for k, v in sums.items() if v is not None}}
    if bg is not None:
        out["backgrounds"] = bg.grad
    return out


# ----------------------------------------------------------------------------- scratch memory, measured

_CHILD = r"""
import json, math, os, sys, torch
sys.path.insert(0, sys.argv[1])
from test_kernel_scratch import _scene, W, H, TILE
from ms_splatfacto.backend.kernels import _cpu_rasterize as cpu

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

n = int(sys.argv[2])
means2d, conics, colors, opacities, offsets, flatten_ids = _scene(n, seed=3)
leaves = [t.clone().requires_grad_() for t in (means2d, conics, colors, opacities)]
image, alpha = cpu.rasterize_to_pixels(*leaves, W, H, TILE, offsets, flatten_ids)
loss = image.sum() + alpha.sum()
for _ in range(2):  # the second backward's peak is the steady state (thread stacks and arenas exist)
    for t in leaves:
        t.grad = None
    before = status("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    loss.backward(retain_graph=True)
    peak = status("VmHWM:")
print(json.dumps({"threads": torch.get_num_threads(), "scratch": peak - before, "M": int(flatten_ids.numel()),
                  "N": n, "K": 3 + 6}))
"""


def _backward_scratch(threads: int, n: int) -> dict:
    # A fixed mmap threshold: every large buffer is its own mapping, returned to the system when freed, so
    # RSS follows the allocations rather than what glibc's heap happens to retain from earlier ones.
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", _CHILD, str(Path(__file__).parent), str(n)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's VmHWM reset")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to run two threads")
def test_backward_scratch_does_not_grow_with_threads():
    """Peak RSS growth during the backward pass, measured in a fresh process per thread count. A
    per-thread float64 [C * N, K] buffer (the previous design) would add C * N * K * 8 bytes per thread:
    the second thread may add at most a quarter of that (thread stacks, malloc arenas, tile scratch)."""
    n = 300_000
    one, two = _backward_scratch(1, n), _backward_scratch(2, n)
    assert (one["threads"], two["threads"]) == (1, 2)
    per_thread_buffer = n * one["K"] * 8
    assert one["scratch"] > per_thread_buffer / 2, f"the measurement missed the backward's buffers: {one}"
    growth = two["scratch"] - one["scratch"]
    assert growth < per_thread_buffer / 4, (
        f"backward scratch grew by {growth / 2**20:.1f} MiB from 1 to 2 threads "
        f"({one['scratch'] / 2**20:.1f} -> {two['scratch'] / 2**20:.1f} MiB; one per-thread [N, K] float64 "
        f"buffer is {per_thread_buffer / 2**20:.1f} MiB)")


# ----------------------------------------------------------------------------- thread counts change no bit


def test_one_and_two_threads_give_the_same_bits():
    scene = _scene(20_000, seed=1, C=2, D=4)
    backgrounds = torch.rand(2, 4, generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    try:
        results, counts = [], []
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            cpu.evaluation_counts(reset=True)
            results.append(_render_and_grad(scene, backgrounds))
            counts.append(cpu.evaluation_counts(reset=True))
    finally:
        torch.set_num_threads(before)
    assert results[0]["alpha"].mean() > 0.3, "the scene should cover the images"
    for other in results[1:]:
        for name, value in results[0].items():
            assert torch.equal(value, other[name]), f"{name} differs between thread counts"
    assert counts[0] == counts[1] == counts[2], "the work done must not depend on the thread count"


# ----------------------------------------------------------------------------- evaluation counter


def test_evaluation_counter_counts_real_work():
    scene = _scene(5_000, seed=4)
    flatten_ids = scene[5]
    cpu.evaluation_counts(reset=True)
    _render_and_grad(scene)
    c = cpu.evaluation_counts(reset=True)
    assert cpu.evaluation_counts()["evaluations"] == 0, "reset must zero the counters"
    M = flatten_ids.numel()
    # Every evaluation is a SIMD lane; lanes come in whole vectors; a tile holds 256 pixels.
    assert 0 < c["forward"] <= c["forward_lanes"] <= M * TILE * TILE
    assert c["forward_lanes"] % 8 == 0 and c["backward_lanes"] % 8 == 0
    # The reach boxes skip most of each tile: far fewer than intersections x 256 evaluations.
    assert c["forward"] < M * TILE * TILE / 2
    # The backward sweep stops at each pixel's last composited Gaussian: never more work than forward.
    assert 0 < c["backward"] <= c["forward"]
    # At least one evaluation per composited (Gaussian, pixel) pair, counted by the reference's rule.
    means2d, conics, colors, opacities = scene[:4]
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    pix = torch.stack([xs, ys], -1).reshape(-1, 2)
    reached = 0
    for chunk in torch.split(torch.arange(means2d.shape[1]), 500):
        d = means2d[0, chunk, None, :] - pix[None]
        q = conics[0, chunk]
        sigma = 0.5 * (q[:, 0, None] * d[..., 0] ** 2 + q[:, 2, None] * d[..., 1] ** 2) + q[:, 1, None] * d[..., 0] * d[..., 1]
        alpha = (opacities[0, chunk, None] * torch.exp(-sigma)).clamp(max=0.999)
        reached += int(((sigma >= 0) & (alpha >= 1 / 255)).sum())
    assert c["forward"] >= 0.5 * reached, "fewer evaluations than half the pairs that pass the alpha test"


# ----------------------------------------------------------------------------- build cache key


def test_build_key_follows_flags_and_host_cpu(monkeypatch):
    native = ["-O3", "-fopenmp", "-ffp-contract=off", "-march=native"]
    portable = ["-O3", "-fopenmp", "-ffp-contract=off", "-march=x86-64-v2"]
    here = build.cpu_build_key(native)
    assert here == build.cpu_build_key(native), "the key must be stable"
    assert build.cpu_build_key(portable) != here
    monkeypatch.setattr(build, "host_cpu", lambda: "x86_64 model name=Another CPU | flags=fpu sse2")
    assert build.cpu_build_key(native) != here, "a build for another CPU must not be found"
    assert build.cpu_build_key(portable) == build.cpu_build_key(portable), "a portable build ignores the host"
    monkeypatch.setenv("MS_SPLATFACTO_MARCH", "")
    assert not any(f.startswith("-march") for f in build.cpu_flags())
    assert "-ffp-contract=off" in build.cpu_flags()
