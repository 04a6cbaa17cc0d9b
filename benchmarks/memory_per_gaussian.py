"""Peak training memory per Gaussian against the capacity planner: one stepbench subprocess per measurement.

Each run: `benchmarks/stepbench.py --devices cpu --steps 2` (one member, one camera per step, SH 3) with
MALLOC_MMAP_THRESHOLD_=65536, so freed tensors leave the resident set and the peak resident memory over
the baseline is the peak of live tensor bytes; with torch's single-tensor Adam (what ns-train builds)
and with its fused Adam, at the thread counts given.

    .venv/bin/python benchmarks/memory_per_gaussian.py --sizes 1000000 --threads 1

Writes benchmarks/results/memory_per_gaussian.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ms_splatfacto import capacity  # noqa: E402


def measure(n: int, threads: int, fused_adam: bool) -> Dict[str, object]:
    command = [sys.executable, str(REPO / "benchmarks" / "stepbench.py"), "--gaussians", str(n), "--devices", "cpu", "--steps", "2",
               "--threads", str(threads)] + (["--fused-adam"] if fused_adam else [])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"stepbench failed: {proc.stderr.strip().splitlines()[-1:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    predicted = capacity.predicted_peak(n, 3, 256, 192, 1, threads=threads, fused_adam=fused_adam)
    return {"gaussians": n, "threads": threads, "fused_adam": fused_adam, "measured_bytes_per_gaussian": r["peak_over_baseline"] / n,
            "planner_bytes_per_gaussian": predicted / n, "planner_error": predicted / r["peak_over_baseline"] - 1,
            "peak_phase": capacity.peak_phase(3, 1, threads, fused_adam), "arithmetic_minimum": capacity.arithmetic_minimum(3),
            "goal": round(1.15 * capacity.arithmetic_minimum(3)), "step_s": r["step_s"]}


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "memory_per_gaussian.json")
    args = parser.parse_args(argv)
    if any(n <= 0 for n in args.sizes) or any(t <= 0 for t in args.threads):
        parser.error("sizes and threads must be positive")
    runs = []
    print(f"{'Gaussians':>10} {'threads':>7} {'Adam':>7} {'measured B/G':>13} {'planner B/G':>12} {'error':>7}  peak phase")
    for n in args.sizes:
        for t in args.threads:
            for fused in (False, True):
                r = measure(n, t, fused)
                runs.append(r)
                print(f"{n:>10,} {t:>7} {'fused' if fused else 'single':>7} {r['measured_bytes_per_gaussian']:>13.0f} "
                      f"{r['planner_bytes_per_gaussian']:>12.0f} {r['planner_error']:>+7.1%}  {r['peak_phase']}", flush=True)
    out = {"command": " ".join(["benchmarks/memory_per_gaussian.py", *(argv if argv is not None else sys.argv[1:])]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
