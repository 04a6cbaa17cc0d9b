"""Shared fixtures: the real scenes in ../shared/data and one ns-train run reused by several tests."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BIN = Path(sys.executable).parent

TRAIN_STEPS = 300
"""Length of the shared training run; densification is active from step 100 (every 50 steps)."""
TRAIN_ARGS = [
    "--vis", "tensorboard", "--viewer.quit-on-train-completion", "True",
    "--steps-per-eval-image", "100000", "--steps-per-eval-all-images", "100000", "--steps-per-save", "100000",
    "--pipeline.model.num-downscales", "0", "--pipeline.model.warmup-length", "100",
    "--pipeline.model.refine-every", "50", "--pipeline.model.sh-degree-interval", "100",
    "--pipeline.model.devices", "cpu",
]
"""Full resolution from the start, and refinement early enough to happen in a short run."""


def ns(command: str, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """Run a nerfstudio CLI (`ns-train`, `ns-export`, ...) from this venv, capturing its output."""
    result = subprocess.run([str(BIN / command), *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def shared_scene(name: str) -> Path:
    path = SHARED_DATA / name
    if not (path / "images").is_dir():
        pytest.fail(f"Test data missing: expected the COLMAP scene at {path} (../shared/data beside the checkout).")
    return path


@pytest.fixture(scope="session")
def lund_tiny() -> Path:
    return shared_scene("lund_tiny")


@dataclass
class TrainedRun:
    root: Path  # --output-dir
    config: Path  # the run's config.yml
    checkpoint_dir: Path
    stdout: str


def train(output_dir: Path, data: Path, steps: int, *extra: str) -> TrainedRun:
    result = ns(
        "ns-train", "ms-splatfacto", "--output-dir", str(output_dir), "--experiment-name", "lund_tiny",
        "--max-num-iterations", str(steps), *TRAIN_ARGS, *extra,
        "colmap", "--data", str(data), "--colmap-path", "sparse/0",
    )
    (config,) = sorted(output_dir.glob("lund_tiny/ms-splatfacto/*/config.yml"))[-1:]
    return TrainedRun(output_dir, config, config.parent / "nerfstudio_models", result.stdout + result.stderr)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, lund_tiny: Path) -> TrainedRun:
    """One real `ns-train ms-splatfacto` run on lund_tiny with the CPU kernels."""
    return train(tmp_path_factory.mktemp("train"), lund_tiny, TRAIN_STEPS)
