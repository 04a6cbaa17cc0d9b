"""Storage of striped aggregate tensors on GPUs: managed (unified) memory, or one plain tensor per member.

Managed mode (`managed_striped_empty`): one `cudaMallocManaged` allocation per tensor from the allocator
in `csrc/cuda`; chunk d is preferred on and prefetched to member d's GPU, every member GPU may access
all of it, and members compute on `chunk_view`s tagged with their own device. Plain mode
(`plain_striped_empty`): one ordinary allocation per member, for machines where managed memory is
unwanted. The CUDA sources are built lazily, only when a GPU exists; importing this module needs
torch alone. `nvcc_compile_check` compiles them without a GPU, which is how CPU machines test them.

Op outputs, which torch allocates per member, become managed memory through
`install_managed_allocator`: a `CUDAPluggableAllocator` over `csrc/cuda/managed_allocator.cu`, which
must replace torch's caching allocator before torch first touches CUDA.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import torch

from ms_splatfacto.backend.build import BUILD_ROOT, CSRC, KernelBuildError, build_extension

EXTENSION_NAME = "ms_splatfacto_cuda"
CUDA_BUILD_DIR = Path(os.environ.get("MS_SPLATFACTO_CUDA_BUILD_DIR", BUILD_ROOT / "cuda"))
"""Where the compiled allocator is cached (set MS_SPLATFACTO_CUDA_BUILD_DIR to move it)."""
DEFAULT_ARCH = "90"
"""Compute capability `nvcc_compile_check` targets by default (H100/H200)."""


ALLOCATOR_SOURCE = CSRC / "cuda" / "managed_allocator.cu"
"""The pluggable allocator's source, built alone into a CUDA-runtime-only library (not the extension)."""
ALLOCATOR_FUNCTIONS = ("ms_managed_malloc", "ms_managed_free")


class CudaUnavailableError(KernelBuildError):
    """The CUDA storage was asked for where no GPU is visible."""


class ManagedAllocatorError(RuntimeError):
    """The managed allocator cannot be installed (CUDA already in use, no GPU, members not GPUs)."""


def cuda_sources() -> list[Path]:
    """Every CUDA source (what the compile check covers)."""
    return sorted((CSRC / "cuda").glob("*.cu"))


def extension_sources() -> list[Path]:
    """The sources of the torch extension (all but the allocator, which is a library of its own)."""
    return [s for s in cuda_sources() if s != ALLOCATOR_SOURCE]


@functools.lru_cache(maxsize=None)
def load_cuda_storage() -> None:
    """Compile (if needed) and load the allocator; afterwards `torch.ops.ms_splatfacto_cuda.*` exist."""
    if not torch.cuda.is_available():
        raise CudaUnavailableError(
            "The CUDA storage needs a GPU, and torch sees none "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). Use CPU members (e.g. --pipeline.model.devices cpu:4)."
        )
    sources = extension_sources()
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


def _gpu_index(device: torch.device | str | int) -> int:
    """Like `_cuda_index` but without asking torch for the current device, which initialises CUDA."""
    device = _device(device)
    if device.type != "cuda":
        raise ManagedAllocatorError(f"The managed allocator serves CUDA members, got {device}")
    return 0 if device.index is None else device.index


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


def build_managed_allocator(build_dir: Path | str | None = None) -> Path:
    """Compile `managed_allocator.cu` into a shared library with nvcc (no GPU, no torch headers needed).

    Returns the library's path; cached under a name carrying the hash of the source and the headers it
    includes, so an edited one is rebuilt. Raises KernelBuildError with nvcc's output when the build fails.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise KernelBuildError("Building the managed allocator needs nvcc on PATH (the CUDA toolkit matching "
                               f"torch.version.cuda = {torch.version.cuda}); a GPU is not needed")
    build_dir = Path(build_dir) if build_dir is not None else CUDA_BUILD_DIR
    headers = sorted((CSRC / "cuda").glob("*.cuh"))  # its #includes, so an edited header rebuilds it too
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in [ALLOCATOR_SOURCE, *headers])).hexdigest()[:16]
    library = build_dir / f"libms_managed_allocator_{digest}.so"
    if library.is_file():
        return library
    build_dir.mkdir(parents=True, exist_ok=True)
    partial = library.with_suffix(f".{os.getpid()}.tmp")
    command = [nvcc, "-shared", "-Xcompiler", "-fPIC", "-O2", "-std=c++17", "-cudart", "shared",
               str(ALLOCATOR_SOURCE), "-o", str(partial)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise KernelBuildError(f"Building the managed allocator failed ({' '.join(command)}):\n{done.stdout}{done.stderr}")
    partial.replace(library)
    return library


def _allocator_library(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.ms_managed_set_members.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    lib.ms_managed_refusal.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                                       ctypes.c_char_p, ctypes.c_size_t]
    lib.ms_managed_would_refuse.argtypes = [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    return lib


def allocator_refusal(lib: ctypes.CDLL, nbytes: int, free_bytes: int, total_bytes: int, device: int) -> str:
    """The allocator's free-memory guard for given numbers: '' when `nbytes` fit, else its message."""
    message = ctypes.create_string_buffer(512)
    lib.ms_managed_refusal(nbytes, free_bytes, total_bytes, device, message, len(message))
    return message.value.decode()


def allocator_would_refuse(lib: ctypes.CDLL, nbytes: int, device: int) -> str:
    """What the allocator would say about `nbytes` on GPU `device` now: '' when it would allocate."""
    message = ctypes.create_string_buffer(512)
    lib.ms_managed_would_refuse(nbytes, device, message, len(message))
    return message.value.decode()


_INSTALLED: list[tuple[int, ...]] = []
"""The member GPUs the installed managed allocator serves (empty until installed)."""


def managed_allocator_installed() -> bool:
    return bool(_INSTALLED)


def install_managed_allocator(devices: Sequence[torch.device | str | int]) -> None:
    """Make torch allocate every CUDA tensor in managed memory (preferred on, and prefetched to, the GPU
    it is allocated for; accessed by every member GPU in `devices`), so op outputs of an aggregate
    tensor on several GPUs are managed like its storage.

    Must run before torch's first CUDA allocation (torch cannot swap an allocator in use): raises
    ManagedAllocatorError if CUDA is already initialised. Installing again for the same GPUs does nothing.
    """
    gpus = tuple(sorted({_gpu_index(d) for d in devices}))
    if _INSTALLED:
        if gpus != _INSTALLED[0]:
            raise ManagedAllocatorError(f"The managed allocator already serves GPUs {list(_INSTALLED[0])}; it cannot be "
                                        f"re-installed for GPUs {list(gpus)} in the same process")
        return
    if not torch.cuda.is_available():
        raise ManagedAllocatorError("The managed allocator needs a GPU, and torch sees none; use CPU members "
                                    "(e.g. --pipeline.model.devices cpu:4)")
    if torch.cuda.is_initialized():
        raise ManagedAllocatorError(
            "The managed allocator must be installed before torch first uses CUDA, and CUDA is already initialised "
            "in this process. Create the aggregate device (or call install_managed_allocator) at startup, before any "
            "tensor is put on a GPU, or use the plain storage mode")
    lib = _allocator_library(build_managed_allocator())
    lib.ms_managed_set_members((ctypes.c_int * len(gpus))(*gpus), len(gpus))
    allocator = torch.cuda.memory.CUDAPluggableAllocator(lib._name, *ALLOCATOR_FUNCTIONS)
    torch.cuda.memory.change_current_allocator(allocator)
    _INSTALLED.append(gpus)


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
