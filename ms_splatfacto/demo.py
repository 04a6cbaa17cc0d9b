"""The README demo: generate the street scene, train ms-splatfacto on it, export the PLY and write a
preview of the held-out views beside their ground truth. Runs the real nerfstudio commands."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro
from nerfstudio.utils.eval_utils import eval_setup
from PIL import Image

from ms_splatfacto.scenes.street import generate_street_scene


@dataclass
class DemoConfig:
    """Train ms-splatfacto on the generated street scene."""

    output: Path = Path("demo")
    """Folder for the scene, the training run, the export and the preview."""
    steps: int = 1500
    """Training iterations."""
    devices: str = "auto"
    """Devices that hold the model (see `ns-train ms-splatfacto -h`)."""


def run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def latest_config(runs: Path) -> Path:
    configs = sorted(runs.glob("*/ms-splatfacto/*/config.yml"))
    if not configs:
        raise FileNotFoundError(f"No training run found under {runs}")
    return configs[-1]


def preview_held_out(config_path: Path, preview_path: Path) -> dict:
    """Render every held-out view; save renders (top) over ground truth (bottom); return metrics."""
    _, pipeline, _, _ = eval_setup(config_path, test_mode="test")
    dataset = pipeline.datamanager.eval_dataset
    columns = []
    with torch.no_grad():
        for index in range(len(dataset)):
            camera = dataset.cameras[index : index + 1].to(pipeline.device)
            render = pipeline.model.get_outputs_for_camera(camera)["rgb"].clamp(0, 1).cpu().numpy()
            truth = dataset.get_image_float32(index)[..., :3].numpy()
            columns.append(np.concatenate([render, truth], axis=0))
    Image.fromarray((np.concatenate(columns, axis=1) * 255).astype(np.uint8)).save(preview_path)
    return pipeline.get_average_eval_image_metrics()


def main(config: DemoConfig) -> None:
    bin_dir = Path(sys.executable).parent
    scene = config.output / "street"
    if not (scene / "transforms.json").exists():
        generate_street_scene(scene)
    runs = config.output / "outputs"
    start = time.perf_counter()
    run([
        str(bin_dir / "ns-train"), "ms-splatfacto", "--output-dir", str(runs), "--experiment-name", "street",
        "--max-num-iterations", str(config.steps), "--vis", "tensorboard", "--viewer.quit-on-train-completion", "True",
        "--steps-per-eval-all-images", str(10 * config.steps), "--pipeline.model.devices", config.devices,
        "--pipeline.model.warmup-length", "300", "--pipeline.model.refine-every", "100",
        "--pipeline.model.sh-degree-interval", "300", "--pipeline.model.num-downscales", "0",
        "nerfstudio-data", "--data", str(scene),
    ])
    train_seconds = time.perf_counter() - start
    config_path = latest_config(runs)
    run([str(bin_dir / "ns-export"), "gaussian-splat", "--load-config", str(config_path),
         "--output-dir", str(config.output / "export")])
    metrics = preview_held_out(config_path, config.output / "preview.png")
    metrics["train_seconds"] = round(train_seconds, 1)
    (config.output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"Held-out views: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}; training took {train_seconds:.0f} s")
    print(f"Preview (renders over ground truth): {config.output / 'preview.png'}")
    print(f"PLY: {config.output / 'export' / 'splat.ply'}")
    print(f"View it: ns-viewer --load-config {config_path}")


if __name__ == "__main__":
    main(tyro.cli(DemoConfig))
