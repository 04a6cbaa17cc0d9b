"""The CUDA storage extension's build: its sources compile with this machine's nvcc against the installed
torch (no GPU needed), torch's builder links and loads it into a folder named by a hash of its sources,
a later process loads that library without nvcc or torch's builder, and the module imports with torch
alone. What the extension does on a GPU is in test_managed_storage.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ms_splatfacto.backend import cuda_storage

REPO = Path(__file__).resolve().parents[1]
OPS = ["managed_alloc", "managed_advise", "managed_prefetch", "managed_view", "is_managed", "managed_location",
       "managed_accessed_by"]
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None,
                                reason="nvcc is not on PATH: building needs the CUDA toolkit (not a GPU)")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH: the CUDA compile check needs the CUDA toolkit (not a GPU)")
    out = tmp_path_factory.mktemp("cuda_objects")
    start = time.perf_counter()
    result = cuda_storage.nvcc_compile_check(out)
    print(f"nvcc compile of {len(cuda_storage.cuda_sources())} sources: {time.perf_counter() - start:.1f} s")
    return out, result


def test_cuda_sources_compile(compiled):
    out, result = compiled
    assert result.returncode == 0, f"nvcc failed:\n{result.stdout[-3000:]}\n{result.stderr[-8000:]}"
    assert [s.name for s in cuda_storage.cuda_sources()] == ["managed_storage.cu"]  # no process-wide allocator
    for source in cuda_storage.cuda_sources():
        obj = out / f"{source.stem}.o"
        assert obj.is_file() and obj.stat().st_size > 0, f"no object file for {source.name}"
    assert any("-gencode=arch=compute_90,code=sm_90" in command for command in result.args)


def test_object_registers_the_operators(compiled):
    out, result = compiled
    assert result.returncode == 0
    data = (out / "managed_storage.o").read_bytes()
    for op in OPS:
        assert f"{op}(".encode() in data, f"schema of {op} missing from the object"
    if shutil.which("nm") is None:
        pytest.skip("nm is absent: symbol check skipped (schemas were checked)")
    symbols = subprocess.run(["nm", "-C", str(out / "managed_storage.o")], capture_output=True, text=True, check=True).stdout
    assert "TORCH_LIBRARY_FRAGMENT_init_ms_splatfacto_cuda" in symbols
    for op in OPS:
        assert f"T ms_splatfacto::cuda::{op}(" in symbols, f"{op} is not defined in the object"
    assert "cudaMemPrefetchBatchAsync" in symbols or torch.version.cuda < "13", "CUDA 13 prefetches in batches"


def test_library_path_carries_a_hash_of_the_sources(tmp_path, monkeypatch):
    """An edited source or header gets a new folder, so a stale library is never loaded."""
    csrc = tmp_path / "csrc"
    shutil.copytree(cuda_storage.CSRC / "cuda", csrc / "cuda")
    monkeypatch.setattr(cuda_storage, "CSRC", csrc)
    before = cuda_storage.extension_library(tmp_path / "build")
    assert before.parent.parent == tmp_path / "build" and before.name == "ms_splatfacto_cuda.so"
    assert before.parent.name == f"ms_splatfacto_cuda-{cuda_storage.source_digest()}"
    assert cuda_storage.extension_library(tmp_path / "build") == before  # stable
    header = csrc / "cuda" / "mem_location.cuh"
    header.write_text(header.read_text() + "\n// edited\n")
    assert cuda_storage.extension_library(tmp_path / "build") != before


LOAD = """
import sys, torch, torch.utils.cpp_extension
from unittest import mock
from ms_splatfacto.backend import cuda_storage
if sys.argv[1] == "prebuilt":  # neither nvcc nor torch's builder may run
    cuda_storage.build_extension = mock.Mock(side_effect=AssertionError("the builder ran"))
    torch.utils.cpp_extension.load = mock.Mock(side_effect=AssertionError("torch's JIT builder ran"))
print("LIBRARY", cuda_storage.load_extension())
for op in {ops!r}:
    print(getattr(torch.ops.ms_splatfacto_cuda, op).default._schema)
try:
    torch.ops.ms_splatfacto_cuda.managed_alloc(4096, 2 << 20, 0)
except RuntimeError as err:
    print("ERROR", err)
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The extension built by torch's builder (as on a GPU machine) into a fresh cache folder."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH: building the extension needs the CUDA toolkit (not a GPU)")
    build_dir = tmp_path_factory.mktemp("cuda_build")
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": "9.0", "MS_SPLATFACTO_CUDA_BUILD_DIR": str(build_dir)}
    done = subprocess.run([sys.executable, "-c", LOAD.format(ops=OPS), "build"], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=900)
    return build_dir, env, done


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the GPU tests build and load the extension")
def test_extension_links_and_registers_without_gpu(built):
    """torch's own builder compiles, links and loads the extension; calls then fail with the CUDA call
    named instead of crashing."""
    build_dir, _, done = built
    assert done.returncode == 0, done.stderr[-8000:]
    assert f"LIBRARY {build_dir}/ms_splatfacto_cuda-" in done.stdout
    assert "ms_splatfacto_cuda::managed_view(Tensor base, int byte_offset, int[] shape, ScalarType dtype, " \
           "int device_index) -> Tensor" in done.stdout
    for op in OPS:
        assert f"ms_splatfacto_cuda::{op}(" in done.stdout
    assert "ERROR ms_splatfacto_cuda: cudaGetDeviceCount" in done.stdout


def test_prebuilt_extension_loads_without_nvcc(built):
    """A process with no nvcc on PATH loads the library the first one built, and never calls a builder."""
    build_dir, env, done = built
    assert done.returncode == 0, done.stderr[-8000:]
    library = next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("LIBRARY "))
    path = os.pathsep.join(d for d in env["PATH"].split(os.pathsep) if d and shutil.which("nvcc", path=d) is None)
    assert shutil.which("nvcc", path=path) is None
    again = subprocess.run([sys.executable, "-c", LOAD.format(ops=OPS), "prebuilt"], capture_output=True, text=True,
                           env={**env, "PATH": path}, cwd=REPO, timeout=300)
    assert again.returncode == 0, again.stderr[-8000:]
    assert f"LIBRARY {library}" in again.stdout
    for op in OPS:
        assert f"ms_splatfacto_cuda::{op}(" in again.stdout


def test_imports_with_torch_alone_and_builds_nothing():
    code = ("import sys, torch; import ms_splatfacto.backend.cuda_storage as s; "
            "import ms_splatfacto.backend.aggregate.storage, ms_splatfacto.backend.managed_plan; "
            "assert 'nerfstudio' not in sys.modules; assert s.load_cuda_storage.cache_info().currsize == 0; "
            "assert not hasattr(torch.ops.ms_splatfacto_cuda, 'managed_alloc')")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, cwd=REPO,
                   timeout=120)


def test_managed_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cuda_storage.load_cuda_storage.cache_clear()
    try:
        with pytest.raises(cuda_storage.CudaUnavailableError, match="needs a GPU.*storage plain"):
            cuda_storage.managed_chunks([3], torch.float32, [8, 8], ["cuda:0", "cuda:0"])
    finally:
        cuda_storage.load_cuda_storage.cache_clear()
