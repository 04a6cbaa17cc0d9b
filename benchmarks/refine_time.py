"""Time of one refinement of MsStrategy at a given size: grow (duplicate + split, children beside their
parents), then prune + Morton re-order + even re-stripe, on aggregate parameters with Adam moments and
statistics (SH degree 3). Statistics mark `--grow` of the Gaussians for growth (half duplicated, half
split) and `--prune` for pruning. Prints the times (median of repeats; wall clock, and the CPU seconds of all threads, which other
processes on the machine do not inflate) and writes
benchmarks/results/refine_time.json.

    .venv/bin/python benchmarks/refine_time.py [--gaussians 1000000] [--spec cpu:4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import statistics
import time
from pathlib import Path

import torch

from ms_splatfacto.backend.aggregate import aggregate, exchange_totals, fallback_counts, reset_exchange, reset_fallback_counts
from ms_splatfacto.backend.morton import morton_order
from ms_splatfacto.strategy import MsStrategy
from bench_stats import spread

RESULTS = Path(__file__).resolve().parent / "results" / "refine_time.json"


def model(n: int, spec: str, grow: float, prune: float, seed: int = 0):
    """Aggregate Gaussians in a unit cube, in Morton order as the previous refinement leaves them, with
    one Adam step of moments and refinement statistics."""
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(n, 3, generator=g)
    plain = {
        "means": means[morton_order(means)],
        "scales": torch.log(torch.where(torch.rand(n, 1, generator=g) < 0.5, 0.005, 0.03).expand(n, 3).clone()),
        "quats": torch.randn(n, 4, generator=g),
        "features_dc": torch.rand(n, 3, generator=g),
        "features_rest": torch.randn(n, 15, 3, generator=g),
        "opacities": torch.logit(torch.where(torch.rand(n, 1, generator=g) < prune, 0.05, 0.5)),
    }
    params = {k: torch.nn.Parameter(aggregate(v, spec)) for k, v in plain.items()}
    optimizers = {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}
    for k, p in params.items():
        p.grad = aggregate(torch.randn(p.shape, generator=g), spec)
        optimizers[k].step()
        p.grad = None
    state = {
        "grad2d": aggregate(torch.where(torch.rand(n, generator=g) < grow, 1e-3, 1e-5), spec),
        "count": aggregate(torch.ones(n), spec),
        "radii": aggregate(torch.full((n,), 0.01), spec),
        "scene_scale": 1.0,
    }
    return params, optimizers, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gaussians", type=int, default=1_000_000)
    parser.add_argument("--spec", default="cpu:4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grow", type=float, default=0.05)
    parser.add_argument("--prune", type=float, default=0.02)
    args = parser.parse_args()
    strategy = MsStrategy(grow_grad2d=2e-4, grow_scale3d=0.01, prune_opa=0.1, reset_every=3000, refine_scale2d_stop_iter=4000)
    times = {"grow": [], "prune_reorder": [], "cpu": []}
    reset_fallback_counts()
    for repeat in range(args.repeats):
        params, optimizers, state = model(args.gaussians, args.spec, args.grow, args.prune, seed=repeat)
        reset_exchange()
        start, cpu = time.perf_counter(), time.process_time()
        n_dupli, n_split = strategy._grow_gs(params, optimizers, state, step=1000)
        grown = time.perf_counter()
        n_prune = strategy._prune_gs(params, optimizers, state, step=1000)
        times["grow"].append(grown - start)
        times["prune_reorder"].append(time.perf_counter() - grown)
        times["cpu"].append(time.process_time() - cpu)
        del params, optimizers, state
    result = {
        "gaussians": args.gaussians, "spec": args.spec, "threads": torch.get_num_threads(),
        "duplicated": n_dupli, "split": n_split, "pruned": n_prune,
        "grow_s": statistics.median(times["grow"]), "prune_reorder_s": statistics.median(times["prune_reorder"]),
        "refinement_s": statistics.median([a + b for a, b in zip(times["grow"], times["prune_reorder"])]),
        "refinement_cpu_s": statistics.median(times["cpu"]),
        "exchange_bytes": exchange_totals(), "fallbacks": fallback_counts(),
        "repeats": args.repeats, "load_average_at_end": os.getloadavg(),
        "spread_s": {k: spread(v) for k, v in
                     {**times, "refinement": [a + b for a, b in zip(times["grow"], times["prune_reorder"])]}.items()},
        "command": "benchmarks/refine_time.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(result, indent=1))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
