"""Members in separate processes: a training step on W ranks (1 member each, gloo on loopback, one
torch thread per rank) against the same step in one process with W members, measured interleaved
(ranks, one process, ranks, ...). Reports step time (median, min, max over runs) and the bytes of a
step by kind: what the exchange counted (all ranks together) and what went to torch.distributed.

    .venv/bin/python benchmarks/ranks_bench.py --gaussians 20000 --ranks 1 2 4 --runs 3 --out benchmarks/results

On a 2-core machine, 2 ranks can use both cores where one process with 2 members fuses its members
into one launch on up to 2 threads, and 4 ranks share 2 cores: this shows the cost of real transport
and of unfused per-member launches, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from datetime import date
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from ms_splatfacto.backend.aggregate import wire_totals  # noqa: E402
from ms_splatfacto.backend.aggregate.local_ranks import run_local_ranks  # noqa: E402


def steps_here(devices: str, gaussians: int, steps: int, threads: int) -> Dict[str, object]:
    """Warm-up step, then `steps` timed steps on `devices`: per-step seconds and bytes per kind."""
    import stepbench

    torch.set_num_threads(threads)
    model = stepbench.build_model(devices)
    optimizers = stepbench.load(model, stepbench.synthetic_gaussians(gaussians))
    stepbench.train_step(model, optimizers, 0)
    seconds, counted, wire = [], [], []
    for i in range(steps):
        times, exchanged, _ = stepbench.train_step(model, optimizers, 1 + i)  # resets both counts first
        seconds.append(times["total"])
        counted.append(exchanged)
        wire.append(wire_totals())
    return {"seconds": seconds, "counted": counted[-1], "wire": wire[-1], "threads": torch.get_num_threads()}


def one_config(world: int, gaussians: int, steps: int, runs: int) -> Dict[str, object]:
    """Interleaved runs of W ranks and of one process with W members."""
    ranks_runs, process_runs = [], []
    for _ in range(runs):
        per_rank = run_local_ranks(world, steps_here, "cpu", gaussians, steps, 1) if world > 1 else [steps_here("cpu", gaussians, steps, 1)]
        ranks_runs.append(per_rank)
        process_runs.append(steps_here(f"cpu:{world}", gaussians, steps, min(world, os.cpu_count() or 1)))
    slowest = [statistics.median(max(r["seconds"][i] for r in per_rank) for i in range(steps)) for per_rank in ranks_runs]
    one = [statistics.median(r["seconds"]) for r in process_runs]

    def summary(values: List[float]) -> Dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    def summed(per_rank, key):
        kinds = sorted({k for r in per_rank for k in r[key]})
        return {k: sum(r[key].get(k, 0) for r in per_rank) for k in kinds}

    return {
        "ranks": world, "gaussians": gaussians, "steps_per_run": steps, "runs": runs,
        "ranks_step_s": summary(slowest), "one_process_step_s": summary(one),
        "ranks_threads_each": 1, "one_process_threads": process_runs[-1]["threads"],
        "ranks_bytes_counted": summed(ranks_runs[-1], "counted"), "ranks_bytes_wire": summed(ranks_runs[-1], "wire"),
        "one_process_bytes_counted": process_runs[-1]["counted"],
    }


def section_ranks(gaussians: int, ranks: List[int], steps: int, runs: int) -> List[Dict[str, object]]:
    return [one_config(w, gaussians, steps, runs) for w in ranks]


def print_table(results: List[Dict[str, object]], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=150)
    t = Table(title="A step on W ranks (gloo, 1 thread each) vs one process with W members")
    for c in ("W", "ranks s (min-max)", "one process s (min-max)", "ratio", "counted other/read/scatter B", "wire other/read/scatter/meta B"):
        t.add_column(c, justify="right")
    for r in results:
        a, b = r["ranks_step_s"], r["one_process_step_s"]
        ratio = a["median"] / b["median"]
        spread = (a["max"] - a["min"]) / a["median"] + (b["max"] - b["min"]) / b["median"]
        flag = " (within spread)" if abs(ratio - 1) < spread else ""
        c, w = r["ranks_bytes_counted"], r["ranks_bytes_wire"]
        t.add_row(
            str(r["ranks"]), f"{a['median']:.3f} ({a['min']:.3f}-{a['max']:.3f})", f"{b['median']:.3f} ({b['min']:.3f}-{b['max']:.3f})",
            f"{ratio:.2f}{flag}", f"{c.get('other', 0):,}/{c.get('remote_read', 0):,}/{c.get('reduce_scatter', 0):,}",
            f"{w.get('other', 0):,}/{w.get('remote_read', 0):,}/{w.get('reduce_scatter', 0):,}/{w.get('meta', 0):,}",
        )
    console.print(t)


def plot(results: List[Dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ws = [r["ranks"] for r in results]
    for key, label in (("ranks_step_s", "W ranks (gloo)"), ("one_process_step_s", "one process, W members")):
        med = [r[key]["median"] for r in results]
        err = [[m - r[key]["min"] for m, r in zip(med, results)], [r[key]["max"] - m for m, r in zip(med, results)]]
        ax.errorbar(ws, med, yerr=err, marker="o", capsize=4, label=label)
    ax.set_xlabel("members (W)")
    ax.set_ylabel("step time (s), median and range")
    ax.set_title(f"{results[0]['gaussians']:,} Gaussians, lund_tiny cameras")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gaussians", type=int, default=20_000)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs of each side")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()  # others share the cores: say how busy they were
    results = section_ranks(args.gaussians, args.ranks, args.steps, args.runs)
    print_table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": str(date.today()), "cpus": os.cpu_count(), "torch": torch.__version__,
            "command": "benchmarks/ranks_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "load_average_1_5_15_min": {"before": list(load_before), "after": list(os.getloadavg())}}
    (args.out / "ranks.json").write_text(json.dumps({"meta": meta, "ranks": results}, indent=1))
    plot(results, args.out / "ranks_step_time.png")


if __name__ == "__main__":
    main()
