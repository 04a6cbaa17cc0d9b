"""The generated city: nerfstudio's parser reads it, its views are renders of one scene (seed points land on
pixels of their colour), its cameras stand where they should, and a seed writes the same files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from PIL import Image
from plyfile import PlyData

from ms_splatfacto.scenes import city
from ms_splatfacto.scenes.city import ROAD_HALF_WIDTH, generate_city_scene
from ms_splatfacto.scenes.street import Pinhole
from tests.test_street_scene import read_meta

REPO = Path(__file__).resolve().parents[1]
CAMERAS, WIDTH, HEIGHT, POINTS = 40, 64, 48, 3000


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("city") / "city"
    return generate_city_scene(output, cameras=CAMERAS, width=WIDTH, height=HEIGHT, num_points=POINTS, workers=1)


@pytest.fixture(scope="module")
def parsed(scene: Path):
    parser = NerfstudioDataParserConfig(data=scene, load_3D_points=True).setup()
    return parser.get_dataparser_outputs("train"), parser.get_dataparser_outputs("val")


def read_ply(path: Path) -> tuple[np.ndarray, np.ndarray]:
    vertex = PlyData.read(str(path))["vertex"]
    xyz = np.stack([vertex[n] for n in "xyz"], 1).astype(np.float64)  # [P, 3]
    return xyz, np.stack([vertex[n] for n in ("red", "green", "blue")], 1).astype(int)  # [P, 3]


def project(c2w: np.ndarray, xyz: np.ndarray, camera: Pinhole) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pinhole projection with an OpenGL camera-to-world (looks down -Z, +Y up): pixel u, v [P] and depth [P]."""
    w2c = np.linalg.inv(c2w)
    local = xyz @ w2c[:3, :3].T + w2c[:3, 3]  # [P, 3]
    depth = -local[:, 2]
    return camera.fx * local[:, 0] / depth + camera.cx, -camera.fy * local[:, 1] / depth + camera.cy, depth


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_nerfstudio_parser_reads_the_city(scene: Path, parsed) -> None:
    train, val = parsed
    assert len(train.image_filenames) + len(val.image_filenames) == CAMERAS
    assert len(val.image_filenames) >= 2 and not set(train.image_filenames) & set(val.image_filenames)
    for outputs in (train, val):
        assert (outputs.cameras.width == WIDTH).all() and (outputs.cameras.height == HEIGHT).all()
        for name in outputs.image_filenames:
            assert Image.open(name).size == (WIDTH, HEIGHT)
        assert outputs.metadata["points3D_xyz"].shape == (POINTS, 3)
        assert outputs.metadata["points3D_rgb"].shape == (POINTS, 3)
    # Scene scale: the parser fits the cameras into [-1, 1] and keeps the city's z up.
    positions = train.cameras.camera_to_worlds[:, :, 3]
    assert positions.abs().max() <= 1.0 + 1e-5 and positions.abs().max() > 0.5
    assert train.dataparser_transform[2, 2] > 0.99


def test_views_are_renders_of_the_scene(scene: Path) -> None:
    """The JPEGs on disk are the ray caster's views (up to compression), and the views differ."""
    meta, camera = read_meta(scene)
    layout = city.make_city(4, 0)
    first = None
    for frame in meta["frames"][:3]:
        rendered, _, _ = city.render_view(layout, np.array(frame["transform_matrix"]), camera)
        on_disk = np.array(Image.open(scene / frame["file_path"])).astype(int)
        assert np.abs(on_disk - rendered).mean() < 5.0
        first = rendered if first is None else first
    assert np.abs(first.astype(int) - rendered).mean() > 10


def surface_distance(layout: city.City, xyz: np.ndarray) -> np.ndarray:
    """Distance [P] from each point to the nearest building face or the ground."""
    outside = np.maximum(np.maximum(layout.lo[None] - xyz[:, None], xyz[:, None] - layout.hi[None]), 0)  # [P, B, 3]
    inside = np.minimum(xyz[:, None] - layout.lo[None], layout.hi[None] - xyz[:, None]).min(-1)  # [P, B]
    to_box = np.where(inside > 0, inside, np.linalg.norm(outside, axis=-1))  # [P, B]
    return np.minimum(to_box.min(1), np.abs(xyz[:, 2]))


def test_seed_points_lie_on_surfaces(scene: Path) -> None:
    xyz, _ = read_ply(scene / "sparse_pc.ply")
    layout = city.make_city(4, 0)
    distance = surface_distance(layout, xyz)
    assert np.mean(distance < 5 * city.POINT_NOISE) > 0.99
    shifted = xyz + 0.4  # 0.4 m off every axis-aligned surface: the check should fail for these
    assert np.mean(surface_distance(layout, shifted) < 5 * city.POINT_NOISE) < 0.5
    assert (xyz[:, 2] > 1.0).mean() > 0.2 and (np.abs(xyz[:, 2]) < 0.1).mean() > 0.2  # walls and roofs, and ground


def test_seed_points_project_onto_their_colour(scene: Path) -> None:
    """Nearly every seed point is seen by some view on a pixel of its colour, and most views that see it
    agree (one scene, not per-image paintings); shuffled colours match far less often."""
    meta, camera = read_meta(scene)
    layout = city.make_city(4, 0)
    xyz, rgb = read_ply(scene / "sparse_pc.ply")
    shuffled = rgb[np.random.default_rng(0).permutation(len(rgb))]
    best, best_shuffled = np.full(len(xyz), 255), np.full(len(xyz), 255)
    every, every_shuffled = [], []
    for frame in meta["frames"]:
        c2w = np.array(frame["transform_matrix"])
        image = np.array(Image.open(scene / frame["file_path"])).astype(int)  # [H, W, 3]
        _, t, _ = city.render_view(layout, c2w, camera)  # [H, W] distance to the surface each pixel sees
        u, v, depth = project(c2w, xyz, camera)
        seen = np.nonzero((depth > 0.1) & (u >= 0) & (u < camera.width) & (v >= 0) & (v < camera.height))[0]
        rows, cols = v[seen].astype(int), u[seen].astype(int)
        distance = np.linalg.norm(xyz[seen] - c2w[:3, 3], axis=1)
        visible = np.abs(t[rows, cols] - distance) < 0.1 + 0.01 * distance  # not hidden behind another surface
        seen, rows, cols = seen[visible], rows[visible], cols[visible]
        error = np.abs(image[rows, cols] - rgb[seen]).max(1)
        error_shuffled = np.abs(image[rows, cols] - shuffled[seen]).max(1)
        best[seen], best_shuffled[seen] = np.minimum(best[seen], error), np.minimum(best_shuffled[seen], error_shuffled)
        every.append(error)
        every_shuffled.append(error_shuffled)
    assert np.mean(best < 255) > 0.99, "seed points seen by no view"
    assert np.mean(best <= 16) > 0.95, np.percentile(best, [50, 90, 95, 99])
    assert np.mean(best_shuffled <= 16) < 0.4
    every, every_shuffled = np.concatenate(every), np.concatenate(every_shuffled)
    assert len(every) > 1.5 * POINTS
    assert np.mean(every <= 24) > 0.75 and np.mean(every_shuffled <= 24) < 0.4


def test_cameras_stand_where_they_should(scene: Path) -> None:
    meta, _ = read_meta(scene)
    layout = city.make_city(4, 0)
    kinds = [f["camera_kind"] for f in meta["frames"]]
    assert {kind: kinds.count(kind) for kind in city.KINDS} == {"street": 28, "nadir": 6, "oblique": 6}
    top = layout.hi[:, 2].max()
    for frame, kind in zip(meta["frames"], kinds):
        c2w = np.array(frame["transform_matrix"])
        axis, position = -c2w[:3, 2], c2w[:3, 3]  # the optical axis: OpenGL cameras look down -Z
        assert abs(np.linalg.det(c2w[:3, :3]) - 1) < 1e-9
        if kind == "nadir":
            assert axis[2] < -0.99 and position[2] > top
        elif kind == "oblique":
            assert -np.sin(np.radians(60)) < axis[2] < -np.sin(np.radians(20)) and position[2] > top
        else:
            assert 1.3 < position[2] < 2.5 and abs(axis[2]) < np.sin(np.radians(25))
            # In a carriageway: near a street centre line, outside every building.
            near_line = np.abs(position[:2, None] - layout.lines[None]).min(1)  # [2]
            assert near_line.min() < ROAD_HALF_WIDTH
            assert not ((position >= layout.lo) & (position <= layout.hi)).all(1).any()


def test_deterministic_per_seed_whatever_the_workers(tmp_path: Path) -> None:
    def small(name: str, seed: int, workers: int) -> dict[str, bytes]:
        return files(generate_city_scene(tmp_path / name, cameras=6, width=32, height=24, blocks=2,
                                         num_points=200, seed=seed, workers=workers))

    first, again, other = small("a", 5, 1), small("b", 5, 2), small("c", 6, 1)
    assert first == again
    assert len(first) == 6 + 2
    assert other.keys() == first.keys()
    assert other["sparse_pc.ply"] != first["sparse_pc.ply"]
    assert sum(other[k] != first[k] for k in first if k.startswith("images/")) >= 5
    assert not np.allclose(city.make_city(2, 5).hi, city.make_city(2, 6).hi)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"], "no staging folders left behind"


def test_png_images_are_exact_renders(tmp_path: Path) -> None:
    scene = generate_city_scene(tmp_path / "png", cameras=3, width=32, height=24, blocks=2, num_points=50,
                                seed=2, image_format="png", workers=1)
    meta, camera = read_meta(scene)
    frame = meta["frames"][1]
    rendered, _, _ = city.render_view(city.make_city(2, 2), np.array(frame["transform_matrix"]), camera)
    assert np.array_equal(np.array(Image.open(scene / frame["file_path"])), rendered)


@pytest.mark.parametrize("name, value", [("cameras", 1), ("width", 4), ("blocks", 0), ("num_points", 0.5),
                                         ("seed", -1), ("image_format", "gif"), ("workers", 0)])
def test_bad_arguments_are_refused(tmp_path: Path, name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        generate_city_scene(tmp_path / "out", **{name: value})
    assert not any(tmp_path.iterdir())


def test_cli(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "ms_splatfacto.scenes.city"]
    help_text = subprocess.run([*run, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120, check=True).stdout
    for flag in ("--cameras", "--width", "--height", "--output", "--seed"):
        assert flag in help_text
    result = subprocess.run([*run, "--cameras", "4", "--width", "24", "--height", "16", "--points", "100",
                             "--blocks", "2", "--seed", "3", "--output", str(tmp_path / "cli")],
                            cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    assert "4 views of 24x16" in result.stdout
    meta = json.loads((tmp_path / "cli" / "transforms.json").read_text())
    assert (meta["w"], meta["h"], len(meta["frames"]), meta["generator"]["seed"]) == (24, 16, 4, 3)
    assert len(list((tmp_path / "cli" / "images").glob("*.jpg"))) == 4
