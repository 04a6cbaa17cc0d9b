"""Fixed cost per member: one process holds a model per member count and steps them in turn (A, B, C, A, B, C...).

Interleaving step by step inside one process puts every member count under the same load, which
subprocess rounds (`step_table.py`) cannot do on a busy machine. Each step is timed by wall clock and by
the process's CPU time (with one pinned thread, CPU time hardly moves when other jobs share the cores);
ratios against the first member count are taken within each cycle and reported as median, min and max.

    .venv/bin/python benchmarks/member_overhead.py --gaussians 20000 --members 1 4 8 --cycles 40

With `--trees OLD NEW ...` it runs this measurement in each tree in turn (OLD, NEW, OLD, NEW, ... for
`--pairs` rounds, each tree its own code and kernels) and reports each tree's ratios over its runs.

Writes benchmarks/results/member_overhead.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional
from bench_stats import spread

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

import stepbench  # noqa: E402



def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gaussians", type=int, default=20_000)
    parser.add_argument("--members", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--cycles", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "member_overhead.json")
    parser.add_argument("--trees", type=Path, nargs="+", default=None, help="checkouts to compare, run in turn")
    parser.add_argument("--pairs", type=int, default=2, help="rounds over --trees")
    args = parser.parse_args(argv)
    if args.trees:
        return compare_trees(args, argv if argv is not None else sys.argv[1:])
    if args.gaussians <= 0 or args.cycles < 1 or any(m <= 0 for m in args.members):
        parser.error("gaussians, cycles and members must be positive")
    torch.set_num_threads(args.threads)
    from ms_splatfacto.backend.morton import morton_order

    g = stepbench.synthetic_gaussians(args.gaussians)
    order = morton_order(g["means"])
    runs = {}
    for m in args.members:
        model = stepbench.build_model(f"cpu:{m}")
        runs[m] = (model, stepbench.load(model, {k: v[order].clone() for k, v in g.items()}))
    n_cameras = len(stepbench.scene()[0])
    wall: Dict[int, List[float]] = {m: [] for m in args.members}
    cpu: Dict[int, List[float]] = {m: [] for m in args.members}
    for cycle in range(args.warmup + args.cycles):
        for m in args.members if cycle % 2 == 0 else args.members[::-1]:
            model, optimizers = runs[m]
            c0, t0 = time.process_time(), time.perf_counter()
            stepbench.train_step(model, optimizers, cycle % n_cameras)
            if cycle >= args.warmup:
                wall[m].append(time.perf_counter() - t0)
                cpu[m].append(time.process_time() - c0)
    base = args.members[0]
    rows = []
    for m in args.members:
        row = {"members": m, "wall_s": spread(wall[m]), "cpu_s": spread(cpu[m]),
               "wall_ratio": spread([a / b for a, b in zip(wall[m], wall[base])]),
               "cpu_ratio": spread([a / b for a, b in zip(cpu[m], cpu[base])]),
               "per_member_cpu_ms": (statistics.median(cpu[m]) - statistics.median(cpu[base])) / max(1, m - base) * 1e3}
        rows.append(row)
    result = {"command": " ".join(["benchmarks/member_overhead.py", *(argv if argv is not None else sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gaussians": args.gaussians, "threads": args.threads,
              "cycles": args.cycles, "warmup": args.warmup, "load_average": list(os.getloadavg()), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'devices':>8} {'wall ms (min-max)':>26} {'cpu ms (min-max)':>26} {'wall ratio':>22} {'cpu ratio':>22}")
    for r in rows:
        w, c, wr, cr = r["wall_s"], r["cpu_s"], r["wall_ratio"], r["cpu_ratio"]
        print(f"{'cpu:' + str(r['members']):>8} {w['median'] * 1e3:8.1f} ({w['min'] * 1e3:6.1f}-{w['max'] * 1e3:6.1f}) "
              f"{c['median'] * 1e3:8.1f} ({c['min'] * 1e3:6.1f}-{c['max'] * 1e3:6.1f}) "
              f"{wr['median']:6.3f} ({wr['min']:.2f}-{wr['max']:.2f}) {cr['median']:6.3f} ({cr['min']:.2f}-{cr['max']:.2f})")
    print(f"wrote {args.out} (load {result['load_average']})")
    return result


def compare_trees(args, argv: List[str]) -> Dict[str, object]:
    """The measurement in each tree in turn (alternating, `args.pairs` rounds); per tree and member count
    the spread of the runs' median CPU-time ratios and step times."""
    import subprocess
    import tempfile

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            for i, tree in enumerate(args.trees):
                out = Path(tmp) / f"{pair}_{i}.json"
                command = [sys.executable, str(tree / "benchmarks" / "member_overhead.py"), "--gaussians", str(args.gaussians),
                           "--members", *map(str, args.members), "--cycles", str(args.cycles), "--warmup", str(args.warmup),
                           "--threads", str(args.threads), "--out", str(out)]
                subprocess.run(command, cwd=tree, check=True, capture_output=True, text=True)
                runs.append({"tree": str(tree), "pair": pair, **json.loads(out.read_text())})
    summary = {}
    for tree in map(str, args.trees):
        mine = [r for r in runs if r["tree"] == tree]
        summary[tree] = {str(m): {"cpu_ratio": spread(row["cpu_ratio"]["median"] for r in mine for row in r["rows"] if row["members"] == m),
                                  "cpu_ms": spread(row["cpu_s"]["median"] * 1e3 for r in mine for row in r["rows"] if row["members"] == m)}
                         for m in args.members}
    commits = {str(t): subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=t, capture_output=True, text=True).stdout.strip()
               for t in args.trees}
    result = {"command": " ".join(["benchmarks/member_overhead.py", *argv]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "commits": commits, "summary": summary, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for tree, rows in summary.items():
        print(f"{tree} ({commits[tree]})")
        for m, r in rows.items():
            c, ms = r["cpu_ratio"], r["cpu_ms"]
            print(f"  cpu:{m:<3} {ms['median']:7.1f} ms ({ms['min']:.1f}-{ms['max']:.1f})   ratio {c['median']:.3f} ({c['min']:.3f}-{c['max']:.3f})")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
