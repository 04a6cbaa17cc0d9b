"""Interleaved step-time table: median, min and max of a training step at several sizes and member counts.

Each (size, members) cell is one `benchmarks/stepbench.py --time-steps` subprocess per round; a round runs
every member count of a size once, in alternating order (1, 2, 4, 8 then 8, 4, 2, 1, ...), so slow spells
of a shared machine fall on all counts alike. A subprocess's figure is the median of its timed steps after
its own warm-up steps (not timed). The thread count is pinned (torch threads and OMP_NUM_THREADS) and
recorded. Ratios against cpu:1 are taken round by round (the same round's cpu:1), and reported as median,
min and max; a ratio whose spread (max - min) exceeds its effect (|median - 1|) is flagged.

    .venv/bin/python benchmarks/step_table.py --sizes 20000 --rounds 5          # minutes
    .venv/bin/python benchmarks/step_table.py                                    # 20k, 100k, 1M: hours

Writes benchmarks/results/step_table.json (or --out) and a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional
from bench_stats import spread

REPO = Path(__file__).resolve().parents[1]
STEPBENCH = REPO / "benchmarks" / "stepbench.py"


def run_cell(n: int, members: int, steps: int, warmup: int, threads: int) -> Dict[str, object]:
    """One stepbench subprocess: its timed steps (seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, str(STEPBENCH), "--gaussians", str(n), "--devices", f"cpu:{members}",
               "--time-steps", str(steps), "--warmup", str(warmup), "--threads", str(threads)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"stepbench failed ({' '.join(command[1:])}): {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])



def load_avg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def measure(sizes: List[int], members: List[int], rounds: int, steps: int, warmup: int, threads: int) -> Dict[str, object]:
    per_round: Dict[int, Dict[int, List[float]]] = {n: {m: [] for m in members} for n in sizes}
    phases: Dict[int, Dict[int, Dict[str, List[float]]]] = {n: {m: {} for m in members} for n in sizes}
    loads = [load_avg()]
    for n in sizes:
        for r in range(rounds):
            order = members if r % 2 == 0 else members[::-1]
            for m in order:
                result = run_cell(n, m, steps, warmup, threads)
                per_round[n][m].append(statistics.median(result["total_s"]))
                for phase, values in result["phases_s"].items():
                    phases[n][m].setdefault(phase, []).append(statistics.median(values))
                print(f"  {n:>9,} Gaussians  cpu:{m}  round {r + 1}/{rounds}: {per_round[n][m][-1] * 1e3:8.1f} ms", flush=True)
            loads.append(load_avg())
    cells = []
    for n in sizes:
        base = per_round[n][members[0]]
        for m in members:
            ratios = [t / b for t, b in zip(per_round[n][m], base)]
            ratio = spread(ratios)
            effect = abs(ratio["median"] - 1.0)
            cells.append({
                "gaussians": n, "members": m, "step_s": spread(per_round[n][m]), "rounds_s": per_round[n][m],
                "phases_s": {p: statistics.median(v) for p, v in phases[n][m].items()},
                f"ratio_vs_cpu{members[0]}": ratio, "ratios": ratios,
                "spread_exceeds_effect": m != members[0] and (ratio["max"] - ratio["min"]) > effect,
            })
    return {"cells": cells, "load_average": loads}


def plot(result: Dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({c["gaussians"] for c in result["cells"]})
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes), 3.6), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        cells = [c for c in result["cells"] if c["gaussians"] == n]
        x = [c["members"] for c in cells]
        med = [c["step_s"]["median"] * 1e3 for c in cells]
        lo = [m - c["step_s"]["min"] * 1e3 for m, c in zip(med, cells)]
        hi = [c["step_s"]["max"] * 1e3 - m for m, c in zip(med, cells)]
        ax.errorbar(x, med, yerr=[lo, hi], marker="o", capsize=4)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"cpu:{m}" for m in x])
        ax.set_ylim(bottom=0)
        ax.set_title(f"{n:,} Gaussians")
        ax.set_ylabel("step time (ms): median, min-max")
    fig.suptitle(f"Training step by member count\n{result['threads']} thread(s), {result['rounds']} interleaved rounds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replot", action="store_true", help="only redraw the plot of --out")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000, 1_000_000])
    parser.add_argument("--members", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per subprocess (its median is the round's figure)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per subprocess before timing")
    parser.add_argument("--threads", type=int, default=0, help="pinned thread count (0: the cores this process may use)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "step_table.json")
    args = parser.parse_args(argv)
    if any(n <= 0 for n in args.sizes) or any(m <= 0 for m in args.members) or args.rounds < 1 or args.steps < 1:
        parser.error("sizes, members, rounds and steps must be positive")
    if args.replot:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return {}
    sys.path.insert(0, str(REPO))
    from ms_splatfacto.backend.threads import available_cores

    threads = args.threads or available_cores()
    t0 = time.time()
    result = {"command": " ".join(["benchmarks/step_table.py", *(argv if argv is not None else sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(), "cores": os.cpu_count(),
              "threads": threads, "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup}
    result.update(measure(args.sizes, args.members, args.rounds, args.steps, args.warmup, threads))
    result["wall_s"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    base = args.members[0]
    print(f"\n{'Gaussians':>10} {'devices':>8} {'median ms':>10} {'min':>8} {'max':>8}   ratio vs cpu:{base} (min-max)")
    for c in result["cells"]:
        s, r = c["step_s"], c[f"ratio_vs_cpu{base}"]
        flag = "  spread > effect" if c["spread_exceeds_effect"] else ""
        print(f"{c['gaussians']:>10,} {'cpu:' + str(c['members']):>8} {s['median'] * 1e3:>10.1f} {s['min'] * 1e3:>8.1f} {s['max'] * 1e3:>8.1f}"
              f"   {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f}){flag}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} ({result['wall_s']} s, {threads} thread(s), load {result['load_average'][-1]})")
    return result


if __name__ == "__main__":
    main()
