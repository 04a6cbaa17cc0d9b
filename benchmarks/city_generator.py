"""How long the procedural city takes to write, and how big it is:

    .venv/bin/python benchmarks/city_generator.py --cameras 2000 --width 256 --height 192

runs `python -m ms_splatfacto.scenes.city` in a subprocess (its default 2 workers) into a temporary
folder, and writes wall time, CPU time of the generator's processes, load average at the start and
bytes written to benchmarks/results/city_generator.json. CPU time is the figure that does not depend on
what else the machine runs; wall time does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cameras", type=int, default=2000)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "city_generator.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "city"
        command = [sys.executable, "-m", "ms_splatfacto.scenes.city", "--cameras", str(args.cameras),
                   "--width", str(args.width), "--height", str(args.height), "--output", str(out)]
        load = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    result = {
        "command": " ".join(["python", *command[1:-2]]),
        "cameras": args.cameras, "width": args.width, "height": args.height,
        "wall_s": round(wall, 2),
        "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2),
        "load_average_at_start": round(load, 2),
        "cores": len(os.sched_getaffinity(0)),
        "bytes_written": size,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
