"""Lazy build of the C++ CPU kernels in `csrc/cpu` with torch's extension builder.

Each source registers its operators under `torch.ops.ms_splatfacto`. The build happens on first
use (or ahead of time with `python -m ms_splatfacto.backend.build`), is cached by torch under
`BUILD_DIR`, and is rebuilt only when a source changes.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"
EXTENSION_NAME = "ms_splatfacto_cpu"
BUILD_DIR = Path(os.environ.get("MS_SPLATFACTO_BUILD_DIR", CSRC.parent / ".build" / "cpu"))
"""Where the compiled kernels are cached (set MS_SPLATFACTO_BUILD_DIR to move it)."""


class KernelBuildError(RuntimeError):
    """The C++ kernels could not be compiled or loaded."""


def cpu_sources() -> list[Path]:
    return sorted((CSRC / "cpu").glob("*.cpp"))


@functools.lru_cache(maxsize=None)
def load_cpu_kernels() -> None:
    """Compile (if needed) and load the CPU kernels; afterwards `torch.ops.ms_splatfacto.*` exist."""
    from torch.utils.cpp_extension import load

    sources = cpu_sources()
    if not sources:
        raise KernelBuildError(f"No C++ sources found under {CSRC / 'cpu'}; is the package installed from a checkout?")
    print(f"ms-splatfacto: loading CPU kernels ({len(sources)} sources; the first build takes about a minute)...",
          file=sys.stderr, flush=True)
    flags = ["-O3", "-fopenmp", "-ffp-contract=off"]  # torch adds the C++ standard it needs
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    try:
        load(
            name=EXTENSION_NAME,
            sources=[str(s) for s in sources],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(BUILD_DIR),
            is_python_module=False,
            verbose=bool(os.environ.get("MS_SPLATFACTO_VERBOSE_BUILD")),
        )
    except Exception as err:  # the compiler's own message is in err
        raise KernelBuildError(
            f"Building the C++ CPU kernels failed: {err}\n"
            "Use the pure-PyTorch kernels meanwhile with --pipeline.model.kernels reference."
        ) from err


if __name__ == "__main__":
    load_cpu_kernels()
    print(f"ms-splatfacto: CPU kernels ready (cached in {BUILD_DIR})")
