"""The viewer's render on the CPU: `get_outputs_for_camera` at the viewer's default max resolution, and the
time a still view takes to reach that resolution in headless Chromium.

Render: what nerfstudio's RenderStateMachine does for a still view ("high" state), at the default "Max res"
of 512: the longer image side is 512, so lund_tiny's first training camera (256x192, aspect 4:3) renders at
512x384, with the viewer's default background colour, under `torch.no_grad()` in eval mode. The Gaussians
are stepbench's synthetic ones (N around lund_tiny's SfM points, SH degree 3). Each size builds the `cpu`
and `cpu:4` models, renders once on each to warm up (kernel load, torch.compile of get_viewmat), then
times them interleaved (A, B, A, B, ...) so that load from other processes falls on both alike; min,
median and max wall seconds per case, and the median CPU seconds of all threads (which other processes
on a shared machine do not inflate), the thread count pinned and the load average recorded.

Browser (`--browser [CONFIG]`): `tests/test_viewer_browser.py`'s `viewer_in_chromium` on a trained
lund_tiny model (CONFIG, or one trained like the tests' `trained_run`, 300 steps): seconds from
Page.navigate until the panel first reports a 512 px render, and until the still view is drawn (two
successive screenshots of the canvas equal). A run whose render thread dies (see the test) is retried
and counted.

    .venv/bin/python benchmarks/viewer_render.py [--sizes 100000 1000000] [--repeats 5 3] [--threads 2]
        [--browser [CONFIG]] [--browser-repeats 2] [--screenshot docs/viewer_lund_tiny.png] [--skip-render]

Writes benchmarks/results/viewer_render.json (keeping the other part's figures when only one part runs)
and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "viewer_render.json"
DEVICES = ("cpu", "cpu:4")


def viewer_camera():
    """lund_tiny's first training camera as the viewer's still view renders it (512 px longer side)."""
    from nerfstudio.cameras.cameras import CameraType
    from nerfstudio.viewer.utils import CameraState, get_camera
    from stepbench import scene

    from tests.test_viewer_browser import render_size

    camera = scene()[0][0]
    fov = float(2 * np.arctan(float(camera.cy) / float(camera.fy)))  # vertical, as viser reports it
    state = CameraState(fov=fov, aspect=float(camera.width) / float(camera.height), c2w=camera.camera_to_worlds.to(torch.float64),
                        camera_type=CameraType.PERSPECTIVE)
    width, height = render_size(state.aspect)
    return get_camera(state, height, width)


def render_once(model, camera) -> tuple[float, float, torch.Tensor]:
    """(wall seconds, CPU seconds of all this process's threads, image) of one still-view render."""
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        rgb = model.get_outputs_for_camera(camera.to(model.device))["rgb"]
    return time.perf_counter() - start, time.process_time() - cpu, rgb


def time_renders(sizes: List[int], repeats: List[int]) -> List[Dict[str, object]]:
    from stepbench import build_model, load, synthetic_gaussians

    from tests.test_viewer_browser import BACKGROUND

    camera = viewer_camera()
    rows = []
    for n, count in zip(sizes, repeats):
        models = {}
        for devices in DEVICES:
            model = build_model(devices)
            load(model, synthetic_gaussians(n))
            model.eval()
            model.set_background(torch.tensor(BACKGROUND, dtype=torch.float32) / 255)
            render_once(model, camera)  # warm-up
            models[devices] = model
        times: Dict[str, List[float]] = {d: [] for d in DEVICES}
        cpu_times: Dict[str, List[float]] = {d: [] for d in DEVICES}
        images = {}
        for _ in range(count):
            for devices in DEVICES:  # interleaved: A, B, A, B, ...
                seconds, cpu_seconds, images[devices] = render_once(models[devices], camera)
                times[devices].append(seconds)
                cpu_times[devices].append(cpu_seconds)
                print(f"  {n} Gaussians on {devices}: {seconds:.3f} s ({cpu_seconds:.3f} CPU s)", flush=True)
        difference = float((images["cpu"] - images["cpu:4"]).abs().max())
        for devices in DEVICES:
            rows.append({"gaussians": n, "devices": devices, "width": int(camera.width), "height": int(camera.height),
                         "repeats": count, "min_s": min(times[devices]), "median_s": statistics.median(times[devices]),
                         "max_s": max(times[devices]), "times_s": times[devices], "cpu_median_s": statistics.median(cpu_times[devices]),
                         "cpu_times_s": cpu_times[devices], "max_abs_diff_cpu_vs_cpu4": difference})
        del models, images
    return rows


def save_small_png(screenshot: np.ndarray, path: Path) -> None:
    """The page at 3/4 size in 256 dithered colours: about 90 kB for the README instead of 1 MB."""
    from PIL import Image

    image = Image.fromarray(screenshot)
    image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG).save(path, optimize=True)


def time_browser(config: Path | None, repeats: int, screenshot: Path | None) -> Dict[str, object]:
    from tests.conftest import TRAIN_STEPS, train
    from tests.test_viewer_browser import CHROMIUM, MAX_RES, viewer_in_chromium

    if CHROMIUM is None:
        return {"skipped": "chromium is not installed (scripts/setup.sh installs it where apt-get can)"}
    with tempfile.TemporaryDirectory() as folder:
        trained_here = config is None
        if trained_here:
            print(f"training lund_tiny for {TRAIN_STEPS} steps (as the tests' trained_run)...", flush=True)
            start = time.perf_counter()
            config = train(Path(folder), REPO.parent / "shared" / "data" / "lund_tiny", TRAIN_STEPS).config
            print(f"  trained in {time.perf_counter() - start:.0f} s", flush=True)
        runs, crashes, attempts = [], 0, 0
        while len(runs) < repeats and attempts < repeats + 3:
            attempts += 1
            try:
                capture = viewer_in_chromium(config, timeout=240, log=lambda line: print("  " + line, flush=True))
            except AssertionError as error:
                if "InternalTorchDynamoError" not in str(error):
                    raise
                crashes += 1
                print("  the viewer's render thread died (InternalTorchDynamoError); retrying", flush=True)
                continue
            runs.append({"seconds_to_page": capture.seconds_to_page, "seconds_to_max_res": capture.seconds_to_max_res,
                         "seconds_to_still_view": capture.seconds_to_still_view, "resolution": list(capture.resolution),
                         "renders_reported": [[round(t, 2), list(r)] for t, r in capture.resolutions]})
            if screenshot is not None and len(runs) == 1:
                save_small_png(capture.screenshot, screenshot)
                print(f"  wrote {screenshot} ({screenshot.stat().st_size} bytes)", flush=True)
        (checkpoint,) = sorted((config.parent / "nerfstudio_models").glob("step-*.ckpt"))[-1:]
        means = torch.load(checkpoint, map_location="cpu")["pipeline"]["_model.gauss_params.means"]
    return {"model": f"{config.parent.parent.parent.name}, {checkpoint.stem}, {means.shape[0]} Gaussians"
                     + (f" (trained here as tests/conftest.py trains it, {TRAIN_STEPS} steps)" if trained_here else ""),
            "max_res": MAX_RES, "chromium": os.path.basename(CHROMIUM), "runs": runs, "attempts": attempts,
            "render_thread_crashes": crashes}


def table(render: List[Dict[str, object]]) -> str:
    lines = ["| Gaussians | devices | image | repeats | min s | median s | max s | median CPU s |", "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in render:
        lines.append(f"| {r['gaussians']:,} | {r['devices']} | {r['width']}x{r['height']} | {r['repeats']} | "
                     f"{r['min_s']:.3f} | {r['median_s']:.3f} | {r['max_s']:.3f} | {r.get('cpu_median_s', float('nan')):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, nargs="+", default=[5, 3], help="per size (the last one repeats)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, pinned")
    parser.add_argument("--skip-render", action="store_true")
    parser.add_argument("--browser", nargs="?", const="train", default=None, help="a trained config.yml, or none: train one")
    parser.add_argument("--browser-repeats", type=int, default=2)
    parser.add_argument("--screenshot", type=Path, default=None, help="save the first run's page (downscaled PNG)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    meta = {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "load_average_before": list(os.getloadavg())}
    if not args.skip_render:
        repeats = (args.repeats + args.repeats[-1:] * len(args.sizes))[: len(args.sizes)]
        result["render"] = {"meta": meta, "results": time_renders(args.sizes, repeats)}
        meta["load_average_after"] = list(os.getloadavg())
    if args.browser is not None:
        config = None if args.browser == "train" else Path(args.browser)
        result["browser"] = {"meta": {**meta, "load_average_after": None}, **time_browser(config, args.browser_repeats, args.screenshot)}
        result["browser"]["meta"]["load_average_after"] = list(os.getloadavg())
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    if "render" in result:
        print(table(result["render"]["results"]))
    for run in result.get("browser", {}).get("runs", []):
        print(f"browser: page served after {run['seconds_to_page']:.1f} s; first {result['browser']['max_res']} px render "
              f"{run['seconds_to_max_res']:.1f} s and still view drawn {run['seconds_to_still_view']:.1f} s after Page.navigate")


if __name__ == "__main__":
    main()
