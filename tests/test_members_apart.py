"""Guards that keep members apart: only the backend imports torch.distributed, and outside the exchange
no backend code reads a member's chunk except where it iterates this rank's own members. (The
multi-process tests are the dynamic guard: there another rank's chunks are None.)"""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "ms_splatfacto"
BACKEND = PACKAGE / "backend"
EXCHANGE = {BACKEND / "aggregate" / "exchange.py", BACKEND / "aggregate" / "transport.py"}
LOCAL_MARKERS = re.compile(r"\.local\b|is_local\(|world_size == 1|[Ll]ocal (member|owner)")
"""What shows that a chunk access runs for a member of this rank."""


def python_files(root: Path):
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def test_only_the_backend_imports_torch_distributed():
    pattern = re.compile(r"^\s*(import torch\.distributed|from torch\.distributed|from torch import distributed)", re.M)
    offenders = [str(p.relative_to(REPO)) for p in python_files(PACKAGE) if BACKEND not in p.parents and pattern.search(p.read_text())]
    assert offenders == []


def test_chunks_are_read_only_by_their_own_rank_outside_the_exchange():
    offenders = []
    for path in python_files(BACKEND):
        if path in EXCHANGE:
            continue
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if ".chunks[" not in line:
                continue
            context = "\n".join(lines[max(0, number - 12) : number + 1])
            if not LOCAL_MARKERS.search(context):
                offenders.append(f"{path.relative_to(REPO)}:{number + 1}: {line.strip()}")
    assert offenders == [], "chunk reads with no sign of running on this rank's members:\n" + "\n".join(offenders)


def test_the_guard_sees_a_remote_read():
    """The guard's pattern flags the kind of line it exists for."""
    line = "rows = field.chunks[src.source].index_select(0, flat)"
    assert ".chunks[" in line and not LOCAL_MARKERS.search(line)
