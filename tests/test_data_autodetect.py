"""`--data DIR` with no dataparser subcommand: the `auto` dataparser recognises the folder's layout, loads
it with nerfstudio's own parser for it, says so in one line, and refuses unknown folders in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tyro
from nerfstudio.configs.method_configs import AnnotatedBaseConfigUnion
from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from PIL import Image

from ms_splatfacto.data_checks import preflight
from ms_splatfacto.dataparsers import AutoDataParserConfig, detect_layout
from ms_splatfacto.scenes.city import generate_city_scene
from tests.conftest import TRAIN_ARGS, ns

LUND_TINY_MODEL = ("cameras.bin", "images.bin", "points3D.bin")


def resolve(data: Path, **options):
    return AutoDataParserConfig(data=data, **options).resolve()


def refusal(data: Path, **options) -> str:
    """The message the auto parser stops with (a SystemExit, as the CLI shows it)."""
    with pytest.raises(SystemExit) as stop:
        resolve(data, **options)
    message = str(stop.value)
    assert "\n" not in message and message.startswith("ms-splatfacto: ")
    return message


def colmap_folder(root: Path, model: str = "sparse/0", ext: str = ".bin", image_size=(64, 48)) -> Path:
    """images/ with one image and a COLMAP model folder holding (placeholder) model files."""
    (root / "images").mkdir(parents=True)
    Image.new("RGB", image_size).save(root / "images" / "a.png")
    (root / model).mkdir(parents=True, exist_ok=True)
    for name in ("cameras", "images", "points3D"):
        (root / model / f"{name}{ext}").write_bytes(b"")
    return root


def test_transforms_json_is_nerfstudio_data(tmp_path: Path) -> None:
    (tmp_path / "transforms.json").write_text(json.dumps({"frames": [], "ply_file_path": "sparse_pc.ply"}))
    colmap_folder(tmp_path, "colmap/sparse/0")  # ns-process-data writes both: transforms.json wins
    config, layout, line = resolve(tmp_path)
    assert layout.kind == "nerfstudio" and isinstance(config, NerfstudioDataParserConfig)
    assert config.data == tmp_path and config.load_3D_points
    assert line == (f"ms-splatfacto: --data {tmp_path}: nerfstudio (transforms.json), loading with nerfstudio's "
                    f"nerfstudio-data dataparser (as `nerfstudio-data --load-3D-points True`)")
    # Without ply_file_path nerfstudio-data would prompt to convert the COLMAP model: points off, and said.
    (tmp_path / "transforms.json").write_text(json.dumps({"frames": []}))
    config, _, line = resolve(tmp_path)
    assert not config.load_3D_points and "Gaussians start at random" in line
    config, layout, _ = resolve(tmp_path / "transforms.json")
    assert layout.kind == "nerfstudio" and config.data == tmp_path / "transforms.json"


def test_images_and_sparse_0_is_colmap(tmp_path: Path) -> None:
    colmap_folder(tmp_path, "sparse/0")
    config, layout, line = resolve(tmp_path, eval_mode="fraction", train_split_fraction=0.75)
    assert layout.kind == "colmap" and isinstance(config, ColmapDataParserConfig)
    assert config.colmap_path == Path("sparse/0") and config.images_path == Path("images")
    assert config.load_3D_points and config.downscale_factor == 1
    assert (config.eval_mode, config.train_split_fraction) == ("fraction", 0.75)
    assert line == (f"ms-splatfacto: --data {tmp_path}: COLMAP (sparse/0), loading with nerfstudio's colmap "
                    f"dataparser (as `colmap --colmap-path sparse/0`)")
    assert resolve(tmp_path)[0].eval_mode == ColmapDataParserConfig().eval_mode  # not set: the parser's own


def test_model_files_directly_in_sparse(tmp_path: Path) -> None:
    colmap_folder(tmp_path, "sparse", ext=".txt")
    config, layout, line = resolve(tmp_path)
    assert layout.model == Path("sparse") and config.colmap_path == Path("sparse")
    assert "COLMAP (sparse)" in line


def test_sparse_0_is_preferred_and_a_partial_model_is_not_one(tmp_path: Path) -> None:
    colmap_folder(tmp_path, "sparse")
    (tmp_path / "sparse" / "0").mkdir()
    (tmp_path / "sparse" / "0" / "cameras.bin").write_bytes(b"")  # no images.bin: not a model
    assert detect_layout(tmp_path).model == Path("sparse")
    (tmp_path / "sparse" / "0" / "images.txt").write_text("")
    assert detect_layout(tmp_path).model == Path("sparse/0")


def test_downscaled_copies_are_honoured(tmp_path: Path) -> None:
    colmap_folder(tmp_path, "sparse/0", image_size=(4000, 3000))
    assert resolve(tmp_path)[0].downscale_factor == 1  # too large, but no copies: never one that is missing
    (tmp_path / "images_2").mkdir()
    (tmp_path / "images_4").mkdir()
    config, layout, line = resolve(tmp_path)
    assert layout.downscales == (2, 4)
    assert config.downscale_factor == 4 and line.endswith("(as `colmap --colmap-path sparse/0 --downscale-factor 4`)")
    assert resolve(tmp_path, downscale_factor=2)[0].downscale_factor == 2
    assert resolve(tmp_path, downscale_factor=1)[0].downscale_factor == 1
    message = refusal(tmp_path, downscale_factor=8)
    assert f"{tmp_path / 'images_8'} does not exist" in message and "images_2, images_4" in message


def test_small_images_are_not_downscaled_by_default(tmp_path: Path) -> None:
    colmap_folder(tmp_path, "sparse/0", image_size=(1024, 768))
    (tmp_path / "images_2").mkdir()
    assert resolve(tmp_path)[0].downscale_factor == 1
    (tmp_path / "transforms.json").write_text(json.dumps({"frames": []}))
    assert resolve(tmp_path, downscale_factor=2)[0].downscale_factor == 2  # nerfstudio-data too
    assert "images_4" in refusal(tmp_path, downscale_factor=4)


@pytest.mark.parametrize("make", ["empty", "images only", "sparse without model"])
def test_unrecognised_folder_gets_one_line(tmp_path: Path, make: str) -> None:
    if make != "empty":
        (tmp_path / "images").mkdir()
    if make == "sparse without model":
        (tmp_path / "sparse" / "0").mkdir(parents=True)
        (tmp_path / "sparse" / "0" / "points3D.bin").write_bytes(b"")
    message = refusal(tmp_path)
    assert f"--data {tmp_path}: no dataset layout recognised" in message
    for phrase in ("transforms.json", "sparse/0", "images_2", "nerfstudio-data", "colmap --colmap-path", "blender-data"):
        assert phrase in message
    assert refusal(tmp_path / "nowhere") == f"ms-splatfacto: Data folder {tmp_path / 'nowhere'} does not exist."


def test_preflight_checks_the_chosen_layout(tmp_path: Path, lund_tiny: Path) -> None:
    with pytest.raises(SystemExit, match="no dataset layout recognised"):
        preflight(AutoDataParserConfig(), tmp_path)
    scene = colmap_folder(tmp_path / "scene")
    (scene / "images" / "a.png").unlink()
    with pytest.raises(SystemExit, match=f"No images in {scene / 'images'}"):
        preflight(AutoDataParserConfig(), scene)
    # A model without points: the colmap check turns them off, on the auto config that is kept.
    empty_points = tmp_path / "points"
    (empty_points / "sparse" / "0").mkdir(parents=True)
    (empty_points / "images").symlink_to(lund_tiny / "images")
    for name in LUND_TINY_MODEL[:2]:
        (empty_points / "sparse" / "0" / name).symlink_to(lund_tiny / "sparse" / "0" / name)
    (empty_points / "sparse" / "0" / "points3D.bin").write_bytes((0).to_bytes(8, "little"))
    config = AutoDataParserConfig()
    preflight(config, empty_points)
    assert config.data == empty_points and not config.load_3D_points
    assert not config.resolve()[0].load_3D_points


def outputs(config, split: str):
    return config.setup().get_dataparser_outputs(split)


@pytest.mark.parametrize("split", ["train", "val"])
def test_lund_tiny_loads_as_with_the_colmap_parser(lund_tiny: Path, split: str, capsys) -> None:
    auto = outputs(AutoDataParserConfig(data=lund_tiny), split)
    assert "COLMAP (sparse/0), loading with nerfstudio's colmap dataparser" in capsys.readouterr().out
    direct = outputs(ColmapDataParserConfig(data=lund_tiny, colmap_path=Path("sparse/0")), split)
    assert auto.image_filenames == direct.image_filenames and len(auto.image_filenames) > 2
    for name in ("camera_to_worlds", "fx", "fy", "cx", "cy", "width", "height", "distortion_params"):
        assert torch.equal(getattr(auto.cameras, name), getattr(direct.cameras, name)), name
    assert torch.equal(auto.metadata["points3D_xyz"], direct.metadata["points3D_xyz"])
    assert torch.equal(auto.dataparser_transform, direct.dataparser_transform)
    assert auto.dataparser_scale == direct.dataparser_scale


def test_generated_city_is_nerfstudio_data(tmp_path: Path) -> None:
    scene = generate_city_scene(tmp_path / "city", cameras=10, width=32, height=24, blocks=2, num_points=300, workers=1)
    config, layout, line = resolve(scene)
    assert layout.kind == "nerfstudio" and isinstance(config, NerfstudioDataParserConfig) and config.load_3D_points
    assert "loading with nerfstudio's nerfstudio-data dataparser" in line
    train, val = outputs(AutoDataParserConfig(data=scene), "train"), outputs(AutoDataParserConfig(data=scene), "val")
    assert len(train.image_filenames) + len(val.image_filenames) == 10
    assert train.metadata["points3D_xyz"].shape == (300, 3)
    assert np.allclose(train.cameras.width.numpy(), 32)


def parse(*args: str):
    return tyro.cli(AnnotatedBaseConfigUnion, args=["ms-splatfacto", *args])


def test_cli_defaults_to_auto_and_keeps_explicit_subcommands(lund_tiny: Path) -> None:
    dataparser = parse("--data", str(lund_tiny)).pipeline.datamanager.dataparser
    assert type(dataparser) is AutoDataParserConfig
    explicit = parse("--data", str(lund_tiny), "colmap", "--colmap-path", "sparse/0").pipeline.datamanager.dataparser
    assert type(explicit) is ColmapDataParserConfig and explicit.colmap_path == Path("sparse/0")
    assert type(parse("nerfstudio-data", "--data", "x").pipeline.datamanager.dataparser) is NerfstudioDataParserConfig
    options = parse("auto", "--data", str(lund_tiny), "--downscale-factor", "2").pipeline.datamanager.dataparser
    assert type(options) is AutoDataParserConfig and options.downscale_factor == 2 and options.data == lund_tiny


def test_registered_as_a_nerfstudio_dataparser() -> None:
    """Registered the way the `nerfstudio.dataparser_configs` entry point registers it, `auto` is a
    subcommand of every method, and the method's own choices do not list it twice."""
    script = (
        "import warnings; warnings.simplefilter('error', UserWarning)\n"
        "import tyro\n"
        "from nerfstudio.configs.method_configs import AnnotatedBaseConfigUnion\n"
        "from nerfstudio.configs.dataparser_configs import all_dataparsers\n"
        "from ms_splatfacto.dataparsers import AutoDataParserConfig\n"
        "assert isinstance(all_dataparsers['auto'], AutoDataParserConfig)\n"
        "for method in ('splatfacto', 'ms-splatfacto'):\n"
        "    config = tyro.cli(AnnotatedBaseConfigUnion, args=[method, 'auto', '--data', 'x'])\n"
        "    assert type(config.pipeline.datamanager.dataparser) is AutoDataParserConfig, method\n"
        "print('registered')\n"
    )
    env = {**os.environ, "NERFSTUDIO_DATAPARSER_CONFIGS": "auto=ms_splatfacto.dataparsers:auto_dataparser"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "registered" in result.stdout, result.stderr[-3000:]


def test_ns_train_names_an_unrecognised_folder(tmp_path: Path) -> None:
    result = ns("ns-train", "ms-splatfacto", "--data", str(tmp_path), "--output-dir", str(tmp_path / "out"),
                *TRAIN_ARGS, check=False, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output
    assert f"ms-splatfacto: --data {tmp_path}: no dataset layout recognised. Recognised: transforms.json" in output


@pytest.mark.slow
def test_ns_train_on_a_colmap_folder_with_no_subcommand(tmp_path: Path, lund_tiny: Path) -> None:
    result = ns("ns-train", "ms-splatfacto", "--data", str(lund_tiny), "--max-num-iterations", "5",
                "--output-dir", str(tmp_path), *TRAIN_ARGS)
    line = (f"ms-splatfacto: --data {lund_tiny}: COLMAP (sparse/0), loading with nerfstudio's colmap dataparser "
            f"(as `colmap --colmap-path sparse/0`)")
    assert line in result.stdout.splitlines()
    assert len(list(tmp_path.glob("*/ms-splatfacto/*/nerfstudio_models/step-*.ckpt"))) == 1
