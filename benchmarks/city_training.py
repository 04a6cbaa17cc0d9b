"""Full training on the generated city with `--pipeline.datamanager.images cache` against `stream`: time
to step 0, steady-state step time and the training process's peak memory, at two camera counts.

The city (`ms_splatfacto.scenes.city`, 256x192 JPEG views, `--points` seed points) is rendered once at the
largest count; smaller counts are evenly spread subsets of its views (the same files). Each run is a fresh
`ns-train ms-splatfacto` process on the CPU (one member, the default kernels, no refinement inside the
measured steps so the Gaussian count, hence the work per step, is the same in every run). Runs are
interleaved (cache, stream, cache, stream, ...) and reported as min / median / max over the runs of:
- to step 0: from the process start to the wall time of nerfstudio's first iteration event (imports and
  dataset set-up included, the same in both modes but for the images);
- step time: the median of nerfstudio's own per-iteration times ("Train Iter (time)") after `--skip`;
- peak RSS: the process's peak resident memory (`os.wait4`'s ru_maxrss; the parent is small).
The stream/cache ratio of the step time is reported with its spread (min over max, max over min).

    .venv/bin/python benchmarks/city_training.py [--cameras 500 2000] [--repeats 3] [--steps 60]

Prints a table and writes benchmarks/results/city_training.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from data_stream import city_dataset, spread, subset_dataset  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "city_training.json"


def train(data: Path, images: str, steps: int, workdir: Path, threads: int) -> Dict:
    """One `ns-train` run; its step times, time to step 0 and peak RSS."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    command = [
        str(Path(sys.executable).parent / "ns-train"), "ms-splatfacto", "--output-dir", str(workdir),
        "--max-num-iterations", str(steps), "--vis", "tensorboard", "--logging.steps-per-log", "1",
        "--viewer.quit-on-train-completion", "True", "--steps-per-eval-image", "100000",
        "--steps-per-eval-all-images", "100000", "--steps-per-eval-batch", "100000", "--steps-per-save", "100000",
        "--pipeline.model.num-downscales", "0", "--pipeline.model.warmup-length", "100000",
        "--pipeline.datamanager.images", images, "--cpu-threads", str(threads),
        "nerfstudio-data", "--data", str(data),
    ]
    with open(workdir / "log.txt", "w") as log:
        started = time.time()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{(workdir / 'log.txt').read_text()[-4000:]}")
    (events,) = workdir.glob("*/ms-splatfacto/*/events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    iterations = accumulator.Scalars("Train Iter (time)")
    return {
        "to_step0_s": iterations[0].wall_time - started,
        "step_s": [e.value for e in iterations],
        "peak_rss_bytes": usage.ru_maxrss * 1024,
    }


def ratio_spread(a: Sequence[float], b: Sequence[float]) -> Dict[str, float]:
    """b / a: the ratio of medians, with the most pessimistic and optimistic ratios the runs allow."""
    return {"min": min(b) / max(a), "median": statistics.median(b) / statistics.median(a), "max": max(b) / min(a)}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cameras", type=int, nargs="+", default=[500, 2000], help="dataset sizes (cameras, 90%% train)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per (size, mode), interleaved")
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--skip", type=int, default=10, help="leading steps left out of the step time (warm-up)")
    parser.add_argument("--points", type=int, default=20000, help="seed points of the city: the Gaussians trained")
    parser.add_argument("--threads", type=int, default=1, help="--cpu-threads of every run (pinned, recorded)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    rows: List[Dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="city_training_") as tmp:
        city = Path(tmp) / "city"
        subprocess.run([sys.executable, "-m", "ms_splatfacto.scenes.city", "--cameras", str(max(args.cameras)),
                        "--points", str(args.points), "--output", str(city)], cwd=REPO, check=True, capture_output=True)
        console.log(f"Rendered the city: {max(args.cameras)} views ({time.perf_counter() - started:.0f} s)")
        for cameras in args.cameras:
            data = subset_dataset(city, Path(tmp) / f"cameras_{cameras}", cameras)
            (data / "sparse_pc.ply").symlink_to(city / "sparse_pc.ply")
            meta = json.loads((data / "transforms.json").read_text())
            meta["ply_file_path"] = "sparse_pc.ply"
            (data / "transforms.json").write_text(json.dumps(meta))
            runs: Dict[str, List[Dict]] = {"cache": [], "stream": []}
            for repeat in range(args.repeats):
                for mode in ("cache", "stream"):  # interleaved: A, B, A, B, ...
                    workdir = Path(tmp) / f"run_{cameras}_{mode}_{repeat}"
                    workdir.mkdir()
                    runs[mode].append(train(data, mode, args.steps, workdir, args.threads))
                    console.log(f"{cameras} cameras, {mode}, run {repeat + 1}: {runs[mode][-1]['to_step0_s']:.1f} s to step 0, "
                                f"{1000 * statistics.median(runs[mode][-1]['step_s'][args.skip:]):.0f} ms/step")
            medians = {mode: [statistics.median(r["step_s"][args.skip:]) for r in results] for mode, results in runs.items()}
            for mode, results in runs.items():
                rows.append({
                    "cameras": cameras, "images": mode,
                    "to_step0_s": spread(r["to_step0_s"] for r in results),
                    "step_ms": spread(1000 * m for m in medians[mode]),
                    "peak_rss_mb": spread(r["peak_rss_bytes"] / 2**20 for r in results),
                    "stream_over_cache": ratio_spread(medians["cache"], medians["stream"]) if mode == "stream" else None,
                })
    table = Table(title=f"Training on the city, {args.steps} steps ({args.skip} skipped), {args.points} Gaussians, "
                        f"{args.threads} thread(s): min / median / max of {args.repeats} interleaved runs")
    for column in ("cameras", "images", "to step 0 (s)", "step (ms)", "stream / cache step", "peak RSS (MB)"):
        table.add_column(column, justify="right")
    fmt = lambda s, f: f"{s['min']:{f}} / {s['median']:{f}} / {s['max']:{f}}"  # noqa: E731
    for row in rows:
        ratio = row["stream_over_cache"]
        table.add_row(str(row["cameras"]), row["images"], fmt(row["to_step0_s"], ".1f"), fmt(row["step_ms"], ".0f"),
                      fmt(ratio, ".3f") if ratio else "", fmt(row["peak_rss_mb"], ".0f"))
    console.print(table)
    meta = {
        "date": date.today().isoformat(), "machine": platform.machine(), "cores": len(os.sched_getaffinity(0)),
        "load_average_at_end": os.getloadavg(), "steps": args.steps, "skip": args.skip, "points": args.points,
        "threads": args.threads, "repeats": args.repeats, "wall_s": time.perf_counter() - started,
        "command": "benchmarks/city_training.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    console.print(f"Wrote {args.output}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
