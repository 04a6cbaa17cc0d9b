"""Atomic file writes: a crash mid-write never leaves a truncated checkpoint or export behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

Progress = Callable[[int, Optional[int]], None]
"""progress(bytes done since the last call, total bytes or None), e.g. an `observability.phase` bar."""


@contextlib.contextmanager
def atomic_path(path: Path, tmp_dir: Optional[Path] = None) -> Iterator[Path]:
    """Yield a temporary path in `tmp_dir` (default: beside `path`; it must be on the same file system);
    it replaces `path` only if the block succeeds. A process killed inside the block leaves `path` as it
    was and at most a hidden `.<name>.*.tmp` file in `tmp_dir`. The file gets the permissions a new
    file would (mkstemp's are private)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=tmp_dir or path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CountingFile:
    """A binary file that reports the bytes written or read through it to `progress` (torch.save and
    torch.load take file objects; they pass memory views, so counting copies nothing)."""

    def __init__(self, file, progress: Optional[Progress]) -> None:
        self.file, self.progress = file, progress

    def write(self, data) -> int:
        n = self.file.write(data)
        if self.progress is not None:
            self.progress(n, None)
        return n

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        if self.progress is not None:
            self.progress(len(data), None)
        return data

    def readinto(self, buffer) -> int:
        n = self.file.readinto(buffer)
        if self.progress is not None:
            self.progress(n or 0, None)
        return n

    def __getattr__(self, name: str):  # seek, tell, flush, fileno, ...
        return getattr(self.file, name)


def atomic_torch_save(obj: Any, path: Path, tmp_dir: Optional[Path] = None, progress: Optional[Progress] = None) -> None:
    """`torch.save(obj, path)` through `atomic_path`, flushed to disk before the rename; the bytes
    written go to `progress` as they are written."""
    with atomic_path(path, tmp_dir) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, CountingFile(f, progress) if progress is not None else f)
        fsync(tmp)
