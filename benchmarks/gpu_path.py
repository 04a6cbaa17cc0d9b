"""The real training path without nerfstudio: Gaussians as aggregate parameters, the render op
(`backend/ops/render.py`), splatfacto's L1 + SSIM loss (`backend/ops/loss.py`), autograd and Adam.

Shared by `tests/test_gpu_path.py` and `benchmarks/gpu_check.py`, so the GPU machine (torch and a
carried gsplat, no nerfstudio, maybe no pytest) runs the very checks the tests run. Importable with
torch alone; the step mirrors `MsSplatfactoModel.get_outputs` + `get_loss_dict` for one camera
(an image split over pixel rows, `split_l1_ssim`) or a batch (assembled images, `banded_l1_ssim`).
A refinement (MsStrategy on these steps) is checked in `gpu_refinement.py`, which builds on this module.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ms_splatfacto.backend.aggregate import Members, is_aggregate, members, parameter, to_plain  # noqa: E402
from ms_splatfacto.backend.ops.loss import accumulation_dtype, band_rows, banded_l1_ssim, split_l1_ssim  # noqa: E402
from ms_splatfacto.backend.ops.render import rasterization  # noqa: E402

PARAMS = ("means", "scales", "quats", "features_dc", "features_rest", "opacities")
SSIM_LAMBDA = 0.2
IMAGE_MAX_ABS, IMAGE_MEAN_ABS = 1e-2, 1e-4
"""Image tolerances (values in [0, 1]): a Gaussian at the 1/255 alpha cut-off may flip one pixel by a
few 1e-3 between CUDA (fast math) and C++ kernels; a misrouted tile row or band moves whole rows."""
GRAD_REL_L2 = 1e-2
"""Gradient tolerance, ||a - b|| / ||b|| per parameter: a lost halo or a double-counted partial is
far above it, float32 atomics and fast math far below."""
LOSS_REL = 1e-4


@contextlib.contextmanager
def float32_convolutions():
    """Parity runs compare float32 kernels: cuDNN's TF32 convolutions (on by default; SSIM's blur uses
    them) would round to 10-bit mantissas and measure cuDNN rather than our path. Timings keep them."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


@dataclass
class Scene:
    """Raw (pre-activation) Gaussian parameters, cameras and ground-truth images, all on the CPU."""

    raw: Dict[str, Tensor]
    viewmats: Tensor  # [C, 4, 4]
    Ks: Tensor  # [C, 3, 3]
    images: Tensor  # [C, H, W, 3]
    sh_degree: int

    @property
    def width(self) -> int:
        return self.images.shape[2]

    @property
    def height(self) -> int:
        return self.images.shape[1]

    @property
    def gaussians(self) -> int:
        return self.raw["means"].shape[0]


def synthetic_scene(n: int, width: int, height: int, cameras: int = 1, seed: int = 0, sh_degree: int = 3) -> Scene:
    """N Gaussians filling a box 3 to 6 units in front of the cameras, sized by their spacing so the image
    is covered at any N, and smooth random target images (SSIM sees structure, not noise)."""
    g = torch.Generator().manual_seed(seed)
    aspect = width / height
    box = torch.tensor([2.4 * aspect, 2.4, 3.0])
    means = (torch.rand(n, 3, generator=g) - 0.5) * box + torch.tensor([0.0, 0.0, 4.5])
    spacing = (float(box.prod()) / n) ** (1 / 3)
    scales = torch.log(spacing * (0.4 + torch.rand(n, 3, generator=g)))
    quats = torch.randn(n, 4, generator=g)
    features_rest = torch.randn(n, (sh_degree + 1) ** 2 - 1, 3, generator=g) * 0.05
    raw = {
        "means": means, "scales": scales, "quats": quats / quats.norm(dim=-1, keepdim=True),
        "features_dc": (torch.rand(n, 3, generator=g) - 0.5) / 0.28209479177387814,
        "features_rest": features_rest, "opacities": torch.logit(0.1 + 0.8 * torch.rand(n, 1, generator=g)),
    }
    viewmats = torch.eye(4).repeat(cameras, 1, 1)
    for c in range(cameras):
        angle = torch.tensor(0.05 * c)
        viewmats[c, 0, 0], viewmats[c, 0, 2] = torch.cos(angle), torch.sin(angle)
        viewmats[c, 2, 0], viewmats[c, 2, 2] = -torch.sin(angle), torch.cos(angle)
        viewmats[c, :3, 3] = torch.tensor([0.1 * c, -0.05 * c, 0.0])
    focal = 0.9 * width
    Ks = torch.tensor([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]]).repeat(cameras, 1, 1)
    coarse = torch.rand(cameras, 3, max(height // 8, 2), max(width // 8, 2), generator=g)
    images = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return Scene(raw, viewmats, Ks, images.permute(0, 2, 3, 1).contiguous(), sh_degree)


def gaussian_params(raw: Dict[str, Tensor], spec: Union[str, Members]) -> torch.nn.ParameterDict:
    """The Gaussians as aggregate parameters striped over `spec`'s members (a module, for state dicts)."""
    m = spec if isinstance(spec, Members) else members(spec)
    return torch.nn.ParameterDict({name: parameter(raw[name], m) for name in PARAMS})


def _members_of(params) -> Members:
    means = params["means"]
    return means.members if is_aggregate(means) else members(str(means.device))


def render_and_loss(params, scene: Scene, kernels: Optional[str] = None, background: float = 0.0):
    """(loss, rgb, info) as the model computes them in training: a single camera's image stays split
    over pixel rows (an aggregate [H, W, 3]) and its loss is `split_l1_ssim`; a batch is assembled
    ([C, H, W, 3]) and takes `banded_l1_ssim`. The loss sums in `accumulation_dtype` (float64 on CPUs)."""
    m = _members_of(params)
    device = m.device
    C = scene.viewmats.shape[0]
    colors = torch.cat((params["features_dc"][:, None, :], params["features_rest"]), dim=1)
    render, alpha, info = rasterization(
        means=params["means"], quats=params["quats"], scales=torch.exp(params["scales"]),
        opacities=torch.sigmoid(params["opacities"]).squeeze(-1), colors=colors,
        viewmats=scene.viewmats.to(device), Ks=scene.Ks.to(device), width=scene.width, height=scene.height,
        sh_degree=scene.sh_degree, absgrad=True, kernels=kernels, split_images=C == 1,
    )
    if torch.is_grad_enabled() and info["means2d"].requires_grad:
        info["means2d"].retain_grad()  # what densification reads, as gsplat's strategy does
    rgb = torch.clamp(render[..., :3] + (1 - alpha) * background, 0.0, 1.0)
    wide = accumulation_dtype(device, rgb.dtype)
    if is_aggregate(rgb):
        loss = split_l1_ssim(rgb.to(wide), scene.images[0].to(device, wide), SSIM_LAMBDA)
    else:
        bands = band_rows(scene.height, len(m), 16)
        loss = banded_l1_ssim(rgb.to(wide), scene.images.to(device, wide), SSIM_LAMBDA, bands)
    return loss.to(rgb.dtype), rgb, info


def train_step(params, optimizer: Optional[torch.optim.Optimizer], scene: Scene, kernels: Optional[str] = None):
    """One step: render, loss, backward and (with an optimizer) Adam; returns (loss, rgb, info)."""
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    loss, rgb, info = render_and_loss(params, scene, kernels)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    return loss, rgb, info


def adam(params) -> torch.optim.Adam:
    return torch.optim.Adam(list(params.values()), lr=1e-3, eps=1e-15)


def step_outputs(spec: Union[str, Members], scene: Scene, kernels: Optional[str] = None) -> Dict[str, object]:
    """A fresh model's first render + loss + backward on `spec`, as ordinary CPU tensors: image
    [C, H, W, 3], loss, every parameter's gradient and the means2d gradient (densification's input)."""
    params = gaussian_params(scene.raw, spec)
    with float32_convolutions():
        loss, rgb, info = train_step(params, None, scene, kernels)
    image = to_plain(rgb.detach()).reshape(-1, scene.height, scene.width, 3)
    return {
        "image": image.cpu(), "loss": float(loss.detach()),
        "grads": {name: to_plain(params[name].grad).cpu() for name in PARAMS},
        "means2d_grad": to_plain(info["means2d"].grad).cpu(),
    }


def plain_params(raw: Dict[str, Tensor], device) -> torch.nn.ParameterDict:
    """The Gaussians as ordinary parameters on one device (what stock splatfacto trains)."""
    return torch.nn.ParameterDict({name: torch.nn.Parameter(raw[name].to(device)) for name in PARAMS})


def direct_train_step(params, optimizer: Optional[torch.optim.Optimizer], scene: Scene, rasterize: Callable, **options):
    """The same step on ordinary tensors through `rasterize` (gsplat.rasterization with packed=False, or
    the backend's single-device pipeline), every image assembled, the loss in one band."""
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    device = params["means"].device
    colors = torch.cat((params["features_dc"][:, None, :], params["features_rest"]), dim=1)
    render, alpha, info = rasterize(
        means=params["means"], quats=params["quats"], scales=torch.exp(params["scales"]),
        opacities=torch.sigmoid(params["opacities"]).squeeze(-1), colors=colors, viewmats=scene.viewmats.to(device),
        Ks=scene.Ks.to(device), width=scene.width, height=scene.height, sh_degree=scene.sh_degree, absgrad=True, **options,
    )
    info["means2d"].retain_grad()
    rgb = torch.clamp(render[..., :3], 0.0, 1.0)  # black background, as in render_and_loss
    wide = accumulation_dtype(device, rgb.dtype)
    loss = banded_l1_ssim(rgb.to(wide), scene.images.to(device, wide), SSIM_LAMBDA, [0, scene.height]).to(rgb.dtype)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    return loss, rgb, info


def direct_outputs(scene: Scene, device, rasterize: Callable, **options) -> Dict[str, object]:
    """`step_outputs` of `direct_train_step` (means2d gradients made Gaussian-major, [N, C, 2])."""
    params = plain_params(scene.raw, device)
    with float32_convolutions():
        loss, rgb, info = direct_train_step(params, None, scene, rasterize, **options)
    return {
        "image": rgb.detach().cpu(), "loss": float(loss.detach()),
        "grads": {name: params[name].grad.cpu() for name in PARAMS},
        "means2d_grad": info["means2d"].grad.transpose(0, 1).cpu(),
    }


def rel_l2(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare_outputs(got: Dict[str, object], want: Dict[str, object]) -> Dict[str, object]:
    """Figures and a verdict for two `step_outputs`: images by max and mean absolute difference,
    gradients by relative L2 error, the loss relatively (tolerances at the top of this module)."""
    diff = (got["image"] - want["image"]).abs()
    grads = {name: rel_l2(got["grads"][name], want["grads"][name]) for name in PARAMS}
    grads["means2d"] = rel_l2(got["means2d_grad"], want["means2d_grad"])
    loss_rel = abs(got["loss"] - want["loss"]) / max(abs(want["loss"]), 1e-30)
    failures = []
    if float(diff.max()) > IMAGE_MAX_ABS or float(diff.mean()) > IMAGE_MEAN_ABS:
        failures.append(f"image max/mean abs diff {float(diff.max()):.3g}/{float(diff.mean()):.3g}")
    failures += [f"{name} grad rel L2 {err:.3g}" for name, err in grads.items() if not err <= GRAD_REL_L2]
    if not loss_rel <= LOSS_REL:
        failures.append(f"loss rel diff {loss_rel:.3g}")
    return {"passed": not failures, "failures": failures, "image_max_abs": float(diff.max()),
            "image_mean_abs": float(diff.mean()), "grad_rel_l2": grads, "loss": got["loss"], "loss_rel": loss_rel}


def step_parity(spec: Union[str, Members], scene: Scene, kernels: Optional[str] = None,
                reference_spec: str = "cpu", reference_kernels: str = "cpu") -> Dict[str, object]:
    """render + loss + backward on `spec` against `reference_spec` (default: one CPU member, C++ kernels)."""
    result = compare_outputs(step_outputs(spec, scene, kernels), step_outputs(reference_spec, scene, reference_kernels))
    return {"spec": str(spec), "reference": f"{reference_spec} ({reference_kernels} kernels)", **result}


def render_image(params, scene: Scene, kernels: Optional[str] = None) -> Tensor:
    with torch.no_grad(), float32_convolutions():
        _, rgb, _ = render_and_loss(params, scene, kernels)
    return to_plain(rgb).reshape(-1, scene.height, scene.width, 3).cpu()


def checkpoint_round_trip(spec: str, target_spec: str, scene: Scene, kernels: Optional[str] = None,
                          target_kernels: Optional[str] = None) -> Dict[str, object]:
    """Train a step on `spec`, save the state dict (torch.save, as a checkpoint does), load it with
    map_location="cpu" into a model on `target_spec` and render: the same image, within tolerance."""
    params = gaussian_params(scene.raw, spec)
    train_step(params, adam(params), scene, kernels)
    before = render_image(params, scene, kernels)
    buffer = io.BytesIO()
    torch.save(params.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, map_location="cpu", weights_only=True)
    plain_cpu = all(not is_aggregate(t) and t.device.type == "cpu" for t in loaded.values())
    target = gaussian_params({name: torch.zeros_like(loaded[name]) for name in PARAMS}, target_spec)
    target.load_state_dict(loaded)
    still_striped = all(is_aggregate(p) and str(p.members) == target_spec for p in target.values())
    moved = max(float((to_plain(params[name].detach()).cpu() - scene.raw[name]).abs().max()) for name in PARAMS)
    after = render_image(target, scene, target_kernels)
    diff = (after - before).abs()
    passed = (plain_cpu and still_striped and moved > 0 and float(diff.max()) <= IMAGE_MAX_ABS
              and float(diff.mean()) <= IMAGE_MEAN_ABS)
    return {"spec": spec, "target": target_spec, "passed": passed, "loaded_plain_on_cpu": plain_cpu,
            "target_striped": still_striped, "step_moved_params": moved, "image_max_abs": float(diff.max()),
            "image_mean_abs": float(diff.mean())}


def member_devices(m: Members):
    return sorted({m.devices[d] for d in m.local}, key=str)


def reset_peak_memory(m: Members) -> None:
    for device in member_devices(m):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
    if any(d.type == "cpu" for d in member_devices(m)):
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS
        except OSError:
            pass


def peak_memory(m: Members) -> Dict[str, int]:
    """Peak bytes per member device: torch.cuda.max_memory_allocated on GPUs, the process's peak resident
    memory (VmHWM) on the CPU."""
    out = {}
    for device in member_devices(m):
        if device.type == "cuda":
            out[str(device)] = int(torch.cuda.max_memory_allocated(device))
        else:
            status = Path("/proc/self/status").read_text().splitlines()
            out[str(device)] = next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmHWM:"))
    return out


def memory_during_training(spec: str, scene: Scene, kernels: Optional[str] = None) -> Dict[str, object]:
    """Peak memory read after each of two training steps: it must be readable (managed storage may not
    keep torch's statistics) and hold at least the parameters, gradients and Adam moments."""
    params = gaussian_params(scene.raw, spec)
    m = _members_of(params)
    optimizer = adam(params)
    reset_peak_memory(m)
    peaks = []
    for _ in range(2):
        train_step(params, optimizer, scene, kernels)
        peaks.append(peak_memory(m))
    param_bytes = sum(p.numel() * p.element_size() for p in params.values())
    total = sum(peaks[-1].values())
    return {"spec": spec, "passed": total >= 4 * param_bytes, "peaks": peaks, "param_bytes": param_bytes,
            "peak_bytes": total, "peak_per_gaussian": total / scene.gaussians}


MANAGED_CODE = """
import json, sys
sys.path.insert(0, {repo!r})
from benchmarks import gpu_path
from ms_splatfacto.backend.aggregate import members
m = members({spec!r}, storage={storage!r})  # first, in case CUDA must not be in use yet
scene = gpu_path.synthetic_scene(600, 64, 48)
result = gpu_path.step_parity(m, scene)
result["managed"] = bool(getattr(m, "managed_memory", m.managed))
result["passed"] = result["passed"] and (result["managed"] or not {require_managed!r})
try:  # torch's statistics must survive managed storage (the trainer logs them)
    result["peaks"] = gpu_path.peak_memory(m)
except Exception as err:
    result["passed"], result["peaks"] = False, f"{{type(err).__name__}}: {{err}}"
print("RESULT " + json.dumps(result))
"""


def managed_step(spec: str = "cuda", storage: str = "managed", require_managed: bool = True,
                 timeout: float = 600) -> Dict[str, object]:
    """`step_parity` with `members(spec, storage=storage)` in a fresh process (no CUDA state from earlier
    checks), then the peak memory read; with `require_managed` it fails unless the members report
    their rows in managed memory."""
    code = MANAGED_CODE.format(repo=str(REPO), spec=spec, storage=storage, require_managed=require_managed)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"spec": spec, "storage": storage, "passed": False, "error": (done.stdout + done.stderr)[-3000:]}
    return {"storage": storage, **json.loads(lines[-1][len("RESULT "):])}
