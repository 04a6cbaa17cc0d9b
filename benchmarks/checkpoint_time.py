"""Checkpoint write and read time at a given size: aggregate parameters with Adam moments (SH degree 3),
written atomically in global row order, read back, and re-striped onto the members. Medians of repeats;
writes benchmarks/results/checkpoint_time.json.

    .venv/bin/python benchmarks/checkpoint_time.py [--gaussians 1000000] [--spec cpu:4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from refine_time import model

from ms_splatfacto.backend.aggregate import aggregate, restripe_optimizer_state
from ms_splatfacto.io import atomic_torch_save

RESULTS = Path(__file__).resolve().parent / "results" / "checkpoint_time.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gaussians", type=int, default=1_000_000)
    parser.add_argument("--spec", default="cpu:4")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    params, optimizers, _ = model(args.gaussians, args.spec, grow=0.0, prune=0.0)
    state = {"params": params, "optimizers": {k: o.state_dict() for k, o in optimizers.items()}}
    times = {"write": [], "read": [], "restripe": []}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "step.ckpt"
        for _ in range(args.repeats):
            start = time.perf_counter()
            atomic_torch_save(state, path)
            times["write"].append(time.perf_counter() - start)
            start = time.perf_counter()
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            times["read"].append(time.perf_counter() - start)
            start = time.perf_counter()
            for name, optimizer in optimizers.items():
                params[name].data = aggregate(loaded["params"][name].detach(), args.spec)
                optimizer.load_state_dict(loaded["optimizers"][name])
                restripe_optimizer_state(optimizer)
            times["restripe"].append(time.perf_counter() - start)
        size = path.stat().st_size
    result = {"gaussians": args.gaussians, "spec": args.spec, "file_bytes": size,
              **{f"{k}_s": statistics.median(v) for k, v in times.items()}}
    print(json.dumps(result, indent=1))
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
