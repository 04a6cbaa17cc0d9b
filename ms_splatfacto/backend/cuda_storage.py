"""Managed (unified) memory for the persistent rows of aggregate tensors on GPUs.

`managed_chunks` makes one `cudaMallocManaged` allocation per tensor through our extension
(`csrc/cuda`), wrapped with `from_blob` and a deleter: member d's chunk starts on a page, is preferred
on member d's GPU (or on the host when that GPU is full: oversubscription), may be accessed by every
member GPU, and is prefetched where it is preferred; each chunk is a tensor tagged with its member's
device. `prefetch` moves the pages of the rows a member will read to its GPU in one batched call.
The decisions (offsets, placement, prefetch ranges) are made in `managed_plan.py`, testable on the CPU.

Nothing is installed process-wide: transients stay on torch's caching allocator and its statistics
(`torch.cuda.max_memory_allocated`, ...) keep working; managed bytes are not among them.

The extension is built on first use, only where a GPU exists, into a folder whose name carries a hash
of its sources and of torch's version, and later processes load that library directly (no nvcc). A
wheel or container can build it ahead of time with `python -m ms_splatfacto.backend.cuda_storage`
(no GPU needed). Importing this module needs torch alone; `nvcc_compile_check` compiles the sources
without a GPU, which is how CPU machines test them.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from ms_splatfacto.backend import managed_plan
from ms_splatfacto.backend.build import BUILD_ROOT, CSRC, KernelBuildError, build_extension
from ms_splatfacto.backend.managed_plan import HOST, MAX_PREFETCH_RANGES, PAGE_BYTES, Span

log = logging.getLogger(__name__)

EXTENSION_NAME = "ms_splatfacto_cuda"
CUDA_BUILD_DIR = Path(os.environ.get("MS_SPLATFACTO_CUDA_BUILD_DIR", BUILD_ROOT / "cuda"))
"""Where the compiled extension is cached (set MS_SPLATFACTO_CUDA_BUILD_DIR to move it)."""
DEFAULT_ARCH = "90"
"""Compute capability `nvcc_compile_check` targets by default (H100/H200). The extension itself holds
host code only (no kernels), so one build serves every GPU generation."""
BUILD_FLAGS = {"extra_cflags": ["-O3"], "extra_cuda_cflags": ["-O3"]}


class CudaUnavailableError(KernelBuildError):
    """The CUDA storage was asked for where no GPU is visible."""


def cuda_sources() -> list[Path]:
    """Every CUDA source (what the extension is built from and the compile check covers)."""
    return sorted((CSRC / "cuda").glob("*.cu"))


def source_digest() -> str:
    """Hash of the sources, their headers, the build flags and torch's version (its ABI)."""
    files = sorted([*cuda_sources(), *(CSRC / "cuda").glob("*.h"), *(CSRC / "cuda").glob("*.cuh")])
    h = hashlib.sha256(f"{torch.__version__} cuda {torch.version.cuda} {sorted(BUILD_FLAGS.items())}".encode())
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def extension_library(build_dir: Path | str | None = None) -> Path:
    """Where the library for the current sources is (or will be) built."""
    root = Path(build_dir) if build_dir is not None else CUDA_BUILD_DIR
    return root / f"{EXTENSION_NAME}-{source_digest()}" / f"{EXTENSION_NAME}.so"


def load_extension(build_dir: Path | str | None = None) -> Path:
    """Load the extension, building it first when no library for the current sources exists.

    A library already built is loaded with `torch.ops.load_library`: neither torch's JIT builder nor
    nvcc runs. Needs no GPU (loading is not using). Returns the library's path."""
    library = extension_library(build_dir)
    if library.is_file():
        try:
            torch.ops.load_library(str(library))
        except OSError as err:
            raise KernelBuildError(f"Cannot load the prebuilt CUDA storage extension {library} ({err}); "
                                   f"delete {library.parent} to rebuild it") from err
        return library
    print(f"ms-splatfacto: building the CUDA storage extension into {library.parent} (a few minutes, once)...",
          file=sys.stderr, flush=True)
    build_extension(
        EXTENSION_NAME, cuda_sources(), library.parent, "the CUDA storage extension",
        "Check that nvcc matches torch's CUDA version (torch.version.cuda) and that CUDA_HOME points at it, "
        "or use --pipeline.model.storage plain.",
        extra_ldflags=_cudart_link_flags(),
        **BUILD_FLAGS,
    )
    return library


@functools.lru_cache(maxsize=None)
def load_cuda_storage() -> None:
    """Load (building if needed) the extension where a GPU exists; afterwards `torch.ops.ms_splatfacto_cuda.*` exist."""
    if not torch.cuda.is_available():
        raise CudaUnavailableError(
            "Managed storage needs a GPU, and torch sees none "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); use --pipeline.model.storage plain."
        )
    load_extension()


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


def gpu_index(device: torch.device | str | int) -> int:
    """The GPU index of a CUDA device (a bare int is an index, as in torch)."""
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"Managed storage lives on CUDA devices, got {device}")
    return torch.cuda.current_device() if device.index is None else device.index


_HOST_PLACED: set = set()
"""GPUs whose rows went to host memory at least once (logged once each)."""


def placement(sizes: Sequence[int], gpus: Sequence[int]) -> List[int]:
    """Where chunks of `sizes` bytes owned by `gpus` go (a GPU or HOST), given the GPUs' free memory now."""
    budgets = {}
    for gpu in set(gpus):
        free, total = torch.cuda.mem_get_info(gpu)
        budgets[gpu] = managed_plan.budget(free, total)
    locations = managed_plan.place(sizes, gpus, budgets)
    for gpu, loc in zip(gpus, locations):
        if loc == HOST and gpu not in _HOST_PLACED:
            _HOST_PLACED.add(gpu)
            log.warning("ms-splatfacto: cuda:%d is full (%.2f GiB left for managed rows, %d%% of it kept for "
                        "transients); rows that do not fit now live in host memory and are read over the "
                        "interconnect (logged once per GPU)", gpu, budgets[gpu] / 2**30,
                        round(100 * managed_plan.HEADROOM_FRACTION))
    return locations


def managed_chunks(row_shape: Sequence[int], dtype: torch.dtype, counts: Sequence[int],
                   gpus: Sequence[torch.device | str | int]) -> List[torch.Tensor]:
    """Uninitialised chunks of `counts[d]` rows of `row_shape` for members on `gpus[d]`, in one managed
    allocation: chunk d starts on a page, is preferred on (and prefetched to) its GPU, or the host when
    that GPU is full, every member GPU may access all of it, and it is tagged with its member's device.
    Members sharing a GPU (virtual members) get chunks on it; the chunks keep the allocation alive."""
    assert len(counts) == len(gpus) > 0, (counts, gpus)
    gpus = [gpu_index(g) for g in gpus]
    row_bytes = math.prod(row_shape) * dtype.itemsize
    spans, total = managed_plan.chunk_spans(counts, row_bytes)
    if total == 0:
        return [torch.empty((n, *row_shape), dtype=dtype, device=torch.device("cuda", g)) for n, g in zip(counts, gpus)]
    ops = _ops()
    locations = placement([size for _, size in spans], gpus)
    extents = [managed_plan.align_up(size) for _, size in spans]  # whole pages: the padding is the chunk's
    base = ops.managed_alloc(total, PAGE_BYTES, gpus[0])
    ops.managed_advise(base, [offset for offset, _ in spans], extents, locations, sorted(set(gpus)))
    for loc in sorted(set(locations)):
        mine = [(base.data_ptr() + offset, extent) for (offset, _), extent, where in zip(spans, extents, locations)
                if where == loc and extent]
        ops.managed_prefetch([a for a, _ in mine], [n for _, n in mine], loc)
    return [ops.managed_view(base, offset, [n, *row_shape], dtype, g) for (offset, _), n, g in zip(spans, counts, gpus)]


def managed_empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str | int) -> torch.Tensor:
    """An uninitialised `shape` tensor in managed memory on one GPU (or in host memory when it is full)."""
    assert len(shape) >= 1, "a managed tensor has rows"
    return managed_chunks(shape[1:], dtype, [shape[0]], [device])[0]


def prefetch(reads: Iterable[Tuple[torch.Tensor, Optional[torch.Tensor]]], device: torch.device | str | int,
             max_ranges: int = MAX_PREFETCH_RANGES) -> List[Span]:
    """Move the pages of the rows a member will read to its GPU before its kernels run, in one call.

    `reads` pairs a managed chunk ([n, ...], contiguous) with the rows of it to be read ([K] CPU
    indices, chunk-local; None for all). Chunks preferred on the host stay there: pulling them onto a
    full GPU would evict other rows. Runs on `device`'s current stream; returns the (address, bytes)
    ranges prefetched."""
    ranges: List[Span] = []
    for chunk, rows in reads:
        assert chunk.dim() >= 1 and chunk.is_contiguous(), "prefetch reads whole rows of a contiguous chunk"
        if chunk.numel() == 0 or location(chunk)[0] == HOST:
            continue
        row_bytes = chunk.nbytes // chunk.shape[0]
        ranges += managed_plan.rows_to_prefetch(rows, chunk.shape[0], row_bytes, chunk.data_ptr(), max_ranges=max_ranges)
    if ranges:
        _ops().managed_prefetch([a for a, _ in ranges], [n for _, n in ranges], gpu_index(device))
    return ranges


def is_managed(t: torch.Tensor) -> bool:
    """Whether `t`'s data lies in CUDA managed memory."""
    return bool(t.is_cuda and _ops().is_managed(t))


def location(t: torch.Tensor) -> Tuple[int, int]:
    """(preferred location, last prefetch location) of managed `t`'s bytes: a GPU, HOST (-1), -2 mixed."""
    preferred, last_prefetch = _ops().managed_location(t)
    return preferred, last_prefetch


def accessed_by(t: torch.Tensor) -> List[int]:
    """GPU indices set to access `t`'s bytes (cudaMemAdviseSetAccessedBy)."""
    return list(_ops().managed_accessed_by(t))


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
    built = load_extension()
    print(f"ms-splatfacto: CUDA storage extension ready in {built}:",
          ", ".join(sorted(n for n in dir(torch.ops.ms_splatfacto_cuda) if not n.startswith("_"))))
