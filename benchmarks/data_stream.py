"""The training data path with `--pipeline.datamanager.images cache` against `stream`: time to step 0,
steady-state data time per step and the data path's peak memory, at two dataset sizes.

Each measurement is a fresh process (`--probe`) that builds the datamanager on a generated nerfstudio
dataset: the procedural city (`ms_splatfacto.scenes.city`, 256x192 JPEG views, rendered once at the
largest count, smaller counts evenly spread subsets of it) or, with `--source lund`, copies of
lund_tiny's 256x192 photos (one file per camera). It draws step 0, then 50 more steps with
a simulated 20 ms training step (a sleep, as GPU compute would leave the CPU to the decoders) between
them. Peak memory is the process's peak RSS (VmHWM; getrusage's ru_maxrss is also recorded, but it counts
the parent's pages at fork) less its RSS once everything is imported. Runs are
interleaved (cache, stream, cache, stream, ...) and reported as min/median/max. Prints a table and writes
benchmarks/results/data_stream.json.

    .venv/bin/python benchmarks/data_stream.py [--cameras 500 2000] [--repeats 3] [--steps 50]
    .venv/bin/python benchmarks/data_stream.py --probe DATASET --images stream   # one measurement, JSON
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
LUND_TINY = REPO.parent / "shared" / "data" / "lund_tiny"
RESULTS = REPO / "benchmarks" / "results" / "data_stream.json"
PROBE_MARK = "DATA_STREAM_PROBE "


def write_photo_dataset(
    out: Path, cameras: int, sizes: Sequence[Tuple[int, int]] = ((256, 192),), k1: Sequence[float] = (0.0,),
    masks: bool = False, source: Path = LUND_TINY,
) -> Path:
    """A nerfstudio dataset of `cameras` photos (copies of `source`'s images, resized where camera i's size
    `sizes[i % len(sizes)]` differs) on a circle looking outwards, camera i with radial distortion
    `k1[i % len(k1)]` and, with `masks`, a mask hiding its left eighth. The pixels are real photos; the
    poses are not theirs (this exercises the data path, not reconstruction)."""
    from PIL import Image

    photos = sorted((source / "images").glob("*.jpg"))
    if not photos:
        raise SystemExit(f"No photos in {source / 'images'} (expected lund_tiny in ../shared/data beside the checkout).")
    (out / "images").mkdir(parents=True, exist_ok=True)
    if masks:
        (out / "masks").mkdir(exist_ok=True)
    frames = []
    for i in range(cameras):
        w, h = sizes[i % len(sizes)]
        path = out / "images" / f"frame_{i:05d}.jpg"
        photo = photos[i % len(photos)]
        with Image.open(photo) as image:
            same = image.size == (w, h)
            if not same:
                image.convert("RGB").resize((w, h), Image.Resampling.BILINEAR).save(path, quality=90)
        if same:
            shutil.copyfile(photo, path)
        angle = 2 * math.pi * i / cameras
        c, s = math.cos(angle), math.sin(angle)
        frame = {
            "file_path": f"images/{path.name}", "w": w, "h": h, "fl_x": 0.8 * w, "fl_y": 0.8 * w, "cx": w / 2, "cy": h / 2,
            "k1": k1[i % len(k1)], "transform_matrix": [[c, 0, s, 3 * s], [s, 0, -c, -3 * c], [0, 1, 0, 0], [0, 0, 0, 1]],
        }
        if masks:
            mask = Image.new("L", (w, h), 255)
            mask.paste(0, (0, 0, w // 8, h))
            mask.save(out / "masks" / f"frame_{i:05d}.png")
            frame["mask_path"] = f"masks/frame_{i:05d}.png"
        frames.append(frame)
    (out / "transforms.json").write_text(json.dumps({"camera_model": "OPENCV", "frames": frames}))
    return out


def city_dataset(out: Path, cameras: int, width: int = 256, height: int = 192) -> Path:
    """The procedural city (`ms_splatfacto.scenes.city`, JPEG views) with `cameras` views, rendered."""
    command = [sys.executable, "-m", "ms_splatfacto.scenes.city", "--cameras", str(cameras), "--width", str(width),
               "--height", str(height), "--output", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return out


def subset_dataset(source: Path, out: Path, cameras: int) -> Path:
    """A nerfstudio dataset of `cameras` frames spread evenly over `source`'s, reading `source`'s files."""
    meta = json.loads((source / "transforms.json").read_text())
    frames = meta["frames"]
    meta["frames"] = [dict(frames[i * len(frames) // cameras], file_path=str(source / frames[i * len(frames) // cameras]["file_path"]))
                      for i in range(cameras)]
    meta.pop("ply_file_path", None)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transforms.json").write_text(json.dumps(meta))
    return out


def _status_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc/self/status (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def probe(data: Path, images: str, steps: int, step_s: float, cache_bytes: int, cameras_per_step: int) -> Dict:
    """Build the datamanager in this process and time/measure its data path (see the module docstring)."""
    import resource

    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    from ms_splatfacto.datamanager import MsDatamanagerConfig

    rss_before = _status_bytes("VmRSS")
    start = time.perf_counter()
    config = MsDatamanagerConfig(
        dataparser=NerfstudioDataParserConfig(data=data), images=images, cache_bytes=cache_bytes,
        cameras_per_step=cameras_per_step, cache_images_type="uint8",  # splatfacto's image type
    )
    datamanager = config.setup(device="cpu")
    datamanager.next_train(0)
    to_step0 = time.perf_counter() - start
    stream = datamanager._stream
    decodes_at_step0 = stream.decodes if stream is not None else len(datamanager.train_dataset)
    times = []
    for step in range(1, steps + 1):
        time.sleep(step_s)
        t = time.perf_counter()
        datamanager.next_train(step)
        times.append(time.perf_counter() - t)
    # getrusage's ru_maxrss also counts the parent's resident pages at fork (exec records the forked copy's
    # peak), so a large parent (pytest) inflates it; VmHWM is this process's own peak since exec.
    peak = _status_bytes("VmHWM")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "images": datamanager.images_mode, "train_images": len(datamanager.train_dataset), "to_step0_s": to_step0,
        "step_data_s_median": statistics.median(times), "decodes_at_step0": decodes_at_step0,
        "rss_before_bytes": rss_before, "peak_rss_bytes": peak, "data_peak_bytes": peak - rss_before, "ru_maxrss_bytes": maxrss,
        "cache_bytes": cache_bytes, "peak_held_bytes": stream.peak_held_bytes if stream is not None else None,
        "peak_decoding": stream.peak_decoding if stream is not None else None,
    }


def run_probe(data: Path, images: str, steps: int = 50, step_s: float = 0.02, cache_bytes: int = 2**30,
              cameras_per_step: int = 1, timeout: float = 600) -> Dict:
    """`probe` in a fresh process (so peak RSS is this measurement's own)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--probe", str(data), "--images", images, "--steps", str(steps),
               "--step-s", str(step_s), "--cache-bytes", str(cache_bytes), "--cameras-per-step", str(cameras_per_step)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    lines = [line for line in result.stdout.splitlines() if line.startswith(PROBE_MARK)]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"probe failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len(PROBE_MARK):])


def spread(values: Iterable[float]) -> Dict[str, float]:
    values = sorted(values)
    return {"min": values[0], "median": statistics.median(values), "max": values[-1]}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cameras", type=int, nargs="+", default=[500, 2000], help="dataset sizes (cameras, 90%% train)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per (size, mode), interleaved")
    parser.add_argument("--steps", type=int, default=50, help="steps after step 0")
    parser.add_argument("--step-s", type=float, default=0.02, help="simulated training step between data steps (sleep)")
    parser.add_argument("--cache-bytes", type=int, default=2**30, help="--pipeline.datamanager.cache-bytes for stream")
    parser.add_argument("--cameras-per-step", type=int, default=1)
    parser.add_argument("--source", choices=["city", "lund"], default="city",
                        help="photos: `ms_splatfacto.scenes.city` renders (about a minute at 2,000) or copies of lund_tiny's")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--probe", type=Path, help="measure one run on this dataset and print JSON")
    parser.add_argument("--images", choices=["cache", "stream"], default="stream", help="with --probe")
    args = parser.parse_args(argv)
    if args.probe is not None:
        result = probe(args.probe, args.images, args.steps, args.step_s, args.cache_bytes, args.cameras_per_step)
        print(PROBE_MARK + json.dumps(result), flush=True)
        return

    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    rows, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="data_stream_") as tmp:
        if args.source == "city":  # rendered once at the largest count; smaller counts are evenly spread subsets
            city = city_dataset(Path(tmp) / "city", max(args.cameras))
            console.log(f"Rendered the city: {max(args.cameras)} views ({time.perf_counter() - started:.0f} s)")
        for cameras in args.cameras:
            data = Path(tmp) / f"cameras_{cameras}"
            if args.source == "city":
                subset_dataset(city, data, cameras)
            else:
                write_photo_dataset(data, cameras)
            runs: Dict[str, list] = {"cache": [], "stream": []}
            for repeat in range(args.repeats):
                for mode in ("cache", "stream"):  # interleaved: A, B, A, B, ...
                    runs[mode].append(run_probe(data, mode, args.steps, args.step_s, args.cache_bytes, args.cameras_per_step))
                    console.log(f"{cameras} cameras, {mode}, run {repeat + 1}: {runs[mode][-1]['to_step0_s']:.2f} s to step 0")
            for mode, results in runs.items():
                rows.append({
                    "cameras": cameras, "train_images": results[0]["train_images"], "images": mode,
                    "to_step0_s": spread(r["to_step0_s"] for r in results),
                    "step_data_ms": spread(1000 * r["step_data_s_median"] for r in results),
                    "data_peak_mb": spread(r["data_peak_bytes"] / 2**20 for r in results),
                    "decodes_at_step0": results[0]["decodes_at_step0"],
                    "stream_peak_held_mb": (max(r["peak_held_bytes"] for r in results) / 2**20) if mode == "stream" else None,
                })
            if args.source != "city":
                shutil.rmtree(data)
    table = Table(title=f"Data path, {args.steps} steps after step 0, {args.step_s * 1000:.0f} ms simulated step (min / median / max of {args.repeats})")
    for column in ("cameras", "train images", "images", "to step 0 (s)", "data per step (ms)", "data peak RSS (MB)", "decoded at step 0"):
        table.add_column(column, justify="right")
    fmt = lambda s, f: f"{s['min']:{f}} / {s['median']:{f}} / {s['max']:{f}}"  # noqa: E731
    for row in rows:
        table.add_row(str(row["cameras"]), str(row["train_images"]), row["images"], fmt(row["to_step0_s"], ".2f"),
                      fmt(row["step_data_ms"], ".2f"), fmt(row["data_peak_mb"], ".0f"), str(row["decodes_at_step0"]))
    console.print(table)
    meta = {
        "date": date.today().isoformat(), "machine": platform.machine(), "python": platform.python_version(),
        "photos": "lund_tiny's 256x192 JPEGs, one file per camera" if args.source == "lund"
        else f"ms_splatfacto.scenes.city, {max(args.cameras)} JPEG views at 256x192 (smaller counts: evenly spread subsets)",
        "image_type": "uint8",
        "steps": args.steps, "step_s": args.step_s, "repeats": args.repeats, "cache_bytes": args.cache_bytes,
        "cameras_per_step": args.cameras_per_step, "wall_s": time.perf_counter() - started,
        "command": "benchmarks/data_stream.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    console.print(f"Wrote {args.output}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
