"""Lazy build of the C++ CPU kernels in `csrc/cpu` with torch's extension builder.

Each source registers its operators under `torch.ops.ms_splatfacto`. The build happens on first
use (or ahead of time with `python -m ms_splatfacto.backend.build`), is cached by torch under
`BUILD_DIR`, and is rebuilt only when a source changes.

The sources are `csrc/` at the top of a checkout (editable installs too); a wheel carries them as
`ms_splatfacto/_csrc` (see pyproject.toml). A checkout caches builds in `<repo>/.build`; an installed
package cannot count on writing to site-packages, so it caches in `$MS_SPLATFACTO_CACHE` or
`~/.cache/ms_splatfacto/<version>-torch<version>` (a torch upgrade must not load stale binaries).

The kernels are compiled for the host CPU (`-march=native`), so the cache is keyed by the compiler
flags and the host CPU (`cpu_build_key`): a build made on another CPU, or with other flags, sits in
another folder under another name and is never loaded. `MS_SPLATFACTO_MARCH` overrides the target
(e.g. `x86-64-v2` for a portable build; empty for none).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import List

import torch

_PACKAGE = Path(__file__).resolve().parents[1]
PACKAGED = (_PACKAGE / "_csrc").is_dir()
"""True in an installed wheel (sources shipped inside the package), False in a checkout."""
CSRC = _PACKAGE / "_csrc" if PACKAGED else _PACKAGE.parent / "csrc"
EXTENSION_NAME = "ms_splatfacto_cpu"


def build_root(packaged: bool) -> Path:
    """`$MS_SPLATFACTO_CACHE` if set, else `<repo>/.build` in a checkout, else a per-user cache folder."""
    if os.environ.get("MS_SPLATFACTO_CACHE"):
        return Path(os.environ["MS_SPLATFACTO_CACHE"])
    if not packaged:
        return CSRC.parent / ".build"
    try:
        version = metadata.version("ms-splatfacto")
    except metadata.PackageNotFoundError:
        version = "unknown"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ms_splatfacto" / f"{version}-torch{torch.__version__}"


BUILD_ROOT = build_root(PACKAGED)
"""Where compiled kernels are cached, one folder per extension."""
BUILD_DIR = Path(os.environ.get("MS_SPLATFACTO_BUILD_DIR", BUILD_ROOT / "cpu"))
"""Where the compiled kernels are cached (set MS_SPLATFACTO_BUILD_DIR to move it)."""


class KernelBuildError(RuntimeError):
    """The C++ kernels could not be compiled or loaded."""


def cpu_flags() -> List[str]:
    """Compiler flags of the CPU kernels. -ffp-contract=off: no FMA contraction, so a value rounds the
    same whichever code path (vector body, scalar tail, forward or backward sweep) computes it."""
    march = os.environ.get("MS_SPLATFACTO_MARCH", "native")
    return ["-O3", "-fopenmp", "-ffp-contract=off"] + ([f"-march={march}"] if march else [])


def host_cpu() -> str:
    """What -march=native compiles for: the CPU model and its feature flags (Linux), else the platform's
    description of the processor."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    fields = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("vendor_id", "model name", "cpu family", "model", "flags", "Features", "CPU part") and key not in fields:
            fields[key] = value.strip()
    return f"{platform.machine()} " + " | ".join(f"{k}={v}" for k, v in sorted(fields.items()))


def cpu_build_key(flags: List[str]) -> str:
    """12 hex digits naming a build of the CPU kernels: the flags, and the host CPU when they target it."""
    native = any(f in ("-march=native", "-mcpu=native") for f in flags)
    text = " ".join(flags) + ("\n" + host_cpu() if native else "")
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cpu_sources() -> list[Path]:
    """Every `csrc/cpu/*.cpp` (a new source joins the build by being there). Headers (`*.h`) are not
    listed: torch hashes the listed sources, and ninja's depfiles rebuild whatever includes a changed
    header; the wheel ships both (pyproject's package data)."""
    return sorted((CSRC / "cpu").glob("*.cpp"))


def build_extension(name: str, sources: List[Path], build_dir: Path, what: str, hint: str, **options) -> None:
    """Compile (if needed) and load sources that register torch ops; a failure names `what` and a way out."""
    from torch.utils.cpp_extension import load

    if not sources:
        raise KernelBuildError(f"No sources for {what} found under {CSRC}: the package was installed without its csrc/ files.")
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise KernelBuildError(f"Cannot create the build cache {build_dir} ({err}); set MS_SPLATFACTO_CACHE to a writable folder.") from err
    try:
        with _build_progress(what):
            load(
                name=name,
                sources=[str(s) for s in sources],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=bool(os.environ.get("MS_SPLATFACTO_VERBOSE_BUILD")),
                **options,
            )
    except Exception as err:  # the compiler's own message is in err
        raise KernelBuildError(f"Building {what} failed: {err}\n{hint}") from err


def _build_progress(what: str):
    """A spinner with the elapsed time on stderr while the compiler runs (a minute or more the first
    time, with nothing else to show); nothing where rich is absent (the GPU check needs torch alone)."""
    try:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    except ImportError:
        return contextlib.nullcontext()
    progress = Progress(SpinnerColumn(), TextColumn(f"building {what}"), TimeElapsedColumn(),
                        console=Console(stderr=True), transient=True)
    progress.add_task("build", total=None)
    return progress


@functools.lru_cache(maxsize=None)
def load_cpu_kernels() -> None:
    """Compile (if needed) and load the CPU kernels; afterwards `torch.ops.ms_splatfacto.*` exist."""
    sources = cpu_sources()
    flags = cpu_flags()
    key = cpu_build_key(flags)
    print(f"ms-splatfacto: loading CPU kernels ({len(sources)} sources; the first build takes about a minute)...",
          file=sys.stderr, flush=True)
    build_extension(
        f"{EXTENSION_NAME}_{key}", sources, BUILD_DIR / key, "the C++ CPU kernels",
        "Use the pure-PyTorch kernels meanwhile with --pipeline.model.kernels reference, or set "
        "MS_SPLATFACTO_MARCH= (empty) if the compiler rejects -march=native.",
        extra_cflags=flags,  # torch adds the C++ standard it needs
        extra_ldflags=["-fopenmp"],
    )


def cpu_ops():
    """`torch.ops.ms_splatfacto`, building the CPU kernels on first use rather than at import."""
    load_cpu_kernels()
    return torch.ops.ms_splatfacto


if __name__ == "__main__":
    load_cpu_kernels()
    print(f"ms-splatfacto: CPU kernels ready (cached in {BUILD_DIR / cpu_build_key(cpu_flags())})")
