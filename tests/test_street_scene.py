"""The generated street dataset: nerfstudio's own parser reads it, and its cameras, images and seed points agree."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from PIL import Image
from plyfile import PlyData

from ms_splatfacto.scenes import street
from ms_splatfacto.scenes.street import Pinhole, generate_street_scene

REPO = Path(__file__).resolve().parents[1]
NUM_VIEWS, NUM_POINTS = 28, 4000


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("street") / "street"
    return generate_street_scene(output, num_views=NUM_VIEWS, num_points=NUM_POINTS)


@pytest.fixture(scope="module")
def parsed(scene: Path):
    parser = NerfstudioDataParserConfig(data=scene, load_3D_points=True).setup()
    return parser.get_dataparser_outputs("train"), parser.get_dataparser_outputs("val")


def read_meta(scene: Path) -> tuple[dict, Pinhole]:
    meta = json.loads((scene / "transforms.json").read_text())
    return meta, Pinhole(meta["fl_x"], meta["fl_y"], meta["cx"], meta["cy"], meta["w"], meta["h"])


def read_ply(path: Path) -> tuple[np.ndarray, np.ndarray]:
    vertex = PlyData.read(str(path))["vertex"]
    xyz = np.stack([vertex[n] for n in "xyz"], 1).astype(np.float64)  # [P, 3]
    return xyz, np.stack([vertex[n] for n in ("red", "green", "blue")], 1)  # [P, 3] uint8


def project(c2w: np.ndarray, xyz: np.ndarray, camera: Pinhole) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pinhole projection with an OpenGL camera-to-world (looks down -Z, +Y up): pixel u, v [P] and depth [P]."""
    w2c = np.linalg.inv(c2w)
    local = xyz @ w2c[:3, :3].T + w2c[:3, 3]  # [P, 3]
    depth = -local[:, 2]
    return camera.fx * local[:, 0] / depth + camera.cx, -camera.fy * local[:, 1] / depth + camera.cy, depth


def test_nerfstudio_parser_reads_the_scene(scene: Path, parsed) -> None:
    train, val = parsed
    num_train = math.ceil(NUM_VIEWS * 0.9)
    assert (len(train.image_filenames), len(val.image_filenames)) == (num_train, NUM_VIEWS - num_train)
    assert not set(train.image_filenames) & set(val.image_filenames)
    for outputs in (train, val):
        assert (outputs.cameras.width == 128).all() and (outputs.cameras.height == 96).all()
        for name in outputs.image_filenames:
            assert Image.open(name).size == (128, 96)
        assert outputs.metadata["points3D_xyz"].shape == (NUM_POINTS, 3)
        assert outputs.metadata["points3D_rgb"].shape == (NUM_POINTS, 3)
    _, rgb = read_ply(scene / "sparse_pc.ply")
    assert np.array_equal(train.metadata["points3D_rgb"].numpy(), rgb)


def test_images_are_what_the_ray_caster_renders(scene: Path, parsed) -> None:
    meta, camera = read_meta(scene)
    layout = street.make_layout(0)
    _, val = parsed
    held_out = next(f for f in meta["frames"] if scene / f["file_path"] == val.image_filenames[0])
    for frame in (meta["frames"][0], held_out):
        on_disk = np.array(Image.open(scene / frame["file_path"]))
        assert np.array_equal(on_disk, street.render(layout, np.array(frame["transform_matrix"]), camera))


def test_our_rays_are_nerfstudios_rays(scene: Path, parsed) -> None:
    """The renderer's pixel rays, mapped by the parser's transform, are the rays nerfstudio trains on."""
    meta, camera = read_meta(scene)
    train, _ = parsed
    transform, scale = train.dataparser_transform.double().numpy(), train.dataparser_scale  # [3, 4], float
    by_name = {scene / f["file_path"]: np.array(f["transform_matrix"]) for f in meta["frames"]}
    for index in (0, len(train.image_filenames) - 1):
        rays = train.cameras.generate_rays(camera_indices=index)
        py, px = np.meshgrid(np.arange(camera.height) + 0.5, np.arange(camera.width) + 0.5, indexing="ij")  # [H, W]
        origins, dirs = street.camera_rays(by_name[train.image_filenames[index]], px, py, camera)  # [H, W, 3]
        np.testing.assert_allclose(dirs @ transform[:, :3].T, rays.directions.numpy(), atol=1e-5)
        origins = (origins @ transform[:, :3].T + transform[:, 3]) * scale  # [H, W, 3]
        np.testing.assert_allclose(origins, rays.origins.numpy(), atol=1e-5)


def test_seed_points_project_onto_their_colour(scene: Path, parsed) -> None:
    """Seed points visible in a view land on pixels of their colour, with the cameras as written."""
    meta, camera = read_meta(scene)
    layout = street.make_layout(0)
    xyz, rgb = read_ply(scene / "sparse_pc.ply")
    matches, flipped_matches, checked = 0, 0, 0
    for frame in meta["frames"]:
        c2w = np.array(frame["transform_matrix"])
        image = np.array(Image.open(scene / frame["file_path"])).astype(int)  # [H, W, 3]
        u, v, depth = project(c2w, xyz, camera)
        inside = (depth > 0.1) & (u >= 0) & (u < camera.width) & (v >= 0) & (v < camera.height)
        # Visible: the ray from the camera to the point hits nothing before it (beyond the points' noise).
        to_point = xyz - c2w[:3, 3]  # [P, 3]
        distance = np.linalg.norm(to_point, axis=1)  # [P]
        hit = street.cast(layout, np.broadcast_to(c2w[:3, 3], xyz.shape), to_point / distance[:, None])
        seen = np.nonzero(inside & (np.abs(hit.t - distance) < 0.1 + 0.01 * distance))[0]
        rows, cols = v[seen].astype(int), u[seen].astype(int)
        matches += (np.abs(image[rows, cols] - rgb[seen]).max(1) <= 40).sum()
        flipped_matches += (np.abs(image[camera.height - 1 - rows, cols] - rgb[seen]).max(1) <= 40).sum()
        checked += len(seen)
    assert checked > 10 * NUM_POINTS
    assert matches / checked > 0.8
    assert flipped_matches / checked < 0.5, "the check should fail for an upside-down camera"


def test_parser_transforms_points_and_cameras_alike(scene: Path, parsed) -> None:
    """Projecting the parser's points with the parser's cameras gives the same pixels as the raw data."""
    meta, camera = read_meta(scene)
    train, _ = parsed
    xyz, _ = read_ply(scene / "sparse_pc.ply")
    points = train.metadata["points3D_xyz"].double().numpy()  # [P, 3]
    by_name = {scene / f["file_path"]: np.array(f["transform_matrix"]) for f in meta["frames"]}
    for index, name in enumerate(train.image_filenames):
        c2w = np.eye(4)
        c2w[:3] = train.cameras.camera_to_worlds[index].double().numpy()
        raw, ours = project(by_name[name], xyz, camera), project(c2w, points, camera)
        # Within twice the frame: far outside it float32 rounding of the parser's points shows in pixels.
        inside = (raw[2] > 0.1) & (np.abs(raw[0] - camera.cx) < camera.width)
        inside &= np.abs(raw[1] - camera.cy) < camera.height
        assert inside.sum() > 50
        np.testing.assert_allclose(ours[0][inside], raw[0][inside], atol=1e-2)
        np.testing.assert_allclose(ours[1][inside], raw[1][inside], atol=1e-2)
        np.testing.assert_allclose(ours[2][inside] / train.dataparser_scale, raw[2][inside], rtol=1e-4)


def small(output_dir: Path, seed: int) -> Path:
    return generate_street_scene(output_dir, num_views=4, width=32, height=24, num_points=500, seed=seed)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_per_seed(tmp_path: Path) -> None:
    first, again, other = small(tmp_path / "a", 3), small(tmp_path / "b", 3), small(tmp_path / "c", 4)
    assert files(first) == files(again)
    assert len(files(first)) == 4 + 2
    assert not np.allclose(street.make_layout(3).hi, street.make_layout(4).hi)
    different = files(other)
    assert different.keys() == files(first).keys()
    assert different["sparse_pc.ply"] != files(first)["sparse_pc.ply"]
    assert different["images/frame_00000.png"] != files(first)["images/frame_00000.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"], "no staging folders left behind"


@pytest.mark.parametrize(
    "name, value",
    [("num_views", 1), ("num_views", 2.5), ("width", 0), ("height", -4), ("num_points", 0), ("seed", -1),
     ("width", True)],
)
def test_bad_arguments_are_refused(tmp_path: Path, name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        generate_street_scene(tmp_path / "out", **{name: value})
    assert not any(tmp_path.iterdir())


def test_existing_dataset_is_replaced_only_when_asked(tmp_path: Path) -> None:
    output = small(tmp_path / "street", 3)
    with pytest.raises(ValueError, match="output_dir"):
        small(output, 4)
    generate_street_scene(output, num_views=3, width=32, height=24, num_points=100, seed=4, overwrite=True)
    assert len(json.loads((output / "transforms.json").read_text())["frames"]) == 3
    assert sorted(p.name for p in (output / "images").iterdir()) == [f"frame_0000{i}.png" for i in range(3)]
    assert [p.name for p in tmp_path.iterdir()] == ["street"]


def test_cli(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "ms_splatfacto.scenes.street", str(tmp_path / "cli"), "--num-views", "3",
               "--width", "24", "--height", "16", "--num-points", "50"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    assert "3 views of 24x16" in result.stdout
    meta = json.loads((tmp_path / "cli" / "transforms.json").read_text())
    assert (meta["w"], meta["h"], len(meta["frames"])) == (24, 16, 3)
    assert np.array(meta["frames"][0]["transform_matrix"]).shape == (4, 4)
