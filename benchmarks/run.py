"""The ms-splatfacto benchmark: step time, the reference floor, rasterizer throughput, peak memory, exchange
bytes (Morton vs random order, Grendel-style count), simulation on up to 64 members, the largest model one
step completes with, a GPU section, and the step on ranks (separate processes) against one process. Prints rich tables, writes PNG plots and run.json.

    .venv/bin/python benchmarks/run.py --quick      # < 15 min on 2 CPU cores
    .venv/bin/python benchmarks/run.py              # full: 100k and 1M Gaussians, largest-model search
    .venv/bin/python benchmarks/run.py --tiny --out /tmp/bench   # seconds; what the test suite runs

Every time is the median of repeated steps after a warm-up step; every ratio compares runs of one
invocation. Step times use the Morton row order (what training has after its first refinement).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import exchange_bench  # noqa: E402
import ranks_bench  # noqa: E402
import stepbench  # noqa: E402
from ms_splatfacto import capacity  # noqa: E402
from ms_splatfacto.backend.morton import morton_order  # noqa: E402

console = Console(width=150)
MODES = {
    "full": dict(sizes=[100_000, 1_000_000], members=[1, 2, 4, 8], repeats=5, reference_n=5_000, memory_sizes=[400_000, 1_000_000],
                 sim_n=200_000, sim_members=[1, 2, 4, 8, 16, 32, 64], largest_budget=24 * 2**30, largest_start=1_000_000,
                 ranks_n=100_000, ranks=[1, 2, 4], ranks_runs=3),
    "quick": dict(sizes=[20_000, 100_000], members=[1, 2, 4, 8], repeats=3, reference_n=2_000, memory_sizes=[200_000],
                  sim_n=50_000, sim_members=[1, 2, 4, 8, 16, 32, 64], largest_budget=2 * 2**30, largest_start=400_000,
                  ranks_n=20_000, ranks=[1, 2, 4], ranks_runs=3),
    "tiny": dict(sizes=[2_000], members=[1, 4], repeats=1, reference_n=200, memory_sizes=[20_000],
                 sim_n=1_000, sim_members=[1, 16], largest_budget=0, largest_start=0,
                 ranks_n=2_000, ranks=[2], ranks_runs=1),
}
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"""glibc keeps freed memory in its heaps; with this threshold freed tensors leave the resident set, so the
peak resident memory is the peak of live tensor bytes (what the capacity planner predicts)."""


def table(title: str, columns: List[str], rows: List[List[object]]) -> None:
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*[f"{v:.3g}" if isinstance(v, float) else (f"{v:,}" if isinstance(v, int) else str(v)) for v in r])
    console.print(t)


def gaussians(n: int, morton: bool = True) -> Dict[str, torch.Tensor]:
    g = stepbench.synthetic_gaussians(n)
    if morton:
        order = morton_order(g["means"])
        g = {k: v[order] for k, v in g.items()}
    return g


def step_run(n: int, members: int, repeats: int, kernels: str = "cpu", morton: bool = True) -> Dict[str, object]:
    model = stepbench.build_model(f"cpu:{members}", kernels)
    optimizers = stepbench.load(model, gaussians(n, morton))
    result = stepbench.timed_steps(model, optimizers, repeats)
    result.update(gaussians=n, members=members, kernels=kernels, order="morton" if morton else "random")
    if members > 1:
        result["grendel"] = exchange_bench.grendel_count(model.info, members)
    return result


def section_steps(cfg: Dict) -> List[Dict]:
    runs = []
    for n in cfg["sizes"]:
        for m in cfg["members"]:
            runs.append(step_run(n, m, cfg["repeats"]))
            console.log(f"step: {n:,} Gaussians on cpu:{m}: {runs[-1]['total']:.3f} s")
    for r in runs:
        one = next(x for x in runs if x["gaussians"] == r["gaussians"] and x["members"] == 1)
        r["ratio_to_1_member"] = r["total"] / one["total"]
        # Gaussian-pixel evaluations: every pixel of every intersected tile tests the Gaussian once.
        r["gaussian_pixel_evals"] = r["n_isects"] * 16 * 16
        r["evals_per_s_forward"] = r["gaussian_pixel_evals"] / r["forward"]
    table("training step on lund_tiny cameras, 256x192, SH 3, CPU kernels (median seconds)",
          ["Gaussians", "members", "forward", "loss", "backward", "Adam", "stats", "total", "ratio to 1", "Gpix-evals/s (fwd)"],
          [[r["gaussians"], r["members"], r["forward"], r["loss"], r["backward"], r["adam"], r["stats"], r["total"],
            r["ratio_to_1_member"], r["evals_per_s_forward"] / 1e9] for r in runs])
    return runs


def section_reference(cfg: Dict) -> List[Dict]:
    n, runs = cfg["reference_n"], []
    for m in (1, 4):
        cpu = step_run(n, m, cfg["repeats"])
        ref = step_run(n, m, 1, kernels="reference")
        runs.append({"gaussians": n, "members": m, "cpu_s": cpu["total"], "reference_s": ref["total"],
                     "reference_over_cpu": ref["total"] / cpu["total"], "cpu_evals_per_s": cpu["n_isects"] * 256 / cpu["forward"],
                     "reference_evals_per_s": ref["n_isects"] * 256 / ref["forward"]})
    table(f"reference (pure PyTorch) kernels as the floor, {n:,} Gaussians (seconds per step)",
          ["members", "CPU kernels", "reference", "reference / CPU", "CPU Mpix-evals/s", "reference Mpix-evals/s"],
          [[r["members"], r["cpu_s"], r["reference_s"], r["reference_over_cpu"], r["cpu_evals_per_s"] / 1e6, r["reference_evals_per_s"] / 1e6] for r in runs])
    return runs


def subprocess_step(n: int, members: int, steps: int, env: Dict[str, str], budget: Optional[int] = None) -> Dict[str, object]:
    """benchmarks/stepbench.py in a fresh process; with `budget` (bytes) the process is killed as soon
    as its resident memory passes it."""
    command = [sys.executable, str(REPO / "benchmarks" / "stepbench.py"), "--gaussians", str(n), "--devices", f"cpu:{members}", "--steps", str(steps)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, **env})
    peak = 0
    while proc.poll() is None:
        try:
            rss = int(next(line for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024
        except (OSError, StopIteration):
            rss = 0
        peak = max(peak, rss)
        if budget is not None and rss > budget:
            proc.kill()
            proc.wait()
            return {"gaussians": n, "ok": False, "reason": f"resident memory passed the budget ({rss / 2**30:.2f} GiB)"}
        time.sleep(0.02)
    out = proc.stdout.read().strip().splitlines()
    if proc.returncode != 0 or not out:
        return {"gaussians": n, "ok": False, "reason": f"exit status {proc.returncode}"}
    return {**json.loads(out[-1]), "ok": True}


def section_memory(cfg: Dict) -> List[Dict]:
    runs = []
    for n in cfg["memory_sizes"]:
        live = subprocess_step(n, 4, 2, MMAP_ENV)
        heap = subprocess_step(n, 4, 2, {})
        predicted = capacity.predicted_peak(n)
        runs.append({"gaussians": n, "members": 4, "live_bytes_per_gaussian": live["peak_over_baseline"] / n,
                     "default_malloc_bytes_per_gaussian": heap["peak_over_baseline"] / n, "planner_bytes_per_gaussian": predicted / n,
                     "planner_error": predicted / live["peak_over_baseline"] - 1, "arithmetic_minimum": capacity.arithmetic_minimum(3)})
    table("peak memory of a training step per Gaussian, cpu:4, SH 3 (bytes; over the resident memory before the Gaussians)",
          ["Gaussians", "live tensors (mmap threshold 64 KiB)", "default glibc malloc", "planner", "planner error", "arithmetic minimum"],
          [[r["gaussians"], r["live_bytes_per_gaussian"], r["default_malloc_bytes_per_gaussian"], r["planner_bytes_per_gaussian"],
            f"{r['planner_error']:+.1%}", r["arithmetic_minimum"]] for r in runs])
    return runs


def section_exchange(cfg: Dict, steps: List[Dict]) -> List[Dict]:
    n = cfg["sizes"][0]
    runs = []
    for m in [x for x in (1, 4, 8) if x in cfg["members"]]:
        for morton in (True, False):
            r = next((s for s in steps if s["gaussians"] == n and s["members"] == m and morton), None) or step_run(n, m, cfg["repeats"], morton=morton)
            runs.append(r)
    table(f"exchange bytes per training step, {n:,} Gaussians on lund_tiny (median over steps)",
          ["members", "order", "remote read", "reduce-scatter", "other", "Grendel all pairs", "Grendel remote"],
          [[r["members"], r["order"], r["exchange"]["remote_read"], r["exchange"]["reduce_scatter"], r["exchange"]["other"],
            r.get("grendel", {}).get("all_pairs_bytes", 0), r.get("grendel", {}).get("remote_bytes", 0)] for r in runs])
    return [{k: r[k] for k in ("gaussians", "members", "order", "exchange", "total")} | {"grendel": r.get("grendel")} for r in runs]


def section_simulation(cfg: Dict) -> List[Dict]:
    runs = exchange_bench.simulate(cfg["sim_n"], cfg["sim_members"])
    table(f"simulation: synthetic scene, 2 cameras 256x192, Morton order, one forward + backward (bytes)",
          ["members", "Gaussians", "rows per member", "remote read", "reduce-scatter", "other", "total", "Grendel all pairs", "Grendel remote"],
          [[r["members"], r["gaussians"], f"{r['rows_min']}-{r['rows_max']}", r["remote_read"], r["reduce_scatter"], r["other"], r["total"],
            r["grendel"]["all_pairs_bytes"], r["grendel"]["remote_bytes"]] for r in runs])
    return runs


def section_largest(cfg: Dict) -> Dict:
    budget = cfg["largest_budget"]
    if not budget:
        return {"skipped": "tiny mode: no largest-model search"}
    attempts, good, bad, n = [], 0, None, cfg["largest_start"]
    while bad is None or bad - good > max(good // 10, 1):  # doubling, then bisecting to 10%
        r = subprocess_step(n, 4, 1, {}, budget)
        attempts.append({k: r.get(k) for k in ("gaussians", "ok", "reason", "peak_rss", "baseline_rss")})
        console.log(f"largest model: {n:,} Gaussians {'completed' if r['ok'] else 'stopped: ' + r['reason']}")
        if r["ok"]:
            good = n
        else:
            bad = n
        n = 2 * n if bad is None else (good + bad) // 2
    # the planner counts live tensors over the process's own resident memory (imports, kernels)
    baseline = max((a["baseline_rss"] for a in attempts if a["ok"]), default=0)
    result = {"budget_bytes": budget, "largest_gaussians": good, "attempts": attempts, "process_baseline_rss": baseline,
              "planner_largest": int((budget - baseline - capacity.PER_PIXEL * 256 * 192) / sum(capacity.bytes_per_gaussian(3).values()))}
    table(f"largest model one training step completes with, cpu:4, SH 3, resident memory budget {budget / 2**30:.0f} GiB (default malloc; planner: live tensors)",
          ["largest completed", "first failure", "planner's largest", "attempts"], [[good, bad, result["planner_largest"], len(attempts)]])
    return result


def section_gpu() -> Dict:
    if not torch.cuda.is_available():
        reason = "no CUDA device on this machine (torch.cuda.is_available() is False)"
        console.print(f"[yellow]GPU section skipped: {reason}[/yellow]")
        return {"skipped": reason}
    import gsplat

    n, camera = 1_000_000, stepbench.camera_batch(0)[0]
    g = gaussians(n)
    out = {}
    for spec in ("cuda", "cuda:0*4"):
        model = stepbench.build_model(spec, "cuda")
        optimizers = stepbench.load(model, {k: v.clone() for k, v in g.items()})
        out[spec] = stepbench.timed_steps(model, optimizers, 5)["total"]
    plain = {k: v.cuda().requires_grad_() for k, v in g.items()}
    from nerfstudio.models.splatfacto import get_viewmat

    def direct() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        colors = torch.cat([plain["features_dc"][:, None], plain["features_rest"]], 1)
        img, _, _ = gsplat.rasterization(plain["means"], plain["quats"], torch.exp(plain["scales"]), torch.sigmoid(plain["opacities"]).squeeze(-1),
                                         colors, get_viewmat(camera.camera_to_worlds).cuda(), camera.get_intrinsics_matrices().cuda(),
                                         int(camera.width), int(camera.height), sh_degree=3)
        img.sum().backward()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    direct()
    times = sorted(direct() for _ in range(5))
    out["gsplat_direct_render_s"] = times[2]
    table("GPU: 1M Gaussians, lund_tiny camera (seconds)", ["cuda step", "cuda:0*4 step", "gsplat rasterization fwd+bwd"],
          [[out["cuda"], out["cuda:0*4"], out["gsplat_direct_render_s"]]])
    return out


def plots(results: Dict, out: Path) -> List[str]:
    files = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for n in sorted({r["gaussians"] for r in results["step"]}):
        rs = [r for r in results["step"] if r["gaussians"] == n]
        ax.plot([r["members"] for r in rs], [r["total"] for r in rs], "o-", label=f"{n:,} Gaussians")
    ax.set(xlabel="CPU members", ylabel="seconds per step (median)", xscale="log", yscale="log", title=results["meta"]["title"])
    ax.set_xticks(results["meta"]["members"], labels=[str(m) for m in results["meta"]["members"]])
    ax.legend()
    files.append(save(fig, out / "run_step_time.png"))
    fig, ax = plt.subplots(figsize=(7, 4))
    sim = [r for r in results["simulation"] if "case" not in r]
    for kind in ("remote_read", "reduce_scatter", "other"):
        ax.plot([r["members"] for r in sim], [max(r[kind], 1) for r in sim], "o-", label=kind)
    ax.plot([r["members"] for r in sim], [max(r["grendel"]["all_pairs_bytes"], 1) for r in sim], "k--", label="Grendel-style (all pairs)")
    ax.set(xlabel="virtual members", ylabel="bytes per forward + backward", xscale="log", yscale="log",
           title=f"synthetic scene, {sim[0]['gaussians']:,} Gaussians, {results['meta']['date']}")
    ax.legend()
    files.append(save(fig, out / "run_exchange_simulation.png"))
    fig, ax = plt.subplots(figsize=(7, 4))
    ex = [r for r in results["exchange"] if r["members"] > 1]
    labels = [f"{r['members']} {r['order']}" for r in ex]
    for i, kind in enumerate(("remote_read", "reduce_scatter", "other")):
        ax.bar([x + 0.2 * i for x in range(len(ex))], [r["exchange"][kind] for r in ex], width=0.2, label=kind)
    ax.set_xticks([x + 0.2 for x in range(len(ex))], labels=labels)
    ax.set(ylabel="bytes per step", title=f"exchange per training step, {ex[0]['gaussians']:,} Gaussians" if ex else "")
    ax.legend()
    files.append(save(fig, out / "run_exchange_order.png"))
    fig, ax = plt.subplots(figsize=(7, 4))
    mem = results["memory"]
    ax.plot([r["gaussians"] for r in mem], [r["live_bytes_per_gaussian"] for r in mem], "o-", label="measured, live tensors")
    ax.plot([r["gaussians"] for r in mem], [r["default_malloc_bytes_per_gaussian"] for r in mem], "s-", label="measured, default malloc")
    ax.plot([r["gaussians"] for r in mem], [r["planner_bytes_per_gaussian"] for r in mem], "x--", label="capacity planner")
    ax.axhline(capacity.arithmetic_minimum(3), color="k", lw=0.8, label="944 B arithmetic minimum")
    ax.set(xlabel="Gaussians", ylabel="peak bytes per Gaussian", xscale="log", ylim=(0, None), title=results["meta"]["title"])
    ax.legend()
    files.append(save(fig, out / "run_memory.png"))
    return files


def save(fig, path: Path) -> str:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path.name


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, < 15 minutes on 2 cores")
    parser.add_argument("--tiny", action="store_true", help="seconds: the test suite's size")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--largest-budget-gib", type=float, default=None,
                        help="resident memory the largest-model search may use (keep it below the machine's RAM)")
    args = parser.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    cfg = dict(MODES[mode])
    if args.largest_budget_gib is not None:
        cfg["largest_budget"] = int(args.largest_budget_gib * 2**30)
    start = time.perf_counter()
    machine = f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    title = f"{mode} mode, {machine}, {date.today()}"
    console.rule(f"ms-splatfacto benchmark: {title}")
    if mode != "full":
        console.print(f"[yellow]{mode} mode: {', '.join(f'{n:,}' for n in cfg['sizes'])} Gaussians instead of 100,000 and 1,000,000.[/yellow]")
    results: Dict[str, object] = {"meta": {"mode": mode, "date": str(date.today()), "machine": machine, "title": title, "members": cfg["members"],
                                           "sizes": cfg["sizes"], "data": str(stepbench.DATA), "image": "256x192", "sh_degree": 3,
                                           "gaussian_pixel_evals": "tile intersections x 16 x 16 pixels, per second of the forward phase"}}
    results["step"] = section_steps(cfg)
    results["reference"] = section_reference(cfg)
    results["memory"] = section_memory(cfg)
    results["exchange"] = section_exchange(cfg, results["step"])
    results["simulation"] = section_simulation(cfg)
    results["largest"] = section_largest(cfg)
    results["gpu"] = section_gpu()
    results["ranks"] = ranks_bench.section_ranks(cfg["ranks_n"], cfg["ranks"], steps=3 if mode != "tiny" else 1, runs=cfg["ranks_runs"])
    ranks_bench.print_table(results["ranks"], console)
    args.out.mkdir(parents=True, exist_ok=True)
    ranks_bench.plot(results["ranks"], args.out / "run_ranks_step_time.png")
    results["meta"]["plots"] = plots(results, args.out) + ["run_ranks_step_time.png"]
    results["meta"]["seconds"] = time.perf_counter() - start
    (args.out / "run.json").write_text(json.dumps(results, indent=1, default=float))
    console.print(f"wrote {args.out / 'run.json'} and {', '.join(results['meta']['plots'])} in {results['meta']['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
