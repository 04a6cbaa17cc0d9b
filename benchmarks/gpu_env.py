"""What `gpu_check` needs from the machine before anything runs: gsplat (installed, or a carried copy
of its package folder), the modules gsplat imports, nvcc and ninja for its JIT build, and that build.

The GPU machine has torch and nvcc but no package registry, so what is missing is either stood in for
or reported: gsplat 1.4.0 imports `rich` only to print while it builds (a small stand-in is put at the
end of sys.path when the real one is absent), numpy only from `gsplat/__init__.py` (without numpy the
package is opened without running that file; `gsplat.cuda` and `gsplat.rendering` need neither), and
`jaxtyping`, listed in its metadata, not at all. ninja is needed by torch's extension builder: a
carried binary (`.venv/bin/ninja` from the pip package) is used when none is on PATH.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Dict, Optional

REPO = Path(__file__).resolve().parents[1]
CARRIED_GSPLAT = REPO / ".venv" / "lib" / "python3.11" / "site-packages" / "gsplat"
CARRIED_NINJA = REPO / ".venv" / "bin" / "ninja"
GSPLAT_IMPORTS = ("typing_extensions", "numpy", "rich", "jaxtyping")
"""Modules gsplat 1.4.0 declares or imports; see the module docstring for which are really needed."""

RICH_SHIM = '''"""Stand-in for rich, put on sys.path by benchmarks/gpu_env.py only where rich is absent: gsplat's
JIT loader prints through rich.console.Console and needs nothing else from it."""
'''
RICH_CONSOLE_SHIM = '''import contextlib, re, sys


class Console:
    def print(self, *objects, **_):
        print(*(re.sub(r"\\[/?[a-z ]+\\]", "", str(o)) for o in objects), file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def status(self, message, **_):
        self.print(message)
        yield self
'''


def _scratch() -> Path:
    """One temporary folder per process for the links and stand-ins below."""
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    return _SCRATCH


_SCRATCH: Optional[Path] = None


def present(name: str) -> bool:
    """Whether `name` can be imported, without importing it (a finder refusing it counts as missing)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def module_status() -> Dict[str, str]:
    """'present' or 'missing' for each module gsplat names, plus pytest (the check runs without it)."""
    return {name: "present" if present(name) else "missing" for name in (*GSPLAT_IMPORTS, "pytest")}


def add_rich_shim() -> Optional[str]:
    """Put the rich stand-in at the end of sys.path (and PYTHONPATH, for subprocesses) if rich is absent;
    returns the folder, or None when the real rich is there."""
    if present("rich"):
        return None
    folder = _scratch() / "shims"
    (folder / "rich").mkdir(parents=True, exist_ok=True)
    (folder / "rich" / "__init__.py").write_text(RICH_SHIM)
    (folder / "rich" / "console.py").write_text(RICH_CONSOLE_SHIM)
    sys.path.append(str(folder))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(folder)]))
    importlib.invalidate_caches()
    return str(folder)


def locate_gsplat(src: Optional[str]) -> Dict[str, object]:
    """Make gsplat importable: `src` (a gsplat package folder) if given, else the installed one, else the
    carried copy at CARRIED_GSPLAT. The folder is linked into a scratch dir put first on sys.path (and
    PYTHONPATH), so nothing else beside it is picked up. Returns {"path", "how"} or {"error"}."""
    if src is None and present("gsplat"):
        return {"path": str(Path(importlib.util.find_spec("gsplat").origin).parent), "how": "installed"}
    folder = Path(src) if src else CARRIED_GSPLAT
    if not (folder / "cuda" / "_wrapper.py").is_file():
        return {"error": f"gsplat not found at {folder} (no cuda/_wrapper.py) and not installed; carry "
                         f".venv/lib/python3.11/site-packages/gsplat or pass --gsplat-src PATH"}
    link_dir = _scratch() / "gsplat_path"
    link_dir.mkdir(exist_ok=True)
    link = link_dir / "gsplat"
    if not link.exists():
        link.symlink_to(folder.resolve(), target_is_directory=True)
    sys.path.insert(0, str(link_dir))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(link_dir), os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()
    return {"path": str(folder.resolve()), "how": "--gsplat-src" if src else "carried copy"}


def import_gsplat() -> Dict[str, object]:
    """Import `gsplat.cuda._wrapper` and `gsplat.rendering` (not yet the kernels). Without numpy the
    package is opened bare, skipping `gsplat/__init__.py`, which alone needs it."""
    if "gsplat" not in sys.modules and not present("numpy"):
        spec = importlib.util.find_spec("gsplat")
        bare = types.ModuleType("gsplat")
        bare.__path__ = list(spec.submodule_search_locations)
        bare.__file__ = spec.origin
        sys.modules["gsplat"] = bare
        how = "bare package (numpy missing: gsplat/__init__.py not run)"
    else:
        how = "package"
    try:
        importlib.import_module("gsplat.cuda._wrapper")
        importlib.import_module("gsplat.rendering")
    except Exception as err:  # the missing module's name is in the message
        return {"ok": False, "how": how, "error": f"{type(err).__name__}: {err}"}
    version = getattr(sys.modules["gsplat"], "__version__", None)
    if version is None:
        version_file = Path(sys.modules["gsplat"].__path__[0]) / "version.py"
        found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", version_file.read_text()) if version_file.exists() else None
        version = found.group(1) if found else "unknown"
    return {"ok": True, "how": how, "version": version}


def tool_version(path: str, flag: str = "--version") -> str:
    try:
        out = subprocess.run([path, flag], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unusable ({err})"
    text = (out.stdout + out.stderr).strip()
    return text or f"exit {out.returncode}"


def nvcc_home(nvcc: str) -> Optional[str]:
    """The toolkit folder of `nvcc` as nvcc itself reports it (`_HERE_` of a dry run): it may be a
    wrapper script or a link outside the toolkit, and torch would then guess CUDA_HOME from its folder
    (e.g. /usr/local), where neither the CUDA headers nor libcudart lie."""
    probe = _scratch() / "probe.cu"
    probe.write_text("")
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", str(probe), "-o", str(probe.with_suffix(".o"))],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    here = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.M)
    return str(Path(here.group(1).strip()).parent.resolve()) if here else None


def find_nvcc() -> Dict[str, str]:
    """nvcc on PATH, else under $CUDA_HOME or /usr/local/cuda (then put on PATH for gsplat's check);
    CUDA_HOME is set to nvcc's own toolkit folder where it is unset, before torch's builder reads it."""
    path = shutil.which("nvcc")
    if path is None:
        for home in filter(None, [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]):
            candidate = Path(home) / "bin" / "nvcc"
            if candidate.is_file():
                os.environ["PATH"] = f"{candidate.parent}{os.pathsep}{os.environ.get('PATH', '')}"
                path = str(candidate)
                break
    if path is None:
        return {"status": "missing", "hint": "gsplat's kernels build with nvcc; install the CUDA toolkit or set CUDA_HOME"}
    version = tool_version(path)
    found = re.search(r"release (\d+\.\d+)", version)
    result = {"status": "present", "path": path, "version": found.group(1) if found else version}
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        home = nvcc_home(path)
        if home:
            os.environ["CUDA_HOME"] = home
            if "torch.utils.cpp_extension" in sys.modules:  # it read CUDA_HOME on import
                sys.modules["torch.utils.cpp_extension"].CUDA_HOME = home
    result["cuda_home"] = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "unset"
    return result


def find_ninja(explicit: Optional[str] = None) -> Dict[str, str]:
    """ninja on PATH, else `explicit` or the carried pip binary, linked into a scratch bin dir put first
    on PATH (the carried .venv/bin may hold a Python symlink that must not shadow the machine's)."""
    path = shutil.which("ninja")
    if path and not explicit:
        return {"status": "present", "path": path, "version": tool_version(path)}
    for candidate in filter(None, [explicit, str(CARRIED_NINJA)]):
        if Path(candidate).is_file() and os.access(candidate, os.X_OK):
            bin_dir = _scratch() / "bin"
            bin_dir.mkdir(exist_ok=True)
            link = bin_dir / "ninja"
            if not link.exists():
                link.symlink_to(Path(candidate).resolve())
            version = tool_version(str(link))
            if version.startswith("unusable"):
                continue
            os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
            return {"status": "carried", "path": str(Path(candidate).resolve()), "version": version}
    return {"status": "missing", "hint": "torch's JIT build needs ninja: carry .venv/bin/ninja (pip's ninja binary) "
                                         "or pass --ninja PATH"}


def gpus() -> list:
    import torch

    return [{"index": i, "name": torch.cuda.get_device_name(i), "capability": "%d.%d" % torch.cuda.get_device_capability(i),
             "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
            for i in range(torch.cuda.device_count())]


def set_build_env() -> Dict[str, str]:
    """Build for the visible GPUs' architectures only, with a job per core, into a cache under the
    checkout's .build (kept between runs on a warm machine); values already set are respected."""
    import torch

    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        caps = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(caps)
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_cu{(torch.version.cuda or 'none').replace('.', '')}"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".build" / "torch_extensions" / tag))
    return {key: os.environ[key] for key in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "TORCH_EXTENSIONS_DIR")}


def build_gsplat() -> Dict[str, object]:
    """Load gsplat's CUDA kernels (JIT-building them on first use) and time it."""
    from torch.utils.cpp_extension import _get_build_directory

    build_dir = Path(_get_build_directory("gsplat_cuda", False))
    cached = any(build_dir.glob("gsplat_cuda*.so"))
    start = time.perf_counter()
    try:
        backend = importlib.import_module("gsplat.cuda._backend")
    except Exception as err:  # the compiler's output is in the message
        return {"ok": False, "seconds": time.perf_counter() - start, "cached": cached, "build_dir": str(build_dir),
                "error": f"{type(err).__name__}: {str(err)[-4000:]}"}
    seconds = time.perf_counter() - start
    if backend._C is None:
        return {"ok": False, "seconds": seconds, "cached": cached, "build_dir": str(build_dir),
                "error": "gsplat loaded no kernels (it found no nvcc)"}
    prebuilt = getattr(backend._C, "__name__", "") == "gsplat.csrc"
    return {"ok": True, "seconds": seconds, "cached": cached, "prebuilt": prebuilt, "build_dir": str(build_dir)}


def start_cpu_kernel_build() -> subprocess.Popen:
    """Build the C++ CPU kernels (the parity reference) in a subprocess, alongside gsplat's build."""
    return subprocess.Popen([sys.executable, "-m", "ms_splatfacto.backend.build"], cwd=str(REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish_cpu_kernel_build(proc: Optional[subprocess.Popen], started: float) -> Dict[str, object]:
    """Wait for the CPU kernel build and load it here (cached by then); report its time or failure."""
    output = proc.communicate()[0] if proc is not None else ""
    try:
        from ms_splatfacto.backend.build import load_cpu_kernels

        load_cpu_kernels()
    except Exception as err:
        return {"ok": False, "seconds": time.perf_counter() - started, "error": f"{err}"[-3000:] + output[-2000:]}
    return {"ok": True, "seconds": time.perf_counter() - started}
