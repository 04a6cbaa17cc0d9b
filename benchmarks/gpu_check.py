"""The first run on a GPU machine, in one command: build gsplat's kernels, check the real training path
on the GPU against the CPU kernels, time it against gsplat called directly, and write one JSON and a
short text report. Needs torch alone (plus gsplat, installed or carried; see `gpu_env`), so it runs
where nerfstudio cannot be installed. `scripts/gpu_check.sh` is the entry point.

    python benchmarks/gpu_check.py [--quick] [--out DIR] [--gsplat-src PATH]   # a GPU machine
    python benchmarks/gpu_check.py --device cpu --tiny                        # dry run, no GPU

Without a GPU (and without --device cpu) it prints one line and exits 0. The dry run maps `cuda:0` to
`cpu`, `cuda:0*4` to `cpu:4` and gsplat to the backend's single-device pipeline, so everything short
of the GPU runs end to end. Timings interleave the configurations (A, B, A, B) after separate warm-up
and report min/median/max; peak memory is measured one configuration at a time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import gpu_env  # noqa: E402  (stdlib only: importable before torch)

DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu_check"
SIZES = {
    "full": dict(parity=(4000, 128, 96), gaussians=1_000_000, width=1920, height=1080, repeats=10, warmup=2),
    "quick": dict(parity=(2000, 96, 72), gaussians=200_000, width=960, height=540, repeats=4, warmup=1),
    "tiny": dict(parity=(300, 48, 40), gaussians=2000, width=64, height=48, repeats=2, warmup=1),
}
"""Parity scenes are small (the CPU reference renders them too); timings use the large one."""
PYTEST_AFTER_S = 330
"""pytest repeats the checks; it runs last, and only if the run is young enough to end within 8 minutes."""


def interleaved(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int,
                sync: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.perf_counter) -> Dict[str, Dict]:
    """Seconds per call of each fn: `warmup` untimed calls of each first, then `repeats` rounds timing every
    fn once in turn (A, B, A, B), so drift in clocks or temperature falls on all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = clock()
            fn()
            sync()
            samples[name].append(clock() - start)
    return {name: summarize(s) for name, s in samples.items()}


def summarize(samples: List[float]) -> Dict[str, object]:
    return {"min": min(samples), "median": statistics.median(samples), "max": max(samples), "samples": samples}


def specs_for(device: str) -> Dict[str, Optional[str]]:
    """The member specs checked and timed: one member, four virtual members on it, two GPUs where they exist."""
    import torch

    if device == "cpu":
        return {"one": "cpu", "four": "cpu:4", "two": None, "all": None}
    count = torch.cuda.device_count()
    return {"one": "cuda:0", "four": "cuda:0*4", "two": "cuda:0,1" if count >= 2 else None,
            "all": "cuda" if count >= 2 else None}


def direct_rasterize(device: str):
    """(rasterize, options, label) of the single-device baseline: gsplat itself on a GPU; on the CPU the
    backend's plain pipeline (gsplat's contract, CPU kernels) stands in."""
    if device == "cpu":
        from ms_splatfacto.backend.rendering import rasterization

        return rasterization, {"kernels": "cpu"}, "plain pipeline (cpu kernels, stands in for gsplat)"
    from gsplat.rendering import rasterization

    return rasterization, {"packed": False}, "gsplat.rasterization"


def run_check(name: str, fn: Callable[[], Dict]) -> Dict[str, object]:
    start = time.perf_counter()
    try:
        result = fn()
    except Exception:  # a crash is a failed check, reported with its traceback
        result = {"passed": False, "error": traceback.format_exc()[-3000:]}
    result = {"name": name, **result, "seconds": time.perf_counter() - start}
    error_lines = (result.get("error") or "").strip().splitlines()
    detail = "; ".join(result.get("failures") or []) or (error_lines[-1] if error_lines else "")
    print(f"  {'PASS' if result['passed'] else 'FAIL'} {name} ({result['seconds']:.1f} s) {detail}".rstrip(), flush=True)
    return result


def checks(device: str, sizes: Dict, reference_kernels: str) -> List[Dict]:
    """The GPU-gated checks of tests/test_gpu_path.py, run directly (pytest may be missing)."""
    import torch

    from benchmarks import gpu_path as gp

    specs = specs_for(device)
    n, w, h = sizes["parity"]
    scene, batch = gp.synthetic_scene(n, w, h), gp.synthetic_scene(n, w, h, cameras=2, seed=1)
    rasterize, options, label = direct_rasterize(device)
    out = []
    for key in ("one", "four", "two"):
        if specs[key]:
            out.append(run_check(f"step {specs[key]} vs cpu", lambda s=specs[key]: gp.step_parity(s, scene, reference_kernels=reference_kernels)))
    out.append(run_check(f"batch of 2 cameras {specs['four']} vs cpu",
                         lambda: gp.step_parity(specs["four"], batch, reference_kernels=reference_kernels)))
    out.append(run_check(f"{specs['one']} vs {label}", lambda: {
        "reference": label, **gp.compare_outputs(gp.step_outputs(specs["one"], scene),
                                                 gp.direct_outputs(scene, torch.device(specs["one"]), rasterize, **options))}))
    for key in ("one", "four"):
        out.append(run_check(f"checkpoint {specs[key]} -> cpu:4", lambda s=specs[key]: gp.checkpoint_round_trip(s, "cpu:4", scene)))
    out.append(run_check(f"peak memory readable during training on {specs['four']}", lambda: gp.memory_during_training(specs["four"], scene)))
    out += refinement_checks(device, specs, sizes["parity"], reference_kernels)
    if device == "cuda":
        out.append(run_check("managed storage step on cuda vs cpu", lambda: gp.managed_step("cuda")))
    return out


def refinement_checks(device: str, specs: Dict[str, Optional[str]], size, reference_kernels: str) -> List[Dict]:
    """A refinement (MsStrategy: duplicate, split, prune, re-stripe) on each member spec against one CPU
    member with `reference_kernels` (the same decisions), then four members against one on the same
    device (bit for bit on CPUs; within float32 tolerance on GPUs, whose atomics reorder sums)."""
    from benchmarks import gpu_refinement as gr

    scene = gr.refinement_scene(*size)  # [N Gaussians, width, height]: the parity scene's
    cpu = device == "cpu"  # the dry run: both sides draw the split noise from the CPU's generator
    references: Dict[str, Dict] = {}

    def reference(key: str) -> Dict:
        """Made on first use (inside a check, so a crash fails that check): one CPU member with
        `reference_kernels`, or one member of `device` with the thresholds of the former."""
        if key not in references:
            references[key] = (gr.refinement_reference(scene, "cpu", reference_kernels) if key == "cpu"
                               else gr.run_reference(specs["one"], scene, reference("cpu")["cuts"]))
        return references[key]

    out = [run_check(f"refinement {specs[key]} vs cpu ({reference_kernels} kernels)",
                     lambda s=specs[key]: gr.refinement_parity(s, scene, reference=reference("cpu"), same_rng=cpu))
           for key in ("one", "four", "two") if specs[key]]
    out.append(run_check(f"refinement {specs['four']} vs {specs['one']} (member counts)", lambda: gr.refinement_parity(
        specs["four"], scene, reference=reference("one"), same_rng=True, exact=cpu)))
    return out


def run_pytest(timeout: float) -> Dict[str, object]:
    """tests/test_gpu_path.py and tests/test_backend.py (their GPU tests run here), where pytest exists."""
    status = gpu_env.module_status()
    if status["pytest"] == "missing":
        return {"status": "skipped", "reason": "pytest missing; the same checks ran directly (checks)"}
    if status["numpy"] == "missing":
        return {"status": "skipped", "reason": "numpy missing: the tests import the whole gsplat package"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu_path.py", "tests/test_backend.py"]
    try:
        done = subprocess.run(command, cwd=str(REPO), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {"status": "passed" if done.returncode == 0 else "failed", "rc": done.returncode,
            "summary": lines[-1] if lines else "", "tail": (done.stdout + done.stderr)[-4000:]}


def timing_and_memory(device: str, sizes: Dict) -> Dict[str, object]:
    """Peak memory per Gaussian of one training step (render, loss, backward, Adam) for each configuration
    alone, then the step's time, interleaved over the configurations."""
    import torch

    from benchmarks import gpu_path as gp
    from ms_splatfacto.backend.aggregate import members

    specs = specs_for(device)
    scene = gp.synthetic_scene(sizes["gaussians"], sizes["width"], sizes["height"])
    rasterize, options, label = direct_rasterize(device)
    used = sorted({str(d) for s in specs.values() if s for d in gp.member_devices(members(s))})

    def sync():
        if device != "cpu":
            for d in used:
                torch.cuda.synchronize(d)

    def make(name: str):
        if name == "direct":
            params = gp.plain_params(scene.raw, torch.device(specs["one"]))
            optimizer = gp.adam(params)
            return params, lambda: gp.direct_train_step(params, optimizer, scene, rasterize, **options)
        params = gp.gaussian_params(scene.raw, name)
        optimizer = gp.adam(params)
        return params, lambda: gp.train_step(params, optimizer, scene)

    configs = {f"ours {specs['one']}": specs["one"], "direct": "direct", f"ours {specs['four']}": specs["four"]}
    if specs["all"]:
        configs[f"ours {specs['all']}"] = specs["all"]
    memory = {}
    for label_, name in configs.items():
        gc.collect()
        m = members(specs["one"] if name == "direct" else name)
        if device != "cpu":
            torch.cuda.empty_cache()
        gp.reset_peak_memory(m)
        baseline = sum(torch.cuda.memory_allocated(d) for d in gp.member_devices(m)) if device != "cpu" else gp.peak_memory(m)["cpu"]
        params, step = make(name)
        for _ in range(2):  # the second step holds Adam's moments as well
            step()
        sync()
        peak = sum(gp.peak_memory(m).values())
        memory[label_] = {"peak_bytes": peak, "baseline_bytes": baseline, "bytes_per_gaussian": peak / scene.gaussians,
                          "step_bytes_per_gaussian": (peak - baseline) / scene.gaussians}
        del params, step
    gc.collect()
    steps = {label_: make(name)[1] for label_, name in configs.items()}
    times = interleaved(steps, sizes["repeats"], sizes["warmup"], sync)
    ratios = {f"ours {specs['one']} / direct": times[f"ours {specs['one']}"]["median"] / times["direct"]["median"],
              f"ours {specs['four']} / ours {specs['one']}": times[f"ours {specs['four']}"]["median"] / times[f"ours {specs['one']}"]["median"]}
    return {"gaussians": scene.gaussians, "width": scene.width, "height": scene.height, "sh_degree": scene.sh_degree,
            "direct": label, "step": "render + L1/SSIM loss + backward + Adam", "repeats": sizes["repeats"],
            "warmup": sizes["warmup"], "seconds": times, "median_ratios": ratios, "memory": memory,
            "memory_note": "peak: torch.cuda.max_memory_allocated over the member GPUs (process VmHWM on the CPU) "
                           "after 2 steps of one configuration alone; step_: minus what was allocated before"}


def refinement_figures(check: Dict) -> str:
    d, rows = check["decisions"], check["rows_per_member"]
    worst = max(check["rel_l2"].values()) if check.get("rel_l2") else 0.0
    return (f"{d['duplicated']} duplicated, {d['split']} split, {d['pruned']} pruned, {check['gaussians']} rows "
            f"({min(rows)}-{max(rows)} per member), worst rel L2 {worst:.2g}, grad cut margin "
            f"{check['thresholds']['grow_grad2d']['margin']:.3f}x")


def text_report(result: Dict) -> str:
    """A short human summary of the JSON."""
    env = result["environment"]
    gpu = ", ".join(f"{g['name']} (sm {g['capability']}, {g['memory_gib']} GiB)" for g in env.get("gpus", [])) or "no GPU (dry run)"
    lines = [f"gpu_check {result['meta']['date']} {result['meta']['mode']} on {gpu}",
             f"torch {env['torch']} (CUDA {env['torch_cuda']}), nvcc {env['nvcc'].get('version', env['nvcc']['status'])}, "
             f"ninja {env['ninja']['status']}, gsplat {env['gsplat'].get('version', '?')} ({env['gsplat'].get('how', '?')})",
             "modules: " + ", ".join(f"{k} {v}" for k, v in env["modules"].items())]
    for name, build in result["build"].items():
        state = f"{build['seconds']:.1f} s" + (" (cached)" if build.get("cached") else "") if build.get("ok") else f"FAILED: {str(build.get('error'))[-300:]}"
        where = env.get("build_env") if name == "gsplat" else None
        lines.append(f"build {name}: {state}" + (f" (arch {where['TORCH_CUDA_ARCH_LIST']}, MAX_JOBS {where['MAX_JOBS']})" if where else ""))
    done = result["checks"]
    lines.append(f"checks: {sum(c['passed'] for c in done)} passed, {sum(not c['passed'] for c in done)} failed")
    for c in done:
        figures = [f"image max {c['image_max_abs']:.2g}" if "image_max_abs" in c else "",
                   f"worst grad rel L2 {max(c['grad_rel_l2'].values()):.2g}" if "grad_rel_l2" in c else "",
                   f"peak {c['peak_bytes'] / 2**20:.1f} MiB" if "peak_bytes" in c else "",
                   refinement_figures(c) if "decisions" in c else "",
                   "; ".join(c.get("failures") or []), (c.get("error") or "").strip()[-200:]]
        lines.append(f"  {'PASS' if c['passed'] else 'FAIL'} {c['name']}: {', '.join(f for f in figures if f)}")
    py = result.get("pytest", {})
    lines.append(f"pytest: {py.get('status', 'not run')} {py.get('summary') or py.get('reason') or ''}".rstrip())
    t = result.get("timing")
    if t and "seconds" in t:
        lines.append(f"step time ({t['gaussians']} Gaussians, {t['width']}x{t['height']}, {t['step']}; "
                     f"{t['repeats']} interleaved repeats; s min/median/max):")
        for name, s in t["seconds"].items():
            shown = t["direct"] if name == "direct" else name
            lines.append(f"  {shown:<48} {s['min']:.4f} / {s['median']:.4f} / {s['max']:.4f}")
        lines.append("  median ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in t["median_ratios"].items()))
        lines.append("peak memory per Gaussian (bytes; whole / step), direct = the baseline above: " + ", ".join(
            f"{k} {v['bytes_per_gaussian']:.0f} / {v['step_bytes_per_gaussian']:.0f}" for k, v in t["memory"].items()))
    elif t:
        lines.append(f"timing: FAILED {t.get('error', '').strip()[-300:]}")
    if result.get("fatal"):
        lines.append(f"stopped: {result['fatal']}")
    stage = result["meta"].get("stage", "done")
    verdict = ("OK" if result["ok"] else "PROBLEMS") if stage == "done" else f"INCOMPLETE (last stage: {stage})"
    lines.append(f"verdict: {verdict} in {result['meta']['seconds']:.0f} s")
    return "\n".join(lines) + "\n"


def write_report(result: Dict, out: Path) -> Dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "gpu_check.json", "text": out / "gpu_check.txt"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths["text"].write_text(text_report(result))
    return paths


def environment(args, torch) -> Dict[str, object]:
    return {"python": sys.version.split()[0], "platform": platform.platform(), "host": socket.gethostname(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "gpus": gpu_env.gpus() if args.device == "cuda" else [], "modules": gpu_env.module_status()}


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller timing scene, fewer repeats, no pytest (under 3 minutes)")
    parser.add_argument("--tiny", action="store_true", help="test-suite sizes (the CPU dry run)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: dry run on CPU members")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--gsplat-src", default=os.environ.get("GSPLAT_SRC"), help="a gsplat package folder to use")
    parser.add_argument("--ninja", default=None, help="a ninja binary, where none is on PATH")
    parser.add_argument("--reference-kernels", choices=("cpu", "reference"), default=None,
                        help="CPU kernels the GPU is checked against (default: cpu; reference in the dry run)")
    parser.add_argument("--no-pytest", action="store_true")
    return parser.parse_args(argv)


def prepare(args, result: Dict) -> Optional[str]:
    """Tools, gsplat and both kernel builds (gsplat's and the CPU reference's, side by side); returns
    why the run cannot go on, or None."""
    env, fatal = result["environment"], None
    if args.device == "cuda":
        env["nvcc"], env["ninja"] = gpu_env.find_nvcc(), gpu_env.find_ninja(args.ninja)  # on PATH before any build
        env["rich_shim"] = gpu_env.add_rich_shim()
        env["gsplat"] = gpu_env.locate_gsplat(args.gsplat_src)
        if "error" not in env["gsplat"]:
            env["gsplat"].update(gpu_env.import_gsplat())
        env["build_env"] = gpu_env.set_build_env()
    else:  # gsplat's Python alone: the refinement runs its strategy; the CPU pipeline stands in for its kernels
        env["nvcc"], env["ninja"] = {"status": "not needed"}, {"status": "not needed"}
        env["rich_shim"] = gpu_env.add_rich_shim()
        env["gsplat"] = gpu_env.locate_gsplat(args.gsplat_src)
        if "error" not in env["gsplat"]:
            env["gsplat"].update(gpu_env.import_gsplat(), kernels="not loaded (dry run)")
    cpu_build, cpu_started = gpu_env.start_cpu_kernel_build(), time.perf_counter()
    if args.device == "cuda":
        if "error" in env["gsplat"] or not env["gsplat"].get("ok"):
            fatal = f"gsplat unusable: {env['gsplat'].get('error')}"
        else:
            print(f"gpu_check: loading gsplat's CUDA kernels for {env['build_env']['TORCH_CUDA_ARCH_LIST']} with "
                  f"MAX_JOBS={env['build_env']['MAX_JOBS']} (the first build takes minutes)...", flush=True)
            result["build"]["gsplat"] = gpu_env.build_gsplat()
            if not result["build"]["gsplat"]["ok"]:
                fatal = "gsplat's kernels did not build" + ("" if env["ninja"]["status"] != "missing" else " (ninja is missing)")
    result["build"]["cpu kernels"] = gpu_env.finish_cpu_kernel_build(cpu_build, cpu_started)
    return fatal


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        import torch
    except ImportError as err:
        print(f"gpu_check: cannot import torch ({err}); run it with a Python that has torch (PYTHON=...)")
        return 1
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no GPU visible to torch {torch.__version__} (CUDA build {torch.version.cuda}); nothing to check here.")
        return 0
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    sizes = SIZES[mode]
    result: Dict[str, object] = {"meta": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "mode": mode,
                                          "device": args.device, "argv": sys.argv[1:] if argv is None else argv},
                                 "environment": environment(args, torch), "build": {}, "checks": [], "ok": False}

    def save(stage: str) -> Dict[str, Path]:
        """Written after every stage, so a run cut short still leaves what it found."""
        result["meta"].update(stage=stage, seconds=time.perf_counter() - started)
        return write_report(result, args.out)

    fatal = prepare(args, result)
    save("built")
    if fatal is not None:
        result["fatal"] = fatal
    else:
        reference = args.reference_kernels or ("cpu" if args.device == "cuda" and result["build"]["cpu kernels"]["ok"] else "reference")
        print(f"gpu_check: checks against the CPU ({reference} kernels)", flush=True)
        result["checks"] = checks(args.device, sizes, reference)
        save("checked")
        print(f"gpu_check: timing at {sizes['gaussians']} Gaussians...", flush=True)
        try:
            result["timing"] = timing_and_memory(args.device, sizes)
        except Exception:
            result["timing"] = {"error": traceback.format_exc()[-3000:]}
        save("timed")
        elapsed = time.perf_counter() - started
        if args.device != "cuda" or mode != "full" or args.no_pytest:
            result["pytest"] = {"status": "skipped", "reason": "dry run" if args.device != "cuda" else f"{mode} mode" if mode != "full" else "--no-pytest"}
        elif elapsed > PYTEST_AFTER_S:
            result["pytest"] = {"status": "skipped", "reason": f"{elapsed:.0f} s gone already (the checks above are the same)"}
        else:
            print("gpu_check: pytest tests/test_gpu_path.py tests/test_backend.py ...", flush=True)
            result["pytest"] = run_pytest(timeout=PYTEST_AFTER_S + 120 - elapsed)
    result["ok"] = (fatal is None and bool(result["checks"]) and all(c["passed"] for c in result["checks"])
                    and result.get("pytest", {}).get("status") != "failed" and "error" not in result.get("timing", {}))
    paths = save("done")
    print(paths["text"].read_text(), end="")
    print(f"gpu_check: wrote {paths['json']} and {paths['text']}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
