"""End to end through nerfstudio's CLI across rank counts (gloo on loopback, one thread per rank):
`torchrun --nproc-per-node 2 ns-train ms-splatfacto` for 300 steps writes the checkpoint `cpu:1` writes,
bit for bit (parameters, both Adam moments, densification statistics, random generators, camera order,
step), and ns-eval and ns-export read it in one process; a step-149 checkpoint of 2 ranks resumed through
`ns-train --load-dir` on 1 process and on 3 ranks, and one of 1 process resumed on 2 ranks, continue for
150 steps to that same step-299 checkpoint.

Five runs share the work: 2 ranks and 1 process for 300 steps (both saving at steps 149 and 299), and the
three 150-step resumes. Refinement (every 50 steps from 100) happens on both sides of the resume, which
falls mid-epoch (26 training cameras), so statistics, re-striping and the camera order are all carried.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch
from plyfile import PlyData

from tests.conftest import ns, train
from tests.ranks import free_port
from tests.test_ranks_checkpoints import assert_same, comparable, torchrun

STEPS, RESUME = 300, 149
"""Length of the uninterrupted runs; the step the resumed runs start after (150 + 150 steps)."""
E2E_ARGS = [
    "--pipeline.datamanager.camera-res-scale-factor", "0.25",
    "--steps-per-save", str(RESUME), "--save-only-latest-checkpoint", "False",
]
"""On top of TRAIN_ARGS (refinement every 50 steps from step 100): quarter-size images (64 x 48) keep
five runs short; saving every 149 steps keeps steps 149 and 299 (and 298)."""
WHO_WROTE = ("/layout/members", "/layout/rows_per_member")
"""The only entries that differ between checkpoints of different member counts: who wrote the rows."""


def models(output: Path) -> Path:
    (config,) = sorted(output.glob("lund_tiny/ms-splatfacto/*/config.yml"))  # one folder, rank 0's timestamp
    return config.parent / "nerfstudio_models"


def ranks_train(output: Path, data: Path, steps: int, nproc: int, *extra: str) -> Path:
    """`torchrun --nproc-per-node nproc ns-train ...`; its checkpoint folder."""
    run = torchrun(output, data, steps, *E2E_ARGS, *extra, port=free_port(), nproc=nproc)
    try:
        run.wait(timeout=600)
    finally:
        run.kill()
    assert run.returncode == 0, (output / "torchrun.log").read_text()[-5000:]
    return models(output)


def state(path: Path) -> Dict[str, torch.Tensor]:
    """Every tensor and number of the checkpoint at `path`, less who wrote it."""
    return {k: v for k, v in comparable(path).items() if not k.startswith(WHO_WROTE)}


def ckpt(folder: Path, step: int) -> Path:
    return folder / f"step-{step:09d}.ckpt"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory, lund_tiny: Path) -> Path:
    """300 steps on 2 ranks of one CPU member each; its checkpoint folder."""
    return ranks_train(tmp_path_factory.mktemp("two_ranks"), lund_tiny, STEPS, 2)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, lund_tiny: Path) -> Path:
    """300 steps in one process on `cpu` (one member); its checkpoint folder."""
    return train(tmp_path_factory.mktemp("one_process"), lund_tiny, STEPS, *E2E_ARGS).checkpoint_dir


@pytest.mark.slow
def test_two_ranks_write_the_checkpoint_of_one_process_bit_for_bit(two_ranks: Path, one_process: Path):
    for step in (RESUME, STEPS - 1):
        assert ckpt(two_ranks, step).is_dir() and ckpt(one_process, step).is_file()  # sharded folder; one file
        loaded = read_layout(ckpt(two_ranks, step))
        assert loaded["members"] == 2 and loaded["devices"] == "2 ranks x cpu", loaded
        assert_same(state(ckpt(two_ranks, step)), state(ckpt(one_process, step)))
    first, last = state(ckpt(one_process, RESUME)), state(ckpt(one_process, STEPS - 1))
    assert first["/layout/num_gaussians"] != last["/layout/num_gaussians"]  # refinement after the resume point
    assert len(list(two_ranks.parent.rglob("events.out.tfevents*"))) == 1  # rank 0's alone


def read_layout(path: Path) -> dict:
    from ms_splatfacto.checkpoints import read_checkpoint

    return read_checkpoint(path)["layout"]


@pytest.mark.slow
def test_two_rank_checkpoint_loads_in_one_process_for_eval_and_export(two_ranks: Path, tmp_path: Path):
    config = two_ranks.parent / "config.yml"
    ns("ns-eval", "--load-config", str(config), "--output-path", str(tmp_path / "eval.json"))
    result = json.loads((tmp_path / "eval.json").read_text())
    assert Path(result["checkpoint"]) == ckpt(two_ranks, STEPS - 1), result["checkpoint"]
    assert 10 < result["results"]["psnr"] < 60, result["results"]
    ns("ns-export", "gaussian-splat", "--load-config", str(config), "--output-dir", str(tmp_path / "export"))
    vertices = PlyData.read(str(tmp_path / "export" / "splat.ply"))["vertex"]
    xyz = torch.from_numpy(np.stack([vertices[k] for k in "xyz"], axis=1))
    assert torch.equal(xyz, state(ckpt(two_ranks, STEPS - 1))["/pipeline/_model.gauss_params.means"])  # all rows, in order


@pytest.mark.slow
@pytest.mark.parametrize("source, nproc", [("two_ranks", 1), ("two_ranks", 3), ("one_process", 2)],
                         ids=["2-ranks-on-1-process", "2-ranks-on-3-ranks", "1-process-on-2-ranks"])
def test_resume_across_rank_counts_is_bit_identical(request, source: str, nproc: int, one_process: Path, tmp_path: Path, lund_tiny: Path):
    """150 steps from the step-149 checkpoint of `source` on `nproc` ranks end where 300 steps did."""
    written = request.getfixturevalue(source)
    resume = ["--load-dir", str(written), "--load-step", str(RESUME)]
    if nproc == 1:
        resumed = train(tmp_path, lund_tiny, STEPS - RESUME - 1, *E2E_ARGS, *resume).checkpoint_dir
    else:
        resumed = ranks_train(tmp_path, lund_tiny, STEPS - RESUME - 1, nproc, *resume)
    assert sorted(p.name for p in resumed.iterdir()) == [ckpt(resumed, s).name for s in (2 * RESUME, STEPS - 1)]
    assert read_layout(ckpt(resumed, STEPS - 1))["members"] == nproc  # written by the ranks that resumed
    assert_same(state(ckpt(resumed, STEPS - 1)), state(ckpt(one_process, STEPS - 1)))
