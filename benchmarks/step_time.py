"""Seconds per training step of `ns-train ms-splatfacto` on lund_tiny at full resolution.

Runs the real CLI once per kernel set and reads nerfstudio's own per-iteration timings and Gaussian
counts from the tensorboard event file. Prints a table, writes JSON and a plot to benchmarks/results/.

    .venv/bin/python benchmarks/step_time.py --steps 300 --kernels cpu
    .venv/bin/python benchmarks/step_time.py --steps 60 --skip 10 --kernels cpu reference --tag kernels_vs_reference
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import tyro
from rich.console import Console
from rich.table import Table
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]


@dataclass
class StepTimeConfig:
    data: Path = REPO.parent / "shared" / "data" / "lund_tiny"
    """COLMAP scene to train on."""
    steps: int = 300
    """Training iterations per run (refinement starts at 100, every 50 steps)."""
    skip: int = 20
    """Leading iterations left out of the median (warm-up)."""
    kernels: List[str] = field(default_factory=lambda: ["cpu"])
    """Kernel sets to compare."""
    output: Path = REPO / "benchmarks" / "results"
    """Where the JSON and the plot go."""
    tag: str = "step_time"
    """Stem of the JSON and plot file names."""


def train(config: StepTimeConfig, kernels: str, workdir: Path) -> Path:
    command = [
        str(Path(sys.executable).parent / "ns-train"), "ms-splatfacto", "--output-dir", str(workdir),
        "--max-num-iterations", str(config.steps), "--vis", "tensorboard", "--logging.steps-per-log", "1",
        "--viewer.quit-on-train-completion", "True", "--steps-per-eval-image", "100000",
        "--steps-per-eval-all-images", "100000", "--steps-per-save", "100000",
        "--pipeline.model.num-downscales", "0", "--pipeline.model.warmup-length", "100",
        "--pipeline.model.refine-every", "50", "--pipeline.model.kernels", kernels,
        "colmap", "--data", str(config.data), "--colmap-path", "sparse/0",
    ]
    subprocess.run(command, check=True, capture_output=True)
    (events,) = workdir.glob("*/ms-splatfacto/*/events.out.tfevents.*")
    return events


def main(config: StepTimeConfig) -> None:
    results = {"date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}, "
               f"{__import__('os').cpu_count()} cores", "data": str(config.data), "steps": config.steps, "runs": {}}
    table = Table(title=f"ms-splatfacto step time on {config.data.name} (full resolution, {config.steps} steps)")
    for column in ("kernels", "median s/step", "p90 s/step", "Gaussians start", "Gaussians end"):
        table.add_column(column, justify="right")
    fig, ax = plt.subplots(figsize=(7, 4))
    for kernels in config.kernels:
        with tempfile.TemporaryDirectory() as workdir:
            accumulator = EventAccumulator(str(train(config, kernels, Path(workdir))))
            accumulator.Reload()
        times = [e.value for e in accumulator.Scalars("Train Iter (time)") if e.step >= config.skip]
        counts = [(e.step, e.value) for e in accumulator.Scalars("Train Metrics Dict/gaussian_count")]
        run = {
            "median_s": statistics.median(times),
            "p90_s": statistics.quantiles(times, n=10)[-1],
            "gaussians_start": int(counts[0][1]),
            "gaussians_end": int(counts[-1][1]),
        }
        results["runs"][kernels] = run
        table.add_row(kernels, f"{run['median_s']:.3f}", f"{run['p90_s']:.3f}", str(run["gaussians_start"]), str(run["gaussians_end"]))
        ax.plot([e.step for e in accumulator.Scalars("Train Iter (time)")],
                [e.value for e in accumulator.Scalars("Train Iter (time)")], label=f"{kernels} kernels", lw=0.8)
    Console().print(table)
    ax.set(xlabel="step", ylabel="seconds per step", yscale="log",
           title=f"{config.data.name}, {results['machine']}, {results['date']}")
    ax.legend()
    config.output.mkdir(parents=True, exist_ok=True)
    fig.savefig(config.output / f"{config.tag}.png", dpi=120, bbox_inches="tight")
    (config.output / f"{config.tag}.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {config.output / config.tag}.json and .png")


if __name__ == "__main__":
    main(tyro.cli(StepTimeConfig))
