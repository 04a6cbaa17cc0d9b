"""The real training path (render op, L1 + SSIM loss, autograd, Adam) on GPUs against the CPU kernels:
images and gradients, a refinement (grow, prune, re-stripe), peak memory read during training, a GPU
checkpoint rendered on CPU members, managed storage. Each GPU test has a CPU twin running the same check with CPU member specs (or the
C++ kernels against the pure-PyTorch reference), so the check logic runs on machines without a GPU.
The checks live in benchmarks/gpu_path.py and gpu_refinement.py, which `scripts/gpu_check.sh` also runs where pytest and
nerfstudio are missing."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu_path as gp
from benchmarks import gpu_refinement as gr

GPUS = torch.cuda.device_count()
needs_gpu = pytest.mark.skipif(GPUS == 0, reason="needs a GPU (torch sees none); the CPU twin of this check runs here")
needs_two = pytest.mark.skipif(GPUS < 2, reason=f"needs two GPUs, torch sees {GPUS}; the CPU twin of this check runs here")


@pytest.fixture(scope="module")
def scene() -> gp.Scene:
    return gp.synthetic_scene(600, 64, 48)  # small: the CPU reference kernels render it too


@pytest.fixture(scope="module")
def batch() -> gp.Scene:
    return gp.synthetic_scene(600, 64, 48, cameras=2, seed=1)


def assert_passed(result: dict) -> None:
    assert result["passed"], json.dumps(result, indent=1, default=str)[-3000:]


@pytest.mark.parametrize("spec", [pytest.param("cuda", marks=needs_gpu), pytest.param("cuda:0*4", marks=needs_gpu),
                                  pytest.param("cuda:0,1", marks=needs_two)])
def test_cuda_step_matches_cpu_kernels(spec: str, scene: gp.Scene):
    result = gp.step_parity(spec, scene)  # against one CPU member with the C++ kernels
    assert_passed(result)
    assert result["loss"] > 0


@pytest.mark.parametrize("spec", ["cpu", "cpu:4"])
def test_cpu_twin_step_matches_reference_kernels(spec: str, scene: gp.Scene):
    assert_passed(gp.step_parity(spec, scene, reference_kernels="reference"))


@needs_gpu
def test_cuda_batch_step_matches_cpu_kernels(batch: gp.Scene):
    assert_passed(gp.step_parity("cuda:0*4", batch))


def test_cpu_twin_batch_step_matches_reference_kernels(batch: gp.Scene):
    assert_passed(gp.step_parity("cpu:3", batch, reference_kernels="reference"))


def test_parity_check_flags_a_wrong_step(scene: gp.Scene):
    """The check can fail: Gaussians made more opaque and one image row dropped are both caught."""
    brighter = gp.Scene({**scene.raw, "opacities": scene.raw["opacities"] + 0.5}, scene.viewmats, scene.Ks, scene.images, scene.sh_degree)
    right = gp.step_outputs("cpu", scene)
    result = gp.compare_outputs(gp.step_outputs("cpu:4", brighter), right)
    assert not result["passed"] and any(f.startswith("image") for f in result["failures"])
    assert any(f.startswith("opacities grad") for f in result["failures"])
    shifted = {**right, "image": torch.roll(right["image"], 1, dims=1)}
    assert not gp.compare_outputs(shifted, right)["passed"]
    assert gp.compare_outputs(right, right)["passed"]


@needs_gpu
def test_cuda_one_member_matches_gsplat_called_directly(scene: gp.Scene):
    from gsplat.rendering import rasterization

    got = gp.step_outputs("cuda:0", scene)
    assert_passed(gp.compare_outputs(got, gp.direct_outputs(scene, torch.device("cuda", 0), rasterization, packed=False)))


def test_cpu_twin_one_member_matches_the_plain_pipeline(scene: gp.Scene):
    from ms_splatfacto.backend.rendering import rasterization

    result = gp.compare_outputs(gp.step_outputs("cpu", scene), gp.direct_outputs(scene, torch.device("cpu"), rasterization, kernels="cpu"))
    assert_passed(result)


@pytest.fixture(scope="module")
def refine_scene() -> gp.Scene:
    return gr.refinement_scene(600, 64, 48)


@pytest.fixture(scope="module")
def cpu_refinement(refine_scene: gp.Scene) -> dict:
    """One CPU member with the C++ kernels: the thresholds (from its statistics) and its run."""
    return gr.refinement_reference(refine_scene, "cpu", "cpu")


def check_refinement(result: dict, members: int) -> None:
    """Passed, and what it rests on: every decision made, rows even over `members`, no fallback."""
    assert_passed(result)
    d, rows = result["decisions"], result["rows_per_member"]
    assert d == result["reference_run"]["decisions"] and min(d["duplicated"], d["split"], d["pruned"]) > 0, d
    assert result["gaussians"] == 600 + d["duplicated"] + d["split"] - d["pruned"] == sum(rows)
    assert len(rows) == members and max(rows) - min(rows) <= 1 and result["fallbacks"] == 0, rows


@pytest.mark.parametrize("spec, members", [pytest.param("cuda", max(GPUS, 1), marks=needs_gpu),
                                           pytest.param("cuda:0*4", 4, marks=needs_gpu),
                                           pytest.param("cuda:0,1", 2, marks=needs_two)])
def test_cuda_refinement_matches_cpu_kernels(spec: str, members: int, refine_scene: gp.Scene, cpu_refinement: dict):
    """The CPU kernels' decisions, moments and parameters (the GPU draws other split noise: children's
    means aside); then against one GPU member, children's means included."""
    check_refinement(gr.refinement_parity(spec, refine_scene, reference=cpu_refinement), members)
    one_gpu = gr.run_reference("cuda:0", refine_scene, cpu_refinement["cuts"])
    check_refinement(gr.refinement_parity(spec, refine_scene, reference=one_gpu, same_rng=True), members)


@pytest.mark.parametrize("spec", ["cpu:4", "cpu:3"])
def test_cpu_twin_refinement_on_members_is_bit_for_bit_one_member(spec: str, refine_scene: gp.Scene, cpu_refinement: dict):
    result = gr.refinement_parity(spec, refine_scene, reference=cpu_refinement, same_rng=True, exact=True)
    check_refinement(result, int(spec[-1]))
    assert result["losses"] == result["reference_run"]["losses"]


def test_cpu_twin_refinement_reference_kernels_decide_as_cpu_kernels(refine_scene: gp.Scene, cpu_refinement: dict):
    """The CUDA test's comparison with the pure-PyTorch kernels in the GPU's place; both draw the split
    noise from the CPU's generator, so children's means are compared too."""
    result = gr.refinement_parity("cpu:4", refine_scene, kernels="reference", reference=cpu_refinement, same_rng=True)
    check_refinement(result, 4)
    assert 0 < max(result["rel_l2"].values()) <= gr.MOMENT_REL_L2  # float32 sums in another order


def test_refinement_check_flags_other_decisions_and_rows(refine_scene: gp.Scene, cpu_refinement: dict):
    """The check can fail: a grad threshold just under the gap grows one more Gaussian, and a row moved
    or a copy made unlike its parent are caught; a child moved only where the split noise is shared."""
    cuts = cpu_refinement["cuts"]
    lower = {**cuts, "grow_grad2d": {**cuts["grow_grad2d"], "cut": cuts["grow_grad2d"]["gap"][0] * 0.999}}
    result = gr.refinement_parity("cpu:2", refine_scene, reference={**cpu_refinement, "cuts": lower}, same_rng=True)
    assert not result["passed"] and any("decided otherwise" in f for f in result["failures"]), result["failures"]
    run = cpu_refinement["run"]
    rows = {**run["rows"], "params": {**run["rows"]["params"], "means": run["rows"]["params"]["means"].clone()}}
    rows["params"]["means"][5] += 0.5
    moved = {**run, "rows": rows}
    compared = gr.compare_refinements(moved, run, refine_scene.raw, same_rng=True)
    assert compared["failures"] == [f"means rel L2 {compared['rel_l2']['means']:.3g}"]
    assert gr.compare_refinements(run, run, refine_scene.raw, same_rng=True, exact=True)["passed"]
    child = torch.where(run["code"][run["rows"]["ids"]] == 3)[0][0]
    rows["params"]["means"][5] -= 0.5
    rows["params"]["means"][child] += 0.5  # as another generator's noise would put it
    assert gr.compare_refinements(moved, run, refine_scene.raw, same_rng=False)["passed"]
    assert not gr.compare_refinements(moved, run, refine_scene.raw, same_rng=True)["passed"]
    rows["params"]["means"][child] -= 0.5
    assert gr.copy_failures(run["rows"], run["code"]) == []
    twins = torch.where(run["code"][rows["ids"]] == 2)[0]
    rows["params"]["means"][twins[1]] += 1e-3  # the first duplicated parent's copy
    assert gr.copy_failures(rows, run["code"]) == ["copies' means differ from their parents'"]


def check_memory(result: dict, devices: set) -> None:
    assert_passed(result)
    assert [set(p) for p in result["peaks"]] == [devices, devices]
    assert all(isinstance(v, int) for p in result["peaks"] for v in p.values())
    assert sum(result["peaks"][1].values()) >= sum(result["peaks"][0].values())  # a peak since the reset


@pytest.mark.parametrize("spec", [pytest.param("cuda", marks=needs_gpu), pytest.param("cuda:0*4", marks=needs_gpu)])
def test_cuda_max_memory_allocated_readable_during_training(spec: str, scene: gp.Scene):
    check_memory(gp.memory_during_training(spec, scene), {"cuda:0"} if GPUS == 1 or "*" in spec else {f"cuda:{i}" for i in range(GPUS)})


def test_cpu_twin_peak_memory_readable_during_training(scene: gp.Scene):
    check_memory(gp.memory_during_training("cpu:4", scene), {"cpu"})


@pytest.mark.parametrize("spec", [pytest.param("cuda", marks=needs_gpu), pytest.param("cuda:0*4", marks=needs_gpu),
                                  pytest.param("cuda:0,1", marks=needs_two)])
def test_cuda_checkpoint_loads_on_cpu_members_and_renders_the_same(spec: str, scene: gp.Scene):
    assert_passed(gp.checkpoint_round_trip(spec, "cpu:4", scene))


def test_cpu_twin_checkpoint_loads_on_other_members_and_renders_the_same(scene: gp.Scene):
    """Written by cpu:2 with the C++ kernels, rendered by cpu:4 with the reference kernels."""
    result = gp.checkpoint_round_trip("cpu:2", "cpu:4", scene, target_kernels="reference")
    assert_passed(result)
    assert result["step_moved_params"] > 0 and result["loaded_plain_on_cpu"] and result["target_striped"]


@needs_gpu
def test_cuda_managed_storage_step_matches_cpu_kernels():
    """members("cuda", storage="managed"): every GPU, rows in managed memory (the storage module is
    another test file's subject; this is the training step on it)."""
    result = gp.managed_step("cuda")
    assert_passed(result)
    assert result["managed"] and all(v > 0 for v in result["peaks"].values())


def test_cpu_twin_storage_step_subprocess():
    """The same fresh-process check on CPU members (plain storage: managed memory needs GPUs): the step
    matches, peaks are read, and the check fails only because the rows it demands in managed memory
    are not there."""
    result = gp.managed_step("cpu:2", storage="plain", require_managed=True, timeout=300)
    assert "error" not in result and result["failures"] == [] and result["image_max_abs"] <= gp.IMAGE_MAX_ABS
    assert result["managed"] is False and set(result["peaks"]) == {"cpu"}
    assert result["passed"] is False


@needs_gpu
def test_cuda_model_step_matches_cpu():
    """The nerfstudio model (skipped where nerfstudio is missing, e.g. on the GPU check machine):
    one step's loss and gradients with devices='cuda' against devices='cpu'."""
    pytest.importorskip("nerfstudio")
    from types import SimpleNamespace

    from ms_splatfacto.backend.aggregate import to_plain
    from ms_splatfacto.model import GAUSSIAN_PARAMS
    from tests.test_model_step import camera_and_image, make_model

    results = {}
    for spec in ("cpu", "cuda"):
        model = make_model(spec)
        camera, batch = camera_and_image()
        model.step_cb(SimpleNamespace(optimizers={}), 0)
        loss = model.get_loss_dict(model.get_outputs(camera.to(model.device)), batch)["main_loss"]
        loss.backward()
        results[spec] = (float(loss), {n: to_plain(model.gauss_params[n].grad).cpu() for n in GAUSSIAN_PARAMS})
    assert results["cuda"][0] == pytest.approx(results["cpu"][0], rel=1e-4)
    for name in GAUSSIAN_PARAMS:
        assert gp.rel_l2(results["cuda"][1][name], results["cpu"][1][name]) <= gp.GRAD_REL_L2, name
