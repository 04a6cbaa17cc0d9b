"""Capacity planner: the memory one training step of ms-splatfacto needs, per component and per member.

    python -m ms_splatfacto.capacity --gaussians 1e9 --sh-degree 3 --image 1920x1080 --batch 1 --members 8x141GB

Per Gaussian (float32 throughout), with F = 11 + 3 (d + 1)^2 floats at SH degree d (59 at degree 3) and
K = (d + 1)^2 SH coefficients:
- parameters 4F, gradients 4F, Adam's two moments 8F (the 944 B arithmetic minimum at degree 3);
- densification statistics: accumulated screen gradient, visibility count and largest radius (12 B);
- kept between steps, per camera: the last step's projected records that densification reads (2D mean
  and its gradient, radius, depth, conic, opacity) and its tile plan (intersection keys and record
  indices), KEPT_PER_CAMERA;
- transient buffers: the largest extra of the step's three phases over the terms above, measured on the
  CPU (benchmarks/stepbench.py, one member, MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave the
  resident set; tests/test_capacity.py checks the prediction against measured peaks):
  * forward: the previous step's kept records still live and FORWARD_REST_PER_CAMERA (projection,
    tile plan, records read), before any gradient exists; SH runs on row chunks of the coefficients
    (backend/ops/sh_parts.py), a fixed [CHUNK_ROWS, K, 3] buffer per member rather than 12K B per Gaussian;
  * backward: BACKWARD_REST_PER_CAMERA (record gradients, float64 partial sums, per-field reduction
    buffers, the parameter gradients as they arrive), the SH chunk and its gradient (a fixed 2 x
    [CHUNK_ROWS, K, 3] per member), plus the rasterizer's backward scratch per thread,
    BACKWARD_SCRATCH_PER_THREAD (measured 0: the peak at 1 and at 2 threads is the same);
  * optimizer: torch's single-tensor Adam makes two temporaries the size of the largest parameter
    (sqrt of the second moment and its quotient: 2 x 12 (K - 1) B); `fused_adam` (one kernel) makes none;
- per image pixel (member 0, which assembles the image): rendered colours and alphas, the ground
  truth, and the float64 banded L1 + SSIM with its gradient, as far as they are live at the peak
  (PER_PIXEL).

The prediction is of live tensor bytes: glibc's default malloc keeps freed memory in its heaps, so an
ordinary process's peak resident memory is higher (up to about 35% on the CPU, see benchmarks/run.py).

Each member holds its even share of the rows; member 0 also holds the per-pixel buffers.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from typing import Dict, List, Tuple

from ms_splatfacto.backend.ops.sh_parts import CHUNK_ROWS

FLOAT = 4
STATS = 3 * FLOAT
KEPT_PER_CAMERA = 46
"""Bytes per Gaussian per camera live between steps beyond parameters, gradients, moments and statistics:
measured after a step (45.5 B at SH 3, 1M, 256x192, about 1.6 tile intersections per Gaussian: the 2D
means with their gradient and absgrad, radii, and the records each member read; the tile plan's
intersections are dropped once the rasterizer's backward has run)."""
FORWARD_REST_PER_CAMERA = 118
"""The forward's peak beyond the named forward terms (measured 944 B at SH 3 and 1M; less per Gaussian
at 100k and 300k)."""
BACKWARD_REST_PER_CAMERA = 283
"""The backward's peak beyond parameters, moments, statistics and kept records (fused Adam at SH 3:
1140 and 1075 B per Gaussian measured at 300k and 1M, 330 and 328 B over the state once the fixed 25 MB
of SH chunks and the per-pixel buffers are taken out; benchmarks/memory_per_gaussian.py)."""
BACKWARD_SCRATCH_PER_THREAD = 0
"""Rasterizer backward scratch per thread and camera (B per Gaussian): the peak of the backward measured
at 1 and at 2 threads differs by under 5 B (1334 and 1339), so the kernels' sums do not grow with the
thread count. Kept as a term so a kernel that changes it changes the plan."""
PER_PIXEL = 35
"""Bytes per image pixel at the peak (member 0): most image and loss buffers are freed before the
step reaches its peak."""
UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def floats_per_gaussian(sh_degree: int) -> int:
    """Parameters of one Gaussian: mean 3, log-scale 3, quaternion 4, opacity 1, SH colour 3 (d+1)^2."""
    return 3 + 3 + 4 + 1 + 3 * (sh_degree + 1) ** 2


def phase_bytes(sh_degree: int = 3, batch: int = 1, threads: int = 1, fused_adam: bool = False) -> Dict[str, int]:
    """Bytes per Gaussian at the peak of each phase of a step (see the module doc)."""
    f = floats_per_gaussian(sh_degree) * FLOAT
    k = (sh_degree + 1) ** 2
    state = 3 * f + STATS  # parameters and Adam's moments, statistics: live in every phase
    kept = batch * KEPT_PER_CAMERA
    return {
        "forward": state + 2 * kept + batch * FORWARD_REST_PER_CAMERA,
        "backward": state + kept + batch * (BACKWARD_REST_PER_CAMERA + threads * BACKWARD_SCRATCH_PER_THREAD),
        "optimizer": state + f + kept + (0 if fused_adam else 2 * 3 * FLOAT * (k - 1)),
    }


def phase_fixed_bytes(rows: int, sh_degree: int = 3) -> Dict[str, int]:
    """Bytes of a member holding `rows` Gaussians that do not grow with them, per phase: the SH row chunk
    (forward), it and its gradient (backward)."""
    chunk = min(rows, CHUNK_ROWS) * 3 * FLOAT * (sh_degree + 1) ** 2 if sh_degree > 0 else 0
    return {"forward": chunk, "backward": 2 * chunk, "optimizer": 0}


def member_peak(rows: int, sh_degree: int = 3, batch: int = 1, threads: int = 1, fused_adam: bool = False) -> int:
    """Peak bytes of a member holding `rows` Gaussians: the largest phase, per-Gaussian and fixed terms."""
    per, fixed = phase_bytes(sh_degree, batch, threads, fused_adam), phase_fixed_bytes(rows, sh_degree)
    return max(rows * per[phase] + fixed[phase] for phase in per)


def bytes_per_gaussian(sh_degree: int = 3, batch: int = 1, threads: int = 1, fused_adam: bool = False) -> Dict[str, int]:
    """Bytes per Gaussian by component at the step's peak (see the module doc): the transient term is the
    largest phase's extra over the components live throughout."""
    f = floats_per_gaussian(sh_degree) * FLOAT
    kept = batch * KEPT_PER_CAMERA
    fixed = {"parameters": f, "gradients": f, "Adam moments": 2 * f, "densification statistics": STATS,
             "kept between steps (records, tile plan)": kept}
    fixed["transient buffers"] = max(phase_bytes(sh_degree, batch, threads, fused_adam).values()) - sum(fixed.values())
    return fixed


def peak_phase(sh_degree: int = 3, batch: int = 1, threads: int = 1, fused_adam: bool = False) -> str:
    """The phase whose peak is the step's peak."""
    phases = phase_bytes(sh_degree, batch, threads, fused_adam)
    return max(phases, key=phases.get)


def arithmetic_minimum(sh_degree: int = 3) -> int:
    """Parameters, gradients and two Adam moments: 944 B per Gaussian at SH degree 3."""
    return 4 * floats_per_gaussian(sh_degree) * FLOAT


def parse_size(text: str) -> float:
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).upper() not in UNITS:
        raise ValueError(f"Cannot read the size {text!r}: use e.g. 141GB, 6GiB, 512MB")
    return float(match.group(1)) * UNITS[match.group(2).upper()]


def parse_members(text: str) -> List[Tuple[str, float]]:
    """'8x141GB', 'cpu:4x6GB', '2x80GB,1x512GB' -> [(name, capacity bytes)] one entry per member."""
    members: List[Tuple[str, float]] = []
    for group in text.split(","):
        match = re.fullmatch(r"\s*(?:([a-z]+):)?(\d+)x(.+)", group.strip(), flags=re.IGNORECASE)
        if not match:
            raise ValueError(f"Cannot read the member group {group!r}: use COUNTxSIZE, e.g. 8x141GB or cpu:4x6GB")
        kind, count, size = match.group(1) or "member", int(match.group(2)), parse_size(match.group(3))
        members += [(f"{kind}:{len(members) + i}", size) for i in range(count)]
    if not members:
        raise ValueError("No members given")
    return members


@dataclass
class Plan:
    gaussians: int
    sh_degree: int
    width: int
    height: int
    batch: int
    per_gaussian: Dict[str, int]
    per_image: int
    members: List[Tuple[str, float]]
    per_member: List[float]

    @property
    def total(self) -> float:
        return sum(self.per_member)

    @property
    def fits(self) -> bool:
        return all(need <= cap for need, (_, cap) in zip(self.per_member, self.members))


def plan(gaussians: int, sh_degree: int = 3, width: int = 1920, height: int = 1080, batch: int = 1, members: str = "1x24GiB",
         threads: int = 1, fused_adam: bool = False) -> Plan:
    """The memory of one training step with `gaussians` rows striped evenly over `members` (`threads`:
    CPU threads per process, for the thread-dependent terms)."""
    parsed = parse_members(members)
    per_gaussian = bytes_per_gaussian(sh_degree, batch, threads, fused_adam)
    per_image = PER_PIXEL * width * height * batch
    n = len(parsed)
    rows = [gaussians // n + (1 if d < gaussians % n else 0) for d in range(n)]
    per_member = [member_peak(r, sh_degree, batch, threads, fused_adam) + (per_image if d == 0 else 0) for d, r in enumerate(rows)]
    return Plan(gaussians, sh_degree, width, height, batch, per_gaussian, per_image, parsed, per_member)


def predicted_peak(gaussians: int, sh_degree: int = 3, width: int = 256, height: int = 192, batch: int = 1, threads: int = 1,
                   fused_adam: bool = False) -> float:
    """Predicted peak memory of one step on one machine (all members together), in bytes."""
    return member_peak(gaussians, sh_degree, batch, threads, fused_adam) + PER_PIXEL * width * height * batch


def human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(nbytes) < 1000 or unit == "PB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000
    raise AssertionError


def show(p: Plan, console=None) -> None:
    """Print the plan as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    per = sum(p.per_gaussian.values())
    components = Table(title=f"{p.gaussians:,} Gaussians, SH degree {p.sh_degree}, {p.width}x{p.height}, batch {p.batch}")
    for column in ("component", "B / Gaussian", "total"):
        components.add_column(column, justify="right" if column != "component" else "left")
    for name, b in p.per_gaussian.items():
        components.add_row(name, str(b), human(b * p.gaussians))
    components.add_row("per-image buffers (member 0)", "", human(p.per_image))
    components.add_row("[bold]total[/bold]", f"[bold]{per}[/bold]", f"[bold]{human(p.total)}[/bold]")
    console.print(components)
    console.print(f"arithmetic minimum (parameters, gradients, Adam): {arithmetic_minimum(p.sh_degree)} B / Gaussian")
    members = Table(title="per member")
    for column in ("member", "rows", "needs", "capacity", "use", "fits"):
        members.add_column(column, justify="right")
    n = len(p.members)
    for d, ((name, cap), need) in enumerate(zip(p.members, p.per_member)):
        rows = p.gaussians // n + (1 if d < p.gaussians % n else 0)
        ok = need <= cap
        members.add_row(name, f"{rows:,}", human(need), human(cap), f"{need / cap:.0%}", "[green]yes[/green]" if ok else "[red]no[/red]")
    console.print(members)
    capacity = sum(cap for _, cap in p.members)
    if p.fits:
        console.print(f"[green]Fits[/green]: {human(p.total)} of {human(capacity)} ({p.total / capacity:.0%}).")
    else:
        short = max(need - cap for need, (_, cap) in zip(p.per_member, p.members))
        needed = math.ceil(p.total / min(cap for _, cap in p.members))
        console.print(f"[red]Does not fit[/red]: the fullest member is {human(short)} short; about {needed} members "
                      f"of this size would hold it (or oversubscribe into host memory with unified memory).")


def main(argv: List[str] | None = None) -> Plan:
    parser = argparse.ArgumentParser(prog="python -m ms_splatfacto.capacity", description="Memory one ms-splatfacto training step needs, per member.")
    parser.add_argument("--gaussians", type=float, required=True, help="number of Gaussians, e.g. 1e9")
    parser.add_argument("--sh-degree", type=int, default=3)
    parser.add_argument("--image", default="1920x1080", help="WIDTHxHEIGHT of the training images")
    parser.add_argument("--batch", type=int, default=1, help="cameras per step")
    parser.add_argument("--members", default="1x24GiB", help="e.g. 8x141GB, cpu:4x6GB, 2x80GB,1x512GB")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process (thread-dependent terms)")
    parser.add_argument("--fused-adam", action=argparse.BooleanOptionalAction, default=True,
                        help="the optimizer is torch's fused Adam (ms-splatfacto's default; --no-fused-adam: per-op Adam)")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.image.lower().split("x"))
    p = plan(int(args.gaussians), args.sh_degree, width, height, args.batch, args.members, args.threads, args.fused_adam)
    show(p)
    return p


if __name__ == "__main__":
    main()
