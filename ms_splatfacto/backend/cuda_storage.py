"""Storage of striped aggregate tensors on GPUs: managed (unified) memory, or one plain tensor per member.

Managed mode (`managed_striped_empty`): one `cudaMallocManaged` allocation per tensor from the allocator
in `csrc/cuda`; chunk d is preferred on and prefetched to member d's GPU, every member GPU may access
all of it, and members compute on `chunk_view`s tagged with their own device. Plain mode
(`plain_striped_empty`): one ordinary allocation per member, for machines where managed memory is
unwanted. The CUDA sources are built lazily, only when a GPU exists; importing this module needs
torch alone. `nvcc_compile_check` compiles them without a GPU, which is how CPU machines test them.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import torch

from ms_splatfacto.backend.build import CSRC, KernelBuildError, build_extension

EXTENSION_NAME = "ms_splatfacto_cuda"
CUDA_BUILD_DIR = Path(os.environ.get("MS_SPLATFACTO_CUDA_BUILD_DIR", CSRC.parent / ".build" / "cuda"))
"""Where the compiled allocator is cached (set MS_SPLATFACTO_CUDA_BUILD_DIR to move it)."""
DEFAULT_ARCH = "90"
"""Compute capability `nvcc_compile_check` targets by default (H100/H200)."""


class CudaUnavailableError(KernelBuildError):
    """The CUDA storage was asked for where no GPU is visible."""


def cuda_sources() -> list[Path]:
    return sorted((CSRC / "cuda").glob("*.cu"))


@functools.lru_cache(maxsize=None)
def load_cuda_storage() -> None:
    """Compile (if needed) and load the allocator; afterwards `torch.ops.ms_splatfacto_cuda.*` exist."""
    if not torch.cuda.is_available():
        raise CudaUnavailableError(
            "The CUDA storage needs a GPU, and torch sees none "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). Use CPU members (e.g. --pipeline.model.devices cpu:4)."
        )
    sources = cuda_sources()
    print(f"ms-splatfacto: loading the CUDA allocator ({len(sources)} sources; the first build takes a few minutes)...",
          file=sys.stderr, flush=True)
    build_extension(
        EXTENSION_NAME, sources, CUDA_BUILD_DIR, "the CUDA allocator",
        "Check that nvcc matches torch's CUDA version (torch.version.cuda) and that CUDA_HOME points at it.",
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        extra_ldflags=_cudart_link_flags(),
    )


def _cudart_link_flags() -> list[str]:
    """`-L` for the toolkit's libcudart when torch guessed CUDA_HOME wrong.

    Torch derives CUDA_HOME from nvcc's location; a wrapper script such as /usr/local/bin/nvcc makes
    that /usr/local, where no libcudart lies, and the link fails.
    """
    from torch.utils import cpp_extension

    candidates = [cpp_extension.CUDA_HOME, "/usr/local/cuda", f"/usr/local/cuda-{torch.version.cuda}"]
    for home in filter(None, candidates):
        lib = Path(home) / "lib64"
        if (lib / "libcudart.so").exists():
            return [] if home == cpp_extension.CUDA_HOME else [f"-L{lib}"]
    return []


def _ops():
    load_cuda_storage()
    return torch.ops.ms_splatfacto_cuda


def _device(device: torch.device | str | int) -> torch.device:
    """A bare int means a GPU index, as in torch."""
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def _cuda_index(device: torch.device | str | int) -> int:
    device = _device(device)
    if device.type != "cuda":
        raise ValueError(f"Managed storage lives on CUDA devices, got {device}")
    return torch.cuda.current_device() if device.index is None else device.index


def managed_striped_empty(shape: Sequence[int], dtype: torch.dtype, devices: Sequence[torch.device | str | int],
                          row_starts: Sequence[int]) -> torch.Tensor:
    """Uninitialised tensor in one managed allocation, rows striped over `devices`.

    `row_starts[d]` is the first row of member d's chunk (one entry per member, or one more equal to
    shape[0]). The result is tagged with the first member's device; use `chunk_view` for the others.
    Refuses (RuntimeError) when a GPU's chunks need more than its free memory.
    """
    return _ops().managed_striped_empty(list(shape), dtype, [_cuda_index(d) for d in devices], list(row_starts))


def chunk_view(base: torch.Tensor, row_start: int, row_count: int, device: torch.device | str | int) -> torch.Tensor:
    """Rows [row_start, row_start + row_count) of managed `base`, tagged with `device`; keeps `base` alive.

    Torch then runs ops on the view on `device`'s stream, with `device`'s kernels, as the member that
    owns those rows should.
    """
    return _ops().managed_chunk_view(base, row_start, row_count, _cuda_index(device))


def plain_striped_empty(shape: Sequence[int], dtype: torch.dtype, devices: Sequence[torch.device | str | int],
                        row_starts: Sequence[int]) -> list[torch.Tensor]:
    """One ordinary `torch.empty` per member holding its chunk's rows: no managed memory, no remote access.

    Same arguments as `managed_striped_empty`; works for any device type (CPU members included).
    """
    shape = list(shape)
    if not shape:
        raise ValueError("A striped tensor needs at least one dimension (its rows)")
    bounds = list(row_starts) + ([shape[0]] if len(row_starts) == len(devices) else [])
    if len(bounds) != len(devices) + 1 or bounds[0] != 0 or bounds[-1] != shape[0] or any(
            a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"Row starts {list(row_starts)} do not split {shape[0]} rows over {len(devices)} members")
    return [torch.empty([end - start, *shape[1:]], dtype=dtype, device=_device(dev))
            for dev, start, end in zip(devices, bounds, bounds[1:])]


def is_managed(t: torch.Tensor) -> bool:
    """Whether `t`'s data lies in CUDA managed memory."""
    return bool(t.is_cuda and _ops().is_managed(t))


def range_location(base: torch.Tensor, row_start: int, row_count: int) -> tuple[int, int]:
    """(preferred location, last prefetch location) of a row range: a GPU index, -1 host, -2 mixed."""
    preferred, last_prefetch = _ops().managed_range_location(base, row_start, row_count)
    return preferred, last_prefetch


def accessed_by(base: torch.Tensor) -> list[int]:
    """GPU indices set to access all of `base` (cudaMemAdviseSetAccessedBy)."""
    return list(_ops().managed_accessed_by(base))


def nvcc_include_paths() -> list[str]:
    """Torch's and Python's include directories, as torch's extension builder passes them to nvcc."""
    from torch.utils import cpp_extension

    try:
        torch_dirs = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # torch before 2.6: include_paths(cuda=True)
        torch_dirs = cpp_extension.include_paths(cuda=True)
    return [*torch_dirs, sysconfig.get_paths()["include"]]


def nvcc_command(source: Path, output: Path, arch: str = DEFAULT_ARCH, nvcc: str = "nvcc") -> list[str]:
    """The nvcc line compiling one source to an object, with the flags torch's builder would use."""
    from torch.utils import cpp_extension

    common = getattr(cpp_extension, "COMMON_NVCC_FLAGS", ["--expt-relaxed-constexpr"])
    return [
        nvcc, "-c", str(source), "-o", str(output),
        "-std=c++20", "-O3", "-Xcompiler", "-fPIC", *common,
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-DTORCH_EXTENSION_NAME={EXTENSION_NAME}",
        *(f"-I{d}" for d in nvcc_include_paths()),
    ]


def nvcc_compile_check(output_dir: Path | str, arch: str = DEFAULT_ARCH) -> subprocess.CompletedProcess:
    """Compile every `csrc/cuda/*.cu` to `output_dir/<name>.o` with nvcc directly; needs no GPU.

    Stops at the first failing source. The result's `args` lists every command run, its output
    joins theirs, and its return code is the first non-zero one (0 when all compiled).
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc is not on PATH; install the CUDA toolkit matching torch.version.cuda")
    sources = cuda_sources()
    if not sources:
        raise KernelBuildError(f"No CUDA sources found under {CSRC / 'cuda'}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    commands, stdout, stderr, returncode = [], [], [], 0
    for source in sources:
        command = nvcc_command(source, output_dir / f"{source.stem}.o", arch=arch, nvcc=nvcc)
        done = subprocess.run(command, capture_output=True, text=True)
        commands.append(command)
        stdout.append(done.stdout)
        stderr.append(done.stderr)
        if done.returncode != 0:
            returncode = done.returncode
            break
    return subprocess.CompletedProcess(commands, returncode, "".join(stdout), "".join(stderr))


if __name__ == "__main__":
    load_cuda_storage()
    print("ms-splatfacto: CUDA allocator ready:", ", ".join(sorted(n for n in dir(torch.ops.ms_splatfacto_cuda) if not n.startswith("_"))))
