"""Packaging: a second `scripts/setup.sh` runs no package manager, the wheel lists every package, and
`pip install .` (not editable) into a fresh venv builds the CPU kernels from the sources the wheel
carries and trains a step, with the build cached outside site-packages."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

from ms_splatfacto.backend import build

REPO = Path(__file__).resolve().parents[1]
MANAGERS = ("apt-get", "apt", "dpkg", "pip", "pip3")


def stub_bin(folder: Path, log: Path, names=MANAGERS, body: str = "exit 1") -> Path:
    """Executables that log their name to `log`, then run `body` (by default: fail)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = folder / name
        path.write_text(f'#!/bin/sh\necho {name} "$@" >> "{log}"\n{body}\n')
        path.chmod(0o755)
    return folder


def run_setup(repo: Path, stubs: Path) -> subprocess.CompletedProcess:
    """setup.sh with the stubs first on PATH and as its pip."""
    env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "MS_SPLATFACTO_SETUP_PIP": str(stubs / "pip")}
    return subprocess.run(["bash", str(repo / "scripts" / "setup.sh")], capture_output=True, text=True, env=env, timeout=300)


def test_second_setup_runs_no_package_manager(tmp_path):
    log = tmp_path / "calls.log"
    log.touch()
    result = run_setup(REPO, stub_bin(tmp_path / "bin", log))
    assert result.returncode == 0, f"setup.sh failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-3000:]}"
    assert log.read_text() == "", f"a set-up machine ran a package manager:\n{log.read_text()}\n{result.stdout}"
    assert "up to date" in result.stdout


def fake_checkout(tmp_path: Path, stamp: str) -> Path:
    """setup.sh and pyproject.toml beside a .venv whose python only logs, with the given stamp."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", root / "scripts")
    shutil.copy(REPO / "pyproject.toml", root)
    stub_bin(root / ".venv" / "bin", tmp_path / "calls.log", names=["python"], body="exit 0")
    (root / ".venv" / ".ms-splatfacto-installed").write_text(stamp)
    return root


def current_stamp(root: Path) -> str:
    return hashlib.sha256((root / "pyproject.toml").read_bytes() + (root / "scripts" / "setup.sh").read_bytes()).hexdigest() + "\n"


LIBUSB = "\tlibusb-1.0.so.0 (libc6,x86-64) => /lib/x86_64-linux-gnu/libusb-1.0.so.0"
LDCONFIG = {
    "libusb missing": "echo '\tlibc.so.6 (libc6,x86-64) => /lib/libc.so.6'",
    # More than a pipe holds after the match: `ldconfig -p | grep -q` died of SIGPIPE here every time.
    "libusb first of many": f"echo '{LIBUSB}'; seq -f '\tlibx%g.so (libc6,x86-64) => /lib/libx.so' 50000",
}


@pytest.mark.parametrize("case", ["stale stamp", "libusb missing", "libusb first of many"])
def test_setup_calls_a_package_manager_only_when_it_has_work(tmp_path, case):
    """The stubs do see calls (so the check above can fail): with a stale stamp setup calls pip, without
    libusb apt-get; with libusb listed early in a long `ldconfig -p` it calls neither."""
    log = tmp_path / "calls.log"
    log.touch()
    root = fake_checkout(tmp_path, "stale\n")
    stubs = stub_bin(tmp_path / "bin", log)
    if case != "stale stamp":
        (root / ".venv" / ".ms-splatfacto-installed").write_text(current_stamp(root))
        listing = subprocess.run(["sh", "-c", LDCONFIG[case]], capture_output=True, text=True, check=True).stdout
        assert (LIBUSB in listing) == (case == "libusb first of many") and (len(listing) > 1 << 20) == (LIBUSB in listing)
        stub_bin(stubs, log, names=["ldconfig"], body=LDCONFIG[case])
    result = run_setup(root, stubs)
    calls = log.read_text().splitlines()
    if case == "stale stamp":
        assert result.returncode != 0 and calls[0].startswith("pip install"), (calls, result.stdout, result.stderr)
        return
    assert result.returncode == 0, result.stderr
    managers = [c for c in calls if c.split()[0] in MANAGERS]
    assert calls[0] == "ldconfig -p" and calls[-1] == "python -m ms_splatfacto.backend.build", calls
    if case == "libusb missing":
        assert managers == ["apt-get update -qq"] and "could not install libusb-1.0-0" in result.stderr, (calls, result.stderr)
    else:
        assert managers == [], (calls, result.stdout, result.stderr)


def test_pyproject_lists_every_package():
    """Packages are listed in pyproject.toml (csrc is mapped in); a new subpackage must be listed too."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "ms_splatfacto").rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
    assert config["package-dir"] == {"ms_splatfacto._csrc": "csrc"}
    assert {"ms_splatfacto._csrc.cpu", "ms_splatfacto._csrc.cuda"} <= listed


def test_checkout_uses_repo_csrc_and_build_folder(monkeypatch):
    assert not build.PACKAGED and build.CSRC == REPO / "csrc"
    assert build.cpu_sources() and all(s.parent == REPO / "csrc" / "cpu" for s in build.cpu_sources())
    monkeypatch.delenv("MS_SPLATFACTO_CACHE", raising=False)
    assert build.build_root(False) == REPO / ".build"
    monkeypatch.setenv("MS_SPLATFACTO_CACHE", "/somewhere/else")
    assert build.build_root(False) == build.build_root(True) == Path("/somewhere/else")


def test_installed_package_caches_per_user_and_torch_version(monkeypatch, tmp_path):
    import torch

    monkeypatch.delenv("MS_SPLATFACTO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert build.build_root(True) == tmp_path / "ms_splatfacto" / f"{version}-torch{torch.__version__}"


def test_unwritable_cache_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(build.KernelBuildError, match="MS_SPLATFACTO_CACHE"):
        build.build_extension("x", [REPO / "csrc" / "cpu" / "projection.cpp"], blocker / "cpu", "x", "")


TRAIN_ONE_STEP = textwrap.dedent(
    """
    import math, sys
    from pathlib import Path
    from types import SimpleNamespace
    import torch
    import ms_splatfacto
    from ms_splatfacto.backend import build
    from nerfstudio.cameras.cameras import Cameras
    from nerfstudio.data.scene_box import SceneBox
    from ms_splatfacto.model import GAUSSIAN_PARAMS, MsSplatfactoModelConfig

    venv = Path(sys.argv[1]).resolve()
    assert Path(ms_splatfacto.__file__).resolve().is_relative_to(venv), ms_splatfacto.__file__
    assert build.PACKAGED and build.CSRC.is_relative_to(venv), build.CSRC
    print("BUILD_DIR", build.BUILD_DIR)

    torch.manual_seed(0)
    points = torch.randn(300, 3) * torch.tensor([1.5, 1.0, 0.5]) + torch.tensor([0.0, 0.0, -5.0])
    colors = torch.randint(0, 256, (300, 3), dtype=torch.uint8)
    config = MsSplatfactoModelConfig(devices="cpu", kernels="cpu", background_color="black")
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-3.0] * 3, [3.0] * 3])), num_train_data=1,
                         seed_points=(points, colors))
    model.train()
    camera = Cameras(camera_to_worlds=torch.eye(4)[None, :3, :], fx=60.0, fy=60.0, cx=32.0, cy=24.0, width=64, height=48)
    before = {name: model.gauss_params[name].detach().clone() for name in GAUSSIAN_PARAMS}
    optimizers = {name: torch.optim.Adam(ps, lr=1e-2) for name, ps in model.get_gaussian_param_groups().items()}
    model.step_cb(SimpleNamespace(optimizers=optimizers), 0)
    loss = sum(model.get_loss_dict(model.get_outputs(camera), {"image": torch.rand(48, 64, 3)}).values())
    loss.backward()
    for optimizer in optimizers.values():
        optimizer.step()
    model.step_post_backward(0)
    assert math.isfinite(float(loss)), float(loss)
    changed = [name for name in GAUSSIAN_PARAMS if not torch.equal(model.gauss_params[name].detach(), before[name])]
    assert set(changed) >= {"means", "scales", "quats", "features_dc", "opacities"}, changed  # SH degree 0: not features_rest
    print("LOSS", float(loss))
    """
)


def run_checked(args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.mark.slow
def test_pip_install_dot_then_a_training_step_on_cpu(tmp_path):
    # Build from a copy of the sources so the build/ and egg-info folders stay out of the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src)
    for name in ("ms_splatfacto", "csrc"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    run_checked([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", ".", "-w", tmp_path / "wheel"], cwd=src)
    (wheel,) = (tmp_path / "wheel").glob("ms_splatfacto-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    repo_files = {f"ms_splatfacto/_csrc/{p.relative_to(REPO / 'csrc')}" for p in (REPO / "csrc").rglob("*") if p.is_file()}
    repo_files |= {str(p.relative_to(REPO)) for p in (REPO / "ms_splatfacto").rglob("*.py")}
    assert repo_files <= names, f"missing from the wheel: {sorted(repo_files - names)}"

    # A fresh venv that sees the dependencies through a path entry (not their .pth files, so not the
    # editable install's finder either), then the wheel itself.
    venv = tmp_path / "venv"
    run_checked([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", venv])
    (site,) = (venv / "lib").glob("python3*/site-packages")
    deps = Path(sys.executable).parent.parent / "lib" / site.parent.name / "site-packages"
    (site / "deps.pth").write_text(f"{deps}\n")
    run_checked([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index", wheel])

    # Outside the repo, with HOME in tmp: the default cache of an installed package is ~/.cache.
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MS_SPLATFACTO_", "PYTHON", "XDG_CACHE"))}
    env["HOME"] = str(home)
    result = run_checked([venv / "bin" / "python", "-c", TRAIN_ONE_STEP, venv], cwd=work, env=env, timeout=900)
    print(result.stdout)
    cache = home / ".cache" / "ms_splatfacto"
    assert f"BUILD_DIR {cache}/" in result.stdout, result.stdout
    assert list(cache.glob("*/cpu/*/ms_splatfacto_cpu_*.so")), f"no compiled kernels under {cache}"  # keyed by flags and CPU
    assert not list(site.rglob("*.so")), "the build wrote into site-packages"
