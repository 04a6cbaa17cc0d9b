"""Atomic file writes: a crash mid-write never leaves a truncated checkpoint or export behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import torch


@contextlib.contextmanager
def atomic_path(path: Path, tmp_dir: Optional[Path] = None) -> Iterator[Path]:
    """Yield a temporary path in `tmp_dir` (default: beside `path`; it must be on the same file system);
    it replaces `path` only if the block succeeds. A process killed inside the block leaves `path` as it
    was and at most a hidden `.<name>.*.tmp` file in `tmp_dir`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=tmp_dir or path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_torch_save(obj: Any, path: Path, tmp_dir: Optional[Path] = None) -> None:
    """`torch.save(obj, path)` through `atomic_path`, flushed to disk before the rename."""
    with atomic_path(path, tmp_dir) as tmp:
        torch.save(obj, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
