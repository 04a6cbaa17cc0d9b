"""`ns-train ms-splatfacto --data DIR` with no dataparser subcommand: recognise the folder's layout and
load it with nerfstudio's own dataparser for that layout.

A city capture usually arrives as COLMAP output (images/ + sparse/0), which nerfstudio's default parser
(nerfstudio-data, wanting transforms.json) refuses; the user had to know to add `colmap --colmap-path
sparse/0`. The `auto` dataparser here looks, says in one line what it chose, and hands over. Explicit
subcommands (`nerfstudio-data`, `colmap`, ...) still work as before.

This module must not import nerfstudio.configs (nerfstudio imports it while building that registry).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Literal, Optional, Tuple, Type

from nerfstudio.data.dataparsers.base_dataparser import DataParser, DataParserConfig
from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import MAX_AUTO_RESOLUTION, NerfstudioDataParserConfig
from nerfstudio.plugins.registry_dataparser import DataParserSpecification
from PIL import Image

from ms_splatfacto.errors import InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}
COLMAP_MODELS = (Path("sparse/0"), Path("sparse"), Path("colmap/sparse/0"))
"""Where COLMAP models are looked for, in this order (the last is where ns-process-data puts them)."""
LAYOUTS = (
    "transforms.json (nerfstudio-data); images/ with a COLMAP model (cameras, images, points3D as .bin or .txt) "
    "in sparse/0/, sparse/ or colmap/sparse/0/ (colmap), optionally with images_2/, images_4/... downscaled copies"
)
"""The layouts the auto dataparser recognises, as its messages list them."""


@dataclass(frozen=True)
class Layout:
    """What a data folder holds, as far as choosing a dataparser goes."""

    kind: Literal["nerfstudio", "colmap"]
    model: Optional[Path] = None
    """COLMAP model folder, relative to the data folder."""
    downscales: Tuple[int, ...] = ()
    """N of each images_N folder present (downscaled copies of images/)."""


def is_colmap_model(folder: Path) -> bool:
    return folder.is_dir() and all(any((folder / f"{name}{ext}").is_file() for ext in (".bin", ".txt"))
                                   for name in ("cameras", "images"))


def detect_layout(data: Path) -> Layout:
    """The layout of `data`: nerfstudio's transforms.json first (ns-process-data writes it beside its COLMAP
    model), else a COLMAP model. Anything else stops with one line listing the layouts and subcommands."""
    data = Path(data)
    if not data.exists():
        raise InputError(f"Data folder {data} does not exist.")
    folder = data.parent if data.is_file() else data
    downscales = tuple(sorted(int(p.name[7:]) for p in folder.glob("images_*") if p.is_dir() and p.name[7:].isdigit()))
    if data.is_file() and data.suffix == ".json" or (data / "transforms.json").is_file():
        return Layout("nerfstudio", None, downscales)
    for model in COLMAP_MODELS:
        if is_colmap_model(data / model):
            return Layout("colmap", model, downscales)
    raise InputError(f"--data {data}: no dataset layout recognised. {explicit_choices()}")


def explicit_choices() -> str:
    """One sentence: the layouts recognised and the explicit dataparser subcommands."""
    from nerfstudio.configs.dataparser_configs import all_dataparsers  # here: nerfstudio may be importing us

    names = [name for name, config in all_dataparsers.items() if not isinstance(config, AutoDataParserConfig)]
    return (f"Recognised: {LAYOUTS}. Otherwise name the dataparser after the options, e.g. "
            f"`ns-train ms-splatfacto --data DIR colmap --colmap-path PATH`; dataparsers: {', '.join(names)}.")


def first_image_size(folder: Path) -> Optional[Tuple[int, int]]:
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            with Image.open(path) as image:
                return image.size
    return None


@dataclass
class AutoDataParserConfig(DataParserConfig):
    """Recognise the layout of --data (transforms.json, or COLMAP in sparse/0, sparse or colmap/sparse/0)
    and load it with nerfstudio's parser for it (nerfstudio-data or colmap), naming the choice in one line."""

    _target: Type = field(default_factory=lambda: DataParser)
    """Unused: setup() returns the chosen nerfstudio parser."""
    data: Path = Path()
    """Dataset folder (or a transforms.json file)."""
    downscale_factor: Optional[int] = None
    """Read the images_N copies (downscaled by N); by default halve while images exceed 1600 px and a copy exists."""
    scale_factor: float = 1.0
    """Scale of the camera poses, after the automatic scaling."""
    orientation_method: Literal["pca", "up", "vertical", "none"] = "up"
    """How the chosen parser orients the poses."""
    center_method: Literal["poses", "focus", "none"] = "poses"
    """How the chosen parser centres the poses."""
    auto_scale_poses: bool = True
    """Scale the poses to fit in [-1, 1]."""
    eval_mode: Optional[Literal["fraction", "filename", "interval", "all"]] = None
    """Train/eval split; None keeps the chosen parser's default (nerfstudio-data: fraction, colmap: interval)."""
    train_split_fraction: float = 0.9
    """Training share of the images with eval-mode fraction."""
    eval_interval: int = 8
    """Every eval_interval-th image is held out with eval-mode interval."""
    load_3D_points: bool = True
    """Seed the Gaussians with the dataset's points (COLMAP's points3D, nerfstudio's ply_file_path) where it has them."""

    def resolve(self) -> Tuple[DataParserConfig, Layout, str]:
        """nerfstudio's parser config for the layout of `data`, the layout, and a line saying so."""
        layout = detect_layout(self.data)
        shared = {name: getattr(self, name) for name in ("data", "scale_factor", "orientation_method",
                                                          "center_method", "auto_scale_poses",
                                                          "train_split_fraction", "eval_interval")}
        if self.eval_mode is not None:
            shared["eval_mode"] = self.eval_mode
        notes: List[str] = []
        if layout.kind == "nerfstudio":
            self._check_downscale(layout)
            meta_file = self.data if self.data.is_file() else self.data / "transforms.json"
            try:
                meta = json.loads(meta_file.read_text())
            except (OSError, ValueError) as err:
                raise InputError(f"Cannot read {meta_file}: {err}") from None
            # Without ply_file_path, nerfstudio-data would ask (interactively) to convert a COLMAP model.
            points = self.load_3D_points and "ply_file_path" in meta
            if self.load_3D_points and not points:
                notes.append("no ply_file_path in transforms.json: Gaussians start at random")
            config = NerfstudioDataParserConfig(**shared, downscale_factor=self.downscale_factor, load_3D_points=points)
            what, name, flags = "nerfstudio (transforms.json)", "nerfstudio-data", f" --load-3D-points {points}"
            factor = self.downscale_factor
        else:
            factor = self._colmap_downscale(layout)
            config = ColmapDataParserConfig(**shared, downscale_factor=factor, colmap_path=layout.model,
                                            load_3D_points=self.load_3D_points)
            what, name, flags = f"COLMAP ({layout.model.as_posix()})", "colmap", f" --colmap-path {layout.model.as_posix()}"
        flags += f" --downscale-factor {factor}" if factor is not None and factor > 1 else ""
        line = f"ms-splatfacto: --data {self.data}: {what}, loading with nerfstudio's {name} dataparser (as `{name}{flags}`)"
        return config, layout, line + "".join(f"; {note}" for note in notes)

    def _colmap_downscale(self, layout: Layout) -> int:
        """The downscale factor to give nerfstudio's colmap parser: the one asked for, whose images_N must
        exist (else that parser prompts to make it), or as nerfstudio-data picks one: the largest present
        on the way to images under MAX_AUTO_RESOLUTION (1600 px), never a missing one."""
        if self.downscale_factor is not None:
            self._check_downscale(layout)
            return self.downscale_factor
        size = first_image_size(self.data / "images")
        factor = 1
        while size is not None and max(size) / factor > MAX_AUTO_RESOLUTION and 2 * factor in layout.downscales:
            factor *= 2
        return factor

    def _check_downscale(self, layout: Layout) -> None:
        factor = self.downscale_factor
        if factor is not None and factor > 1 and factor not in layout.downscales:
            have = ", ".join(f"images_{n}" for n in layout.downscales) or "none"
            folder = self.data.parent if self.data.is_file() else self.data
            raise InputError(f"--downscale-factor {factor}: {folder / f'images_{factor}'} does not exist "
                             f"(downscaled copies present: {have}); make it, or pick a factor present.")

    def setup(self, **kwargs) -> DataParser:
        config, _, line = self.resolve()
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank parses; one says so
            print(line, flush=True)
        return config.setup(**kwargs)


auto_dataparser = DataParserSpecification(
    config=AutoDataParserConfig(),
    description="Recognise --data's layout (transforms.json or COLMAP) and load it with nerfstudio's parser for it.",
)
"""Entry point `nerfstudio.dataparser_configs` (name `auto`): the parser as a subcommand of every method."""
