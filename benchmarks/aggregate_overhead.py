"""Overhead of the aggregate tensor on cpu:4 relative to an ordinary CPU tensor.

Times (median of repeats after warm-up) a pointwise op, an Adam step over 10M rows ([10M, 3]
parameter, for-loop and foreach) and a mask+cat re-stripe, and the memory the aggregate tensor takes
beyond its data. Prints a table and writes benchmarks/results/aggregate_overhead.json.

    .venv/bin/python benchmarks/aggregate_overhead.py [--rows 10000000] [--spec cpu:4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import tracemalloc
from pathlib import Path
from typing import Callable, Dict

import torch
from rich.console import Console
from rich.table import Table

from ms_splatfacto.backend.aggregate import aggregate, exchange_counts, fallback_counts, parameter, reset_exchange
from ms_splatfacto.backend.aggregate.tensor import wrap

RESULTS = Path(__file__).resolve().parent / "results" / "aggregate_overhead.json"


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def adam_step(make: Callable[[torch.Tensor], torch.Tensor], init: torch.Tensor, grad: torch.Tensor, foreach: bool):
    p = make(init)
    p.grad = make(grad)
    opt = torch.optim.Adam([p], lr=1e-3, foreach=foreach)
    opt.step()  # creates the moments
    return opt.step


def cases(rows: int, spec: str) -> Dict[str, Dict[str, Callable[[], object]]]:
    g = torch.Generator().manual_seed(0)
    x0, y0 = torch.randn(rows, 3, generator=g), torch.randn(rows, 3, generator=g)
    out = {}
    for kind, make, make_param in [
        ("plain", lambda t: t.clone(), lambda t: torch.nn.Parameter(t.clone())),
        ("aggregate", lambda t: aggregate(t, spec), lambda t: parameter(t, spec)),
    ]:
        x, y = make(x0), make(y0)
        mask = x[:, 0] > 1.2816  # about 10% of rows
        out[kind] = {
            "pointwise (x * 2 + y)": lambda x=x, y=y: x * 2.0 + y,
            "Adam step, for-loop": adam_step(make_param, x0, y0, foreach=False),
            "Adam step, foreach": adam_step(make_param, x0, y0, foreach=True),
            "mask + cat (10% rows)": lambda x=x, mask=mask: torch.cat([x, x[mask]]),
        }
    return out


def memory_overhead(rows: int, spec: str) -> Dict[str, int]:
    """Data bytes of an aggregate vs an ordinary tensor, and the Python-side bytes of the wrapper and
    its per-member chunk views (what the aggregate costs beyond its data)."""
    x = aggregate(torch.zeros(rows, 3), spec)
    plain = torch.zeros(rows, 3)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    view = wrap(x._layout, whole=x._whole)
    view.chunks
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {
        "data_bytes_plain": plain.untyped_storage().nbytes(),
        "data_bytes_aggregate": x._whole.untyped_storage().nbytes(),
        "wrapper_and_chunk_views_bytes": after - before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--spec", default="cpu:4")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    timed = cases(args.rows, args.spec)
    results = {}
    for name in timed["plain"]:
        plain = median_seconds(timed["plain"][name], args.repeats)
        agg = median_seconds(timed["aggregate"][name], args.repeats)
        results[name] = {"plain_s": plain, "aggregate_s": agg, "ratio": agg / plain}
    reset_exchange()
    timed["aggregate"]["mask + cat (10% rows)"]()
    moved = sum(exchange_counts().values())
    memory = memory_overhead(args.rows, args.spec)
    report = {
        "rows": args.rows, "spec": args.spec, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "timings": results, "memory": memory, "fallbacks": fallback_counts(),
        "mask_cat_exchange_bytes": moved,
    }
    table = Table(title=f"aggregate tensor on {args.spec} vs ordinary CPU tensor, [{args.rows:,}, 3] float32, {torch.get_num_threads()} threads")
    for column in ["operation", "ordinary (ms)", "aggregate (ms)", "ratio"]:
        table.add_column(column, justify="right" if column != "operation" else "left")
    for name, r in results.items():
        table.add_row(name, f"{r['plain_s'] * 1e3:.1f}", f"{r['aggregate_s'] * 1e3:.1f}", f"{r['ratio']:.3f}")
    console = Console()
    console.print(table)
    console.print(
        f"memory: data {memory['data_bytes_aggregate']:,} B (ordinary {memory['data_bytes_plain']:,} B); "
        f"wrapper + chunk views {memory['wrapper_and_chunk_views_bytes']:,} B; fallbacks {fallback_counts() or 'none'}; "
        f"mask+cat would move {moved:,} B between members"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
