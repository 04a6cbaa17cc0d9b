"""Checks on the dataset before training, so bad input ends in one line that names the problem
instead of a traceback from deep inside a dataparser."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Type

from nerfstudio.data.dataparsers.base_dataparser import DataParserConfig
from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig
from nerfstudio.utils.rich_utils import CONSOLE
from PIL import Image

from ms_splatfacto.dataparsers import IMAGE_SUFFIXES, AutoDataParserConfig
from ms_splatfacto.errors import InputError


def colmap_point_count(sparse_dir: Path) -> Optional[int]:
    """Number of 3D points in a COLMAP model (binary or text), or None where there is no points file."""
    binary, text = sparse_dir / "points3D.bin", sparse_dir / "points3D.txt"
    if binary.exists():
        with binary.open("rb") as f:
            header = f.read(8)
        return struct.unpack("<Q", header)[0] if len(header) == 8 else 0
    if text.exists():
        return sum(1 for line in text.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return None


def check_colmap(config: ColmapDataParserConfig) -> None:
    images = config.data / config.images_path
    if not images.is_dir() or not any(p.suffix.lower() in IMAGE_SUFFIXES for p in images.iterdir()):
        raise InputError(f"No images in {images} (expected {', '.join(sorted(IMAGE_SUFFIXES))} files).")
    sparse = config.data / config.colmap_path
    if not sparse.is_dir():
        raise InputError(f"COLMAP model folder {sparse} does not exist (set --colmap-path).")
    if config.load_3D_points and not colmap_point_count(sparse):
        CONSOLE.log(f"[yellow]Warning: the COLMAP model in {sparse} has no 3D points; Gaussians start at random.[/yellow]")
        config.load_3D_points = False


def check_auto(config: AutoDataParserConfig) -> None:
    """The layout must be recognised (else one line listing layouts and subcommands), and a COLMAP layout
    passes the colmap check (images present; a model without points turns the points off here too)."""
    resolved, _, _ = config.resolve()
    if isinstance(resolved, ColmapDataParserConfig):
        check_colmap(resolved)
        config.load_3D_points = resolved.load_3D_points


DATAPARSER_CHECKS: Dict[Type[DataParserConfig], Callable] = {
    ColmapDataParserConfig: check_colmap,
    AutoDataParserConfig: check_auto,
}
"""Extra checks for dataparsers whose own failures are unclear."""


def preflight(dataparser: DataParserConfig, data: Optional[Path]) -> None:
    """Refuse a missing data folder and run the dataparser's own check; may adjust `dataparser`."""
    folder = Path(data) if data is not None else dataparser.data
    if not folder.exists():
        raise InputError(f"Data folder {folder} does not exist.")
    dataparser.data = folder
    check = DATAPARSER_CHECKS.get(type(dataparser))
    if check is not None:
        check(dataparser)


def check_images_readable(image_filenames: Iterable[Path]) -> None:
    """Open every image's header now: the datamanager reads them lazily, mid-training."""
    for path in image_filenames:
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, SyntaxError) as err:  # PIL raises SyntaxError for some corrupt files
            raise InputError(f"Cannot read image {path}: {err}") from None
