"""Capacity planner: the memory one training step of ms-splatfacto needs, per component and per member.

    python -m ms_splatfacto.capacity --gaussians 1e9 --sh-degree 3 --image 1920x1080 --batch 1 --members 8x141GB

Per Gaussian (float32 throughout), with F = 11 + 3 (d + 1)^2 floats at SH degree d (59 at degree 3):
- parameters 4F, gradients 4F, Adam's two moments 8F (the 944 B arithmetic minimum at degree 3);
- densification statistics: accumulated screen gradient, visibility count and largest radius (12 B);
- projected records, per camera of the batch: the forward record the backward pass reads (2D mean 2,
  conic 3, colour 3, opacity 1, depth 1, radius 1 = 44 B) and its gradient (2D mean, its absolute
  value for densification, conic, colour, opacity = 44 B), counted for every Gaussian (all visible);
- transient buffers of the step: the [N, (d+1)^2, 3] SH colour tensor the model concatenates and its
  gradient (24 (d+1)^2 B), the activations exp(scales) and sigmoid(opacities) with their gradients
  (32 B), plus TRANSIENT_REST_PER_GAUSSIAN per camera (calibrated on the CPU, see there);
- per image pixel (member 0, which assembles the image): rendered colours and alphas, the ground
  truth, and the float64 banded L1 + SSIM with its gradient, as far as they are live at the peak
  (PER_PIXEL, measured the same way).

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

FLOAT = 4
RECORD_FORWARD = 11 * FLOAT
RECORD_GRADIENT = 11 * FLOAT
STATS = 3 * FLOAT
TRANSIENT_REST_PER_GAUSSIAN = 0
"""Bytes per Gaussian the step holds at its peak beyond the named terms, per camera. The peak resident
memory of one step on cpu:4 at 256x192 (benchmarks/stepbench.py, with MALLOC_MMAP_THRESHOLD_=65536 so
that freed tensors leave the resident set) grows by 1455 B per Gaussian between 100k and 400k Gaussians
at SH degree 3; the named terms give 1460 B (the records assume every Gaussian visible), so no remainder
is added. tests/test_capacity.py checks the prediction at two other sizes."""
PER_PIXEL = 35
"""Bytes per image pixel at the peak (member 0): the intercept of the same fit (1.7 MB) over 256x192
pixels; most image and loss buffers are freed before the backward pass reaches its peak."""
UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def floats_per_gaussian(sh_degree: int) -> int:
    """Parameters of one Gaussian: mean 3, log-scale 3, quaternion 4, opacity 1, SH colour 3 (d+1)^2."""
    return 3 + 3 + 4 + 1 + 3 * (sh_degree + 1) ** 2


def bytes_per_gaussian(sh_degree: int = 3, batch: int = 1) -> Dict[str, int]:
    """Bytes per Gaussian by component (see the module doc)."""
    f = floats_per_gaussian(sh_degree) * FLOAT
    return {
        "parameters": f,
        "gradients": f,
        "Adam moments": 2 * f,
        "densification statistics": STATS,
        "projected records": batch * (RECORD_FORWARD + RECORD_GRADIENT),
        "transient buffers": 2 * 3 * FLOAT * (sh_degree + 1) ** 2 + 32 + batch * TRANSIENT_REST_PER_GAUSSIAN,
    }


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


def plan(gaussians: int, sh_degree: int = 3, width: int = 1920, height: int = 1080, batch: int = 1, members: str = "1x24GiB") -> Plan:
    """The memory of one training step with `gaussians` rows striped evenly over `members`."""
    parsed = parse_members(members)
    per_gaussian = bytes_per_gaussian(sh_degree, batch)
    per_image = PER_PIXEL * width * height * batch
    n = len(parsed)
    rows = [gaussians // n + (1 if d < gaussians % n else 0) for d in range(n)]
    per_member = [r * sum(per_gaussian.values()) + (per_image if d == 0 else 0) for d, r in enumerate(rows)]
    return Plan(gaussians, sh_degree, width, height, batch, per_gaussian, per_image, parsed, per_member)


def predicted_peak(gaussians: int, sh_degree: int = 3, width: int = 256, height: int = 192, batch: int = 1) -> float:
    """Predicted peak memory of one step on one machine (all members together), in bytes."""
    return gaussians * sum(bytes_per_gaussian(sh_degree, batch).values()) + PER_PIXEL * width * height * batch


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
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.image.lower().split("x"))
    p = plan(int(args.gaussians), args.sh_degree, width, height, args.batch, args.members)
    show(p)
    return p


if __name__ == "__main__":
    main()
