"""Checkpoint write and read time at a given size, through the code training uses
(`checkpoints.write_checkpoint` / `read_checkpoint`): aggregate parameters with Adam moments and
densification statistics (SH degree 3), for each member spec given. One member in one process writes
nerfstudio's single file; several members write the sharded folder (each member's rows as they lie) and
read it back striped over the same members. Specs are interleaved (A, B, A, B, ...) and each time is
reported as min / median / max over the repeats; the thread count is pinned and recorded.

    .venv/bin/python benchmarks/checkpoint_time.py [--gaussians 1000000] [--specs cpu cpu:4] [--repeats 3]

Prints a table and writes benchmarks/results/checkpoint_time.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Dict, List
from bench_stats import spread

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from refine_time import model  # noqa: E402

from ms_splatfacto.backend.aggregate import members  # noqa: E402
from ms_splatfacto.checkpoints import read_checkpoint, write_checkpoint  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "checkpoint_time.json"


def folder_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gaussians", type=int, default=1_000_000)
    parser.add_argument("--specs", nargs="+", default=["cpu", "cpu:4"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    states = {}
    for spec in args.specs:
        params, optimizers, stats = model(args.gaussians, spec, grow=0.0, prune=0.0)
        states[spec] = {"step": 1, "pipeline": {f"_model.gauss_params.{k}": p.detach() for k, p in params.items()},
                        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                        "scalers": {}, "strategy": {k: v for k, v in stats.items() if torch.is_tensor(v)}}
    times: Dict[str, Dict[str, List[float]]] = {spec: {"write": [], "read": []} for spec in args.specs}
    sizes: Dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for spec in args.specs:  # interleaved
                folder = Path(tmp) / f"{spec.replace(':', '_')}_{repeat}" / "nerfstudio_models"
                start = time.perf_counter()
                path = write_checkpoint(states[spec], folder, 1)
                times[spec]["write"].append(time.perf_counter() - start)
                start = time.perf_counter()
                loaded = read_checkpoint(path, members(spec))
                times[spec]["read"].append(time.perf_counter() - start)
                sizes[spec] = folder_bytes(path)
                del loaded
    rows = [{"spec": spec, "format": "sharded folder" if len(members(spec)) > 1 else "single file", "bytes": sizes[spec],
             **{f"{k}_s": spread(v) for k, v in times[spec].items()}} for spec in args.specs]
    for row in rows:
        print(f"{row['spec']:>8} {row['format']:>15} {row['bytes'] / 2**20:8.0f} MiB  "
              + "  ".join(f"{k} {row[f'{k}_s']['min']:.2f} / {row[f'{k}_s']['median']:.2f} / {row[f'{k}_s']['max']:.2f} s"
                          for k in ("write", "read")))
    result = {"date": date.today().isoformat(), "gaussians": args.gaussians, "repeats": args.repeats,
              "threads": args.threads, "load_average_at_end": os.getloadavg(), "rows": rows,
              "command": "benchmarks/checkpoint_time.py " + " ".join(sys.argv[1:])}
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"Wrote {RESULTS}")


if __name__ == "__main__":
    main()
