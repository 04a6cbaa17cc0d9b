"""`scripts/gpu_check.sh` where the GPU machine's limits are reproduced: nerfstudio unimportable (and
numpy, rich, jaxtyping for gsplat's loading), no GPU (its one line), the CPU dry run end to end, and
the pieces a dry run cannot reach (ninja and nvcc lookup, build settings, interleaved timing, reports)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check, gpu_env
from tests.conftest import REPO

BLOCKER = '''import importlib.machinery, importlib.util, os, sys

UNINSTALLED = set(os.environ.get("GPU_CHECK_TEST_UNINSTALL", "").split(","))


def elsewhere(name):
    """A copy of `name` outside site-packages (carried, or a stand-in), or None."""
    return importlib.machinery.PathFinder.find_spec(name, [p for p in sys.path if "site-packages" not in p])


class Uninstaller:
    """Hides the installed (site-packages) copies of UNINSTALLED modules, as on a machine where they were
    never installed; copies elsewhere on sys.path (carried, or stand-ins) still import."""

    def find_spec(self, name, path=None, target=None):
        if path is not None or name not in UNINSTALLED:
            return None
        spec = elsewhere(name)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r} (uninstalled by the test)", name=name)
        return spec


installed_find_spec = importlib.util.find_spec


def find_spec(name, package=None):
    """Probes answer None for a hidden module, as where it is missing (torch's own probes need that)."""
    if name in UNINSTALLED and name not in sys.modules:
        return elsewhere(name)
    return installed_find_spec(name, package)


sys.meta_path.insert(0, Uninstaller())
importlib.util.find_spec = find_spec
'''


def uninstalled_env(tmp_path: Path, modules: str) -> dict:
    """An environment whose Pythons see no GPU and have not installed `modules` (comma-separated)."""
    (tmp_path / "blocker").mkdir(exist_ok=True)
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "blocker"), GPU_CHECK_TEST_UNINSTALL=modules,
               CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    probe = subprocess.run([sys.executable, "-c", f"import {modules.split(',')[0]}"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "uninstalled by the test" in probe.stderr, "the blocker does not work"
    return env


def test_script_without_gpu_says_so_in_one_line_and_exits_0(tmp_path: Path):
    env = uninstalled_env(tmp_path, "nerfstudio")
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no GPU visible to torch"), done.stdout


def test_cpu_dry_run_runs_end_to_end_with_torch_alone(tmp_path: Path):
    """Everything short of the GPU where only torch is installed (as on the GPU machine): checks, report,
    timings. gsplat's Python comes from the carried copy (the refinement runs its strategy), bare."""
    env = uninstalled_env(tmp_path, "nerfstudio,gsplat,numpy,rich,jaxtyping")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["ok"] and result["meta"]["mode"] == "tiny" and result["build"]["cpu kernels"]["ok"]
    names = [c["name"] for c in result["checks"]]
    assert len(names) == 10 and all(c["passed"] for c in result["checks"]), names
    assert {"step cpu:4 vs cpu", "checkpoint cpu:4 -> cpu:4", "batch of 2 cameras cpu:4 vs cpu",
            "refinement cpu:4 vs cpu (reference kernels)", "refinement cpu:4 vs cpu (member counts)"} <= set(names)
    refined = {c["name"]: c for c in result["checks"] if c["name"].startswith("refinement")}
    for check in refined.values():
        assert check["fallbacks"] == 0 and min(check["decisions"][k] for k in ("duplicated", "split", "pruned")) > 0
        assert max(check["rows_per_member"]) - min(check["rows_per_member"]) <= 1
    assert len(refined["refinement cpu:4 vs cpu (reference kernels)"]["rows_per_member"]) == 4
    gsplat = result["environment"]["gsplat"]  # its Python only: the CPU pipeline stands in for its kernels
    assert gsplat["ok"] and gsplat["how"].startswith("bare package") and gsplat["kernels"] == "not loaded (dry run)"
    assert result["environment"]["modules"]["numpy"] == "missing"
    timing = result["timing"]
    assert set(timing["seconds"]) == {"ours cpu", "direct", "ours cpu:4"}
    for stats in timing["seconds"].values():
        assert len(stats["samples"]) == timing["repeats"] == 2
        assert 0 < stats["min"] <= stats["median"] <= stats["max"]
    assert all(v > 0 for v in timing["median_ratios"].values())
    assert set(timing["memory"]) == set(timing["seconds"]) and all(m["peak_bytes"] > 0 for m in timing["memory"].values())
    text = (out / "gpu_check.txt").read_text()
    assert "checks: 10 passed, 0 failed" in text and "verdict: OK" in text and "median ratios" in text
    assert "duplicated" in text and "grad cut margin" in text


def test_gsplat_loads_from_a_carried_copy_without_numpy_rich_or_jaxtyping(tmp_path: Path):
    """As on the GPU machine: gsplat not installed but carried, numpy/rich/jaxtyping absent. The copy
    imports (bare, skipping gsplat/__init__.py), and rich's stand-in serves gsplat's build messages."""
    env = uninstalled_env(tmp_path, "numpy,rich,jaxtyping,nerfstudio,gsplat")
    carried = Path(torch.__file__).parents[1] / "gsplat"
    code = f"""
import json, sys
sys.path.insert(0, {str(REPO)!r})
from benchmarks import gpu_env
before = gpu_env.module_status()
located = gpu_env.locate_gsplat({str(carried)!r})
shim = gpu_env.add_rich_shim()
loaded = gpu_env.import_gsplat()
import gsplat, gsplat.rendering
from rich.console import Console
with Console().status("[bold yellow]building[/bold yellow]"):
    pass
print("RESULT " + json.dumps(dict(before=before, located=located, shim=shim, loaded=loaded, path=gsplat.__path__[0],
      rich=sys.modules["rich"].__file__, rasterization=callable(gsplat.rendering.rasterization))))
"""
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ")[-1])
    assert result["before"]["numpy"] == result["before"]["rich"] == result["before"]["jaxtyping"] == "missing"
    assert result["located"]["how"] == "--gsplat-src" and result["path"].endswith("gsplat_path/gsplat")
    assert result["loaded"]["ok"] and result["loaded"]["how"].startswith("bare package") and result["loaded"]["version"] == "1.4.0"
    assert result["rich"].startswith(result["shim"]) and result["rasterization"]
    assert "building" in done.stderr and "[bold" not in done.stderr  # markup stripped


def test_missing_gsplat_is_reported_not_raised(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(gpu_env, "_SCRATCH", tmp_path)
    result = gpu_env.locate_gsplat(str(tmp_path / "nowhere"))
    assert "error" in result and "--gsplat-src" in result["error"]


def test_ninja_from_path_or_carried_or_reported_missing(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(gpu_env, "_SCRATCH", tmp_path)
    fake = tmp_path / "carried_ninja"
    fake.write_text("#!/bin/sh\necho 1.11.1\n")
    fake.chmod(0o755)
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(gpu_env, "CARRIED_NINJA", tmp_path / "absent")
    missing = gpu_env.find_ninja()
    assert missing["status"] == "missing" and ".venv/bin/ninja" in missing["hint"]
    monkeypatch.setattr(gpu_env, "CARRIED_NINJA", fake)
    carried = gpu_env.find_ninja()
    assert carried == {"status": "carried", "path": str(fake), "version": "1.11.1"}
    assert os.environ["PATH"].split(os.pathsep)[0] == str(tmp_path / "bin")
    assert gpu_env.find_ninja()["status"] == "present"  # now on PATH


def test_nvcc_found_under_cuda_home(tmp_path: Path, monkeypatch):
    (tmp_path / "cuda" / "bin").mkdir(parents=True)
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.8, V12.8.93'\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    assert gpu_env.find_nvcc() == {"status": "present", "path": str(nvcc), "version": "12.8", "cuda_home": str(tmp_path / "cuda")}
    assert os.environ["PATH"].startswith(str(nvcc.parent))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nothing"))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    if not Path("/usr/local/cuda/bin/nvcc").exists():
        assert gpu_env.find_nvcc()["status"] == "missing"


def test_cuda_home_is_where_nvcc_says_it_lives(tmp_path: Path, monkeypatch):
    """A wrapper script on PATH (as /usr/local/bin/nvcc here) must not make torch look for the CUDA
    headers and libcudart beside the wrapper."""
    monkeypatch.setattr(gpu_env, "_SCRATCH", tmp_path)
    toolkit = tmp_path / "cuda-12.8"
    wrapper = tmp_path / "wrappers" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release 12.8'\necho '#$ _HERE_={toolkit}/bin'\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", str(wrapper.parent))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    found = gpu_env.find_nvcc()
    assert found["cuda_home"] == os.environ["CUDA_HOME"] == str(toolkit) and found["path"] == str(wrapper)


def test_build_targets_only_the_visible_gpus(monkeypatch):
    for key in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "TORCH_EXTENSIONS_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0) if i else (8, 0))
    env = gpu_env.set_build_env()
    assert env["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0" and env["MAX_JOBS"] == str(os.cpu_count())
    assert Path(env["TORCH_EXTENSIONS_DIR"]).is_relative_to(REPO / ".build")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
    assert gpu_env.set_build_env()["TORCH_CUDA_ARCH_LIST"] == "9.0+PTX"  # what the user set wins


def test_interleaved_timing_alternates_after_separate_warmup():
    calls, now = [], [0.0]

    def fn(name, cost):
        def run():
            calls.append(name)
            now[0] += cost
        return run

    stats = gpu_check.interleaved({"A": fn("A", 1.0), "B": fn("B", 2.0)}, repeats=3, warmup=2, clock=lambda: now[0])
    assert calls == ["A", "A", "B", "B"] + ["A", "B"] * 3
    assert stats["A"]["samples"] == [1.0] * 3 and stats["B"]["median"] == 2.0
    uneven = iter([0, 1, 1, 4, 4, 6])
    stats = gpu_check.interleaved({"A": lambda: None}, repeats=3, warmup=0, clock=lambda: next(uneven))
    assert (stats["A"]["min"], stats["A"]["median"], stats["A"]["max"]) == (1, 2, 3)


def test_report_shows_failures_and_a_failed_build(tmp_path: Path):
    result = {
        "meta": {"date": "2026-01-01", "mode": "quick", "seconds": 12.0},
        "environment": {"torch": "2.x", "torch_cuda": "12.8", "gpus": [{"name": "H100", "capability": "9.0", "memory_gib": 79.6}],
                        "nvcc": {"status": "present", "version": "12.8"}, "ninja": {"status": "missing"},
                        "gsplat": {"how": "carried copy", "version": "1.4.0"}, "modules": {"numpy": "present", "rich": "missing"}},
        "build": {"gsplat": {"ok": False, "seconds": 3.0, "error": "RuntimeError: Ninja is required"}},
        "checks": [{"name": "step cuda:0 vs cpu", "passed": False, "image_max_abs": 0.5, "grad_rel_l2": {"means": 0.3}},
                   {"name": "checkpoint", "passed": True, "image_max_abs": 1e-6}],
        "pytest": {"status": "skipped", "reason": "pytest missing"}, "ok": False,
    }
    paths = gpu_check.write_report(result, tmp_path / "r")
    assert json.loads(paths["json"].read_text())["checks"][0]["name"] == "step cuda:0 vs cpu"
    text = paths["text"].read_text()
    assert "H100 (sm 9.0" in text and "ninja missing" in text and "rich missing" in text
    assert "build gsplat: FAILED: RuntimeError: Ninja is required" in text
    assert "checks: 1 passed, 1 failed" in text and "FAIL step cuda:0 vs cpu: image max 0.5, worst grad rel L2 0.3" in text
    assert "pytest: skipped pytest missing" in text and text.rstrip().endswith("verdict: PROBLEMS in 12 s")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU; the dry run above covers the rest")
def test_quick_gpu_check_passes(tmp_path: Path):
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["ok"]
