"""Step time with and without a competing CPU-bound process, interleaved (quiet, loaded, quiet, loaded...).

One worker process per configuration (thread count and OpenMP wait policy, which the OpenMP runtime
reads once at start-up, so it is set in the worker's environment before torch loads). The worker
builds the stepbench scene once (lund_tiny cameras, Morton order), takes warm-up steps, then alternates
blocks of steps with no competitor and with a `python -c "while True: pass"` child running; each
block's figure is the median of its steps. The slowdown is loaded / quiet per round (median, min, max).

    .venv/bin/python benchmarks/under_load.py --gaussians 20000 --rounds 4

Writes benchmarks/results/under_load.json (or --out). On a machine other jobs already load, "quiet"
means "without our competitor": the load average is recorded next to each configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional
from bench_stats import spread

REPO = Path(__file__).resolve().parents[1]
HOG = "while True: pass"
CONFIGS = {
    "1 thread": {"threads": 1, "env": {}},
    "all cores, default wait": {"threads": 0, "env": {}},
    "all cores, passive wait": {"threads": 0, "env": {"OMP_WAIT_POLICY": "PASSIVE"}},
}



def worker(gaussians: int, devices: str, rounds: int, steps: int, warmup: int, threads: int) -> Dict[str, object]:
    """In the worker process: alternate quiet and loaded blocks of steps."""
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch

    import stepbench
    from ms_splatfacto.backend.morton import morton_order
    from ms_splatfacto.backend.threads import configure_threads

    threads = configure_threads(threads or None)
    g = stepbench.synthetic_gaussians(gaussians)
    order = morton_order(g["means"])
    model = stepbench.build_model(devices)
    optimizers = stepbench.load(model, {k: v[order] for k, v in g.items()})
    n_cameras = len(stepbench.scene()[0])
    counter = [0]

    def block() -> float:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            stepbench.train_step(model, optimizers, counter[0] % n_cameras)
            times.append(time.perf_counter() - t0)
            counter[0] += 1
        return statistics.median(times)

    for _ in range(warmup):
        stepbench.train_step(model, optimizers, counter[0] % n_cameras)
        counter[0] += 1
    quiet, loaded = [], []
    for _ in range(rounds):
        quiet.append(block())
        hog = subprocess.Popen([sys.executable, "-c", HOG])
        try:
            time.sleep(0.2)  # the competitor running before the block starts
            loaded.append(block())
        finally:
            hog.kill()
            hog.wait()
    return {"threads": threads, "torch_threads": torch.get_num_threads(), "quiet_s": quiet, "loaded_s": loaded,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"), "load_average": list(os.getloadavg())}


def run_config(name: str, args) -> Dict[str, object]:
    config = CONFIGS[name]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # the worker loads torch first: default waiting
    env.update(config["env"])
    if config["threads"]:
        env["OMP_NUM_THREADS"] = str(config["threads"])
    else:
        env.pop("OMP_NUM_THREADS", None)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--gaussians", str(args.gaussians), "--devices", args.devices,
               "--rounds", str(args.rounds), "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(config["threads"])]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"worker for {name!r} failed: {proc.stderr.strip().splitlines()[-1:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["slowdown"] = spread([b / a for a, b in zip(result["quiet_s"], result["loaded_s"])])
    result["quiet"], result["loaded"] = spread(result["quiet_s"]), spread(result["loaded_s"])
    return result


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gaussians", type=int, default=20_000)
    parser.add_argument("--devices", default="cpu")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="steps per block (its median is the block's figure)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "under_load.json")
    args = parser.parse_args(argv)
    if args.gaussians <= 0 or args.rounds < 1 or args.steps < 1:
        parser.error("gaussians, rounds and steps must be positive")
    if args.worker:
        print(json.dumps(worker(args.gaussians, args.devices, args.rounds, args.steps, args.warmup, args.threads)))
        return {}
    results = {}
    for name in args.configs:
        results[name] = run_config(name, args)
        r = results[name]
        print(f"{name:>26}: {r['threads']} thread(s)  quiet {r['quiet']['median'] * 1e3:7.1f} ms  loaded {r['loaded']['median'] * 1e3:7.1f} ms"
              f"  slowdown {r['slowdown']['median']:.2f} ({r['slowdown']['min']:.2f}-{r['slowdown']['max']:.2f})  load {r['load_average'][0]:.1f}",
              flush=True)
    out = {"command": " ".join(["benchmarks/under_load.py", *(argv if argv is not None else sys.argv[1:])]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(), "gaussians": args.gaussians,
           "devices": args.devices, "rounds": args.rounds, "steps": args.steps, "configs": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
