"""The CUDA storage layer: its sources compile with this machine's nvcc against the installed torch
(no GPU needed), its module imports and fails clearly without a GPU, and, where a GPU exists, managed
allocations are striped, placed and viewed as promised."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ms_splatfacto.backend import cuda_storage
from ms_splatfacto.backend.build import KernelBuildError
from ms_splatfacto.backend.cuda_storage import (
    CudaUnavailableError,
    chunk_view,
    managed_striped_empty,
    plain_striped_empty,
)

REPO = Path(__file__).resolve().parents[1]
OPS = ["managed_striped_empty", "managed_chunk_view", "is_managed", "managed_range_location", "managed_accessed_by"]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


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
    for source in cuda_storage.cuda_sources():
        obj = out / f"{source.stem}.o"
        assert obj.is_file() and obj.stat().st_size > 0, f"no object file for {source.name}"


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


LOAD_WITHOUT_GPU = """
import torch
from unittest import mock
from ms_splatfacto.backend import cuda_storage
with mock.patch.object(torch.cuda, "is_available", lambda: True):  # build and load as a GPU machine would
    cuda_storage.load_cuda_storage()
for op in {ops!r}:
    print(getattr(torch.ops.ms_splatfacto_cuda, op).default._schema)
try:
    cuda_storage.managed_striped_empty([4, 2], torch.float32, [0], [0])
except RuntimeError as err:
    print("ERROR", err)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the GPU tests build and load the extension")
def test_extension_links_and_registers_without_gpu(tmp_path):
    """torch's own builder (as used on GPU machines) compiles, links and loads the allocator; calls then
    fail with the CUDA call named instead of crashing."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH: building the extension needs the CUDA toolkit (not a GPU)")
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": "9.0", "MS_SPLATFACTO_CUDA_BUILD_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_GPU.format(ops=OPS)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stderr[-8000:]
    assert "ms_splatfacto_cuda::managed_striped_empty(int[] shape, ScalarType dtype, int[] member_device_indices, " \
           "int[] chunk_row_starts) -> Tensor" in done.stdout
    for op in OPS:
        assert f"ms_splatfacto_cuda::{op}(" in done.stdout
    assert "ERROR ms_splatfacto_cuda: cudaGetDeviceCount" in done.stdout


def test_imports_with_torch_alone_and_builds_nothing():
    code = ("import sys, torch; import ms_splatfacto.backend.cuda_storage as s; "
            "assert 'nerfstudio' not in sys.modules; assert s.load_cuda_storage.cache_info().currsize == 0")
    subprocess.run([sys.executable, "-c", code], check=True, env={"CUDA_VISIBLE_DEVICES": ""}, cwd=REPO, timeout=120)


def test_managed_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cuda_storage.load_cuda_storage.cache_clear()
    try:
        with pytest.raises(CudaUnavailableError, match="needs a GPU"):
            managed_striped_empty([8, 3], torch.float32, ["cuda:0"], [0])
        with pytest.raises(KernelBuildError):
            chunk_view(torch.empty(4), 0, 2, "cuda:0")
    finally:
        cuda_storage.load_cuda_storage.cache_clear()


def test_plain_mode_on_cpu_members():
    parts = plain_striped_empty([10, 3, 2], torch.float16, ["cpu", "cpu", "cpu"], [0, 4, 7])
    assert [tuple(p.shape) for p in parts] == [(4, 3, 2), (3, 3, 2), (3, 3, 2)]
    assert all(p.dtype == torch.float16 and p.device.type == "cpu" for p in parts)
    assert [tuple(p.shape) for p in plain_striped_empty([2, 5], torch.float32, ["cpu"] * 3, [0, 1, 2, 2])] == [(1, 5), (1, 5), (0, 5)]
    with pytest.raises(ValueError, match="do not split"):
        plain_striped_empty([10, 3], torch.float32, ["cpu", "cpu"], [0, 11])
    with pytest.raises(ValueError, match="do not split"):
        plain_striped_empty([10, 3], torch.float32, ["cpu", "cpu"], [1, 5])


# --- on a GPU -------------------------------------------------------------------------------------------

ROW = 1024  # float32 per row: 4 KiB, so chunks of PAGE_ROWS rows are 2 MiB, whole pages
PAGE_ROWS = 512


def gpu_members() -> list[int]:
    """Every GPU, or four virtual members on the only one (the `cuda:0*4` case)."""
    n = torch.cuda.device_count()
    return list(range(n)) if n > 1 else [0, 0, 0, 0]


def even_starts(rows: int, members: int) -> list[int]:
    return [rows * d // members for d in range(members)]


@needs_gpu
def test_managed_allocation_is_one_striped_managed_tensor():
    members = gpu_members()
    rows = PAGE_ROWS * len(members)
    base = managed_striped_empty([rows, ROW], torch.float32, members, even_starts(rows, len(members)))
    torch.cuda.synchronize()
    assert base.shape == (rows, ROW) and base.dtype == torch.float32 and base.is_contiguous()
    assert base.device == torch.device("cuda", members[0])
    assert cuda_storage.is_managed(base)
    assert not cuda_storage.is_managed(torch.empty(4, device="cuda"))
    assert sorted(cuda_storage.accessed_by(base)) == sorted(set(members))
    for d, gpu in enumerate(members):
        preferred, prefetched = cuda_storage.range_location(base, d * PAGE_ROWS, PAGE_ROWS)
        assert (preferred, prefetched) == (gpu, gpu), f"chunk {d}"


@needs_gpu
def test_chunk_views_are_on_their_member_and_write_through():
    members = gpu_members()
    rows = 1000  # uneven, unaligned chunks
    starts = even_starts(rows, len(members))
    bounds = [*starts, rows]
    base = managed_striped_empty([rows, 3], torch.int64, [f"cuda:{m}" for m in members], starts)
    views = [chunk_view(base, a, b - a, gpu) for gpu, a, b in zip(members, bounds, bounds[1:])]
    for d, (view, gpu, a, b) in enumerate(zip(views, members, bounds, bounds[1:])):
        assert view.device == torch.device("cuda", gpu) and view.shape == (b - a, 3)
        assert view.data_ptr() == base.data_ptr() + a * 3 * 8
        with torch.cuda.device(gpu):
            view.copy_(torch.arange(a * 3, b * 3, device=view.device).view(-1, 3) + d)
    for gpu in set(members):
        torch.cuda.synchronize(gpu)
    expected = torch.arange(rows * 3).view(rows, 3)
    for d, (a, b) in enumerate(zip(bounds, bounds[1:])):
        expected[a:b] += d
    assert torch.equal(base.cpu(), expected)

    del base
    gc.collect()
    assert torch.equal(views[-1].cpu(), expected[bounds[-2]:])  # the views keep the allocation alive


@needs_gpu
def test_managed_edge_cases_and_refusals():
    members = gpu_members()
    empty = managed_striped_empty([0, 5], torch.float32, members, [0] * len(members))
    assert empty.shape == (0, 5) and empty.is_cuda
    few = managed_striped_empty([2], torch.float32, members, even_starts(2, len(members)))  # some chunks empty
    assert few.shape == (2,)
    with pytest.raises(RuntimeError, match="must not decrease"):
        managed_striped_empty([10, 3], torch.float32, [0, 0, 0], [0, 6, 4])
    with pytest.raises(RuntimeError, match="must cover"):
        managed_striped_empty([10, 3], torch.float32, [0, 0], [0, 4, 11])
    with pytest.raises(RuntimeError, match="does not exist"):
        managed_striped_empty([10, 3], torch.float32, [torch.cuda.device_count()], [0])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ordinary_memory_is_not_retagged():
    with pytest.raises(RuntimeError, match="only a managed tensor"):
        chunk_view(torch.empty(4, 2, device="cuda:0"), 0, 2, 1)


@needs_gpu
def test_managed_refuses_more_than_a_gpu_has_free():
    free, _ = torch.cuda.mem_get_info(0)
    rows = free // (ROW * 4) + PAGE_ROWS  # one chunk larger than GPU 0's free memory
    with pytest.raises(RuntimeError, match="bytes free"):
        managed_striped_empty([rows, ROW], torch.float32, [0], [0])


@needs_gpu
def test_plain_mode_on_gpus():
    members = gpu_members()
    parts = plain_striped_empty([100, 4], torch.float32, members, even_starts(100, len(members)))
    assert [p.device for p in parts] == [torch.device("cuda", m) for m in members]
    assert sum(p.shape[0] for p in parts) == 100
    assert not any(cuda_storage.is_managed(p) for p in parts)


# --- the managed allocator (torch.cuda.memory.CUDAPluggableAllocator) ---------------------------------

ALLOCATOR_SYMBOLS = ["ms_managed_malloc", "ms_managed_free", "ms_managed_set_members", "ms_managed_would_refuse",
                     "ms_managed_refusal"]


def test_allocator_object_exports_the_c_functions(compiled):
    out, result = compiled
    assert result.returncode == 0
    if shutil.which("nm") is None:
        pytest.skip("nm is absent: symbol check skipped")
    symbols = subprocess.run(["nm", str(out / "managed_allocator.o")], capture_output=True, text=True, check=True).stdout
    for name in ALLOCATOR_SYMBOLS:
        assert f"T {name}\n" in symbols, f"{name} is not exported unmangled"


@pytest.fixture(scope="module")
def allocator_library(tmp_path_factory):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH: building the allocator needs the CUDA toolkit (not a GPU)")
    start = time.perf_counter()
    path = cuda_storage.build_managed_allocator(tmp_path_factory.mktemp("allocator"))
    print(f"managed allocator library built in {time.perf_counter() - start:.1f} s")
    return path


def test_allocator_library_builds_links_and_guards(allocator_library):
    """The library CUDAPluggableAllocator loads: built without a GPU, cached, loadable with ctypes; its
    free-memory guard refuses what does not fit with a message naming the GPU and the numbers."""
    assert cuda_storage.build_managed_allocator(allocator_library.parent) == allocator_library  # cached
    lib = cuda_storage._allocator_library(allocator_library)
    for name in ALLOCATOR_SYMBOLS:
        assert getattr(lib, name) is not None
    assert cuda_storage.allocator_refusal(lib, 100, 100, 1000, 0) == ""
    message = cuda_storage.allocator_refusal(lib, 101, 100, 1000, 3)
    assert "refusing 101 bytes on cuda:3, which has only 100 bytes free (of 1000)" in message
    if not torch.cuda.is_available():
        assert "cudaGetDeviceCount(&count) failed" in cuda_storage.allocator_would_refuse(lib, 1 << 20, 0)


def test_install_refuses_clearly(monkeypatch):
    monkeypatch.setattr(cuda_storage, "_INSTALLED", [])
    with pytest.raises(cuda_storage.ManagedAllocatorError, match="serves CUDA members"):
        cuda_storage.install_managed_allocator(["cpu"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(cuda_storage.ManagedAllocatorError, match="needs a GPU"):
        cuda_storage.install_managed_allocator(["cuda:0", "cuda:1"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(cuda_storage.ManagedAllocatorError, match="before torch first uses CUDA"):
        cuda_storage.install_managed_allocator(["cuda:0", "cuda:1"])
    assert not cuda_storage.managed_allocator_installed()


INSTALLED_ON_GPU = """
import torch
from ms_splatfacto.backend import cuda_storage
cuda_storage.install_managed_allocator(["cuda:0"])
cuda_storage.install_managed_allocator(["cuda:0"])  # again, same GPUs: nothing to do
x = torch.randn(1 << 20, device="cuda:0") * 2  # op outputs come from the managed allocator
torch.cuda.synchronize()
assert cuda_storage.is_managed(x), "not managed"
assert cuda_storage.accessed_by(x) == [0], cuda_storage.accessed_by(x)
assert cuda_storage.range_location(x.view(-1, 1024), 0, x.numel() // 1024) == (0, 0)
free, _ = torch.cuda.mem_get_info(0)
try:
    torch.empty(free + (1 << 30), dtype=torch.uint8, device="cuda:0")
except RuntimeError as err:
    print("REFUSED", err)
try:
    cuda_storage.install_managed_allocator(["cuda:0", "cuda:1"])
except cuda_storage.ManagedAllocatorError as err:
    print("SECOND", err)
print("OK")
"""


@needs_gpu
def test_managed_allocator_on_a_gpu():
    """In a fresh process (torch must not have touched CUDA): torch's CUDA tensors are managed,
    preferred on and prefetched to their GPU, and too-large requests are refused, not attempted."""
    done = subprocess.run([sys.executable, "-c", INSTALLED_ON_GPU], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stderr[-8000:]
    assert "OK" in done.stdout
    assert "REFUSED" in done.stdout and "bytes free" in done.stdout
    assert "SECOND" in done.stdout and "cannot be re-installed" in done.stdout
