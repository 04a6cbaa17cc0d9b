"""Quality of a longer CPU run on ../shared/data/lund: `ns-train ms-splatfacto` at 1/4 scale (256x192) on
a member spec, then held-out PSNR/SSIM, the Gaussian count, and each member's count over time (read from
the run's tensorboard scalars). The 1/4-scale images go to a temporary folder beside symlinks to the
shared scene (which is read-only and must not be copied into the repo). Writes
benchmarks/results/lund_quality.json.

    .venv/bin/python benchmarks/lund_quality.py [--steps 1000] [--devices cpu:4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
LUND = REPO.parent / "shared" / "data" / "lund"
RESULTS = REPO / "benchmarks" / "results" / "lund_quality.json"


def quarter_scale_view(folder: Path) -> Path:
    """lund with an `images_4` folder, which nerfstudio's colmap dataparser reads without writing."""
    if not (LUND / "images").is_dir():
        sys.exit(f"lund_quality: the scene is missing: expected COLMAP data at {LUND}")
    folder.mkdir(parents=True)
    (folder / "images").symlink_to(LUND / "images")
    (folder / "sparse").symlink_to(LUND / "sparse")
    (folder / "images_4").mkdir()
    for path in sorted((LUND / "images").iterdir()):
        image = Image.open(path)
        image.resize((image.width // 4, image.height // 4), Image.BICUBIC).save(folder / "images_4" / path.name, quality=95)
    return folder


def member_counts(run: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(run.glob("events.out.tfevents.*"))))
    events.Reload()
    tags = sorted(t for t in events.Tags()["scalars"] if t.startswith("Members/gaussians/"))
    return {tag.rsplit("/", 1)[-1]: [(e.step, int(e.value)) for e in events.Scalars(tag)][::100] for tag in tags}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--devices", default="cpu:4")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = quarter_scale_view(Path(tmp) / "lund")
        out = Path(tmp) / "outputs"
        subprocess.run(
            [str(Path(sys.executable).parent / "ns-train"), "ms-splatfacto", "--output-dir", str(out), "--experiment-name", "lund",
             "--max-num-iterations", str(args.steps), "--vis", "tensorboard", "--viewer.quit-on-train-completion", "True",
             "--steps-per-eval-image", "100000", "--steps-per-eval-all-images", "100000", "--steps-per-save", str(args.steps),
             "--pipeline.model.devices", args.devices, "--pipeline.model.num-downscales", "0",
             "colmap", "--data", str(data), "--colmap-path", "sparse/0", "--downscale-factor", "4"],
            check=True,
        )
        from nerfstudio.utils.eval_utils import eval_setup

        (config,) = out.glob("lund/ms-splatfacto/*/config.yml")
        _, pipeline, _, _ = eval_setup(config, test_mode="test")
        metrics = pipeline.get_average_eval_image_metrics()
        result = {
            "steps": args.steps, "devices": args.devices, "image": "256x192 (1/4 of lund's 1024x768)",
            "psnr": metrics["psnr"], "ssim": metrics["ssim"], "gaussians": pipeline.model.num_points,
            "per_member_final": list(pipeline.model.gauss_params["means"]._layout.counts),
            "per_member_over_time": member_counts(config.parent),
        }
    print(json.dumps(result, indent=1))
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
