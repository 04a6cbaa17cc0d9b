"""A procedural street of textured boxes, ray cast with numpy and written as a nerfstudio dataset.

The README demo trains on this scene because real captures cannot ship in the repository. The world
is metric with x along the street, y across it and z up. Shading is Lambertian and view independent,
so every view agrees on a surface's colour, as multi-view photometric optimisation assumes.

Usage: `python -m ms_splatfacto.scenes.street OUTPUT_DIR [--num-views 28 --width 128 --height 96]`.
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image
from plyfile import PlyData, PlyElement

STREET_LENGTH = 40.0
"""Metres of street lined with buildings, from x = -2."""
ROAD_HALF_WIDTH = 4.0
BUILDING_LINE = 6.5
"""Distance from the street's axis to the nearest facade (before a random setback)."""
BUILDINGS_PER_SIDE = 5
EYE_HEIGHT = 1.6
FOV_X_DEGREES = 70.0
SUPERSAMPLE = 2
"""Rays per pixel per axis: averaging them keeps thin texture features from aliasing differently per view."""
POINT_NOISE = 0.02
"""Standard deviation (metres) of the noise added to the seed points, as an SfM cloud would have."""
MAX_POINT_DISTANCE = 60.0
"""Seed points farther than this from their camera are dropped (SfM triangulates those poorly)."""
SUN = np.array([-0.45, 0.35, 0.82]) / np.linalg.norm([-0.45, 0.35, 0.82])
AMBIENT, DIFFUSE = 0.45, 0.6
SKY_HORIZON = np.array([0.86, 0.90, 0.95])
SKY_ZENITH = np.array([0.33, 0.53, 0.85])
GROUND, SKY = -1, -2
"""Surface ids of a hit that is not a box (boxes are numbered from 0)."""


@dataclass(frozen=True)
class StreetLayout:
    """Axis-aligned boxes standing on the ground plane z = 0, each with a texture style and two colours."""

    lo: np.ndarray  # [B, 3] min corners
    hi: np.ndarray  # [B, 3] max corners
    style: np.ndarray  # [B] 0 windows, 1 blocks, 2 stripes
    colours: np.ndarray  # [B, 2, 3] base and accent albedo


@dataclass(frozen=True)
class Pinhole:
    """Shared intrinsics of every view; pixel (row i, column j) has its centre at (j + 0.5, i + 0.5)."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    @classmethod
    def for_size(cls, width: int, height: int) -> Pinhole:
        f = 0.5 * width / np.tan(np.radians(FOV_X_DEGREES) / 2)
        return cls(float(f), float(f), width / 2, height / 2, width, height)


@dataclass(frozen=True)
class Hit:
    """Where rays stop: the nearest box face, the ground, or nowhere (sky)."""

    t: np.ndarray  # [R] distance along the unit ray, inf for sky
    normal: np.ndarray  # [R, 3] outward unit normal of the surface hit
    surface: np.ndarray  # [R] box index, GROUND or SKY


def make_layout(seed: int) -> StreetLayout:
    """Buildings on both sides of the street plus one closing its far end, so most rays hit something."""
    rng = np.random.default_rng(seed)
    lo, hi = [], []
    for side in (-1.0, 1.0):
        x = -2.0
        for _ in range(BUILDINGS_PER_SIDE):
            x += rng.uniform(0.5, 2.0)
            width, depth, height = rng.uniform(5.0, 8.0), rng.uniform(4.0, 8.0), rng.uniform(5.0, 14.0)
            near = BUILDING_LINE + rng.uniform(0.0, 1.5)
            y0, y1 = sorted((side * near, side * (near + depth)))
            lo.append((x, y0, 0.0))
            hi.append((x + width, y1, height))
            x += width
    end = STREET_LENGTH + 5.0 + rng.uniform(0.0, 3.0)
    lo.append((end, -14.0, 0.0))
    hi.append((end + 6.0, 14.0, rng.uniform(9.0, 14.0)))
    count = len(lo)
    hues = rng.uniform(0.0, 1.0, count)
    accent_hues = (hues + rng.uniform(0.3, 0.7, count)) % 1.0
    sats, vals = rng.uniform(0.3, 0.65, (2, count)), rng.uniform(0.5, 0.85, (2, count))
    colours = np.array([
        [colorsys.hsv_to_rgb(h, sats[0, b], vals[0, b]), colorsys.hsv_to_rgb(a, sats[1, b], vals[1, b])]
        for b, (h, a) in enumerate(zip(hues, accent_hues))
    ])
    return StreetLayout(np.array(lo), np.array(hi), rng.integers(0, 3, count), colours)


def look(position: np.ndarray, yaw: float, pitch: float) -> np.ndarray:
    """Camera-to-world [4, 4] in the OpenGL/nerfstudio convention: the camera looks down -Z with +Y up."""
    forward = np.array([np.cos(pitch) * np.cos(yaw), np.cos(pitch) * np.sin(yaw), np.sin(pitch)])
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, np.cross(right, forward), -forward, position
    return c2w


def camera_path(num_views: int) -> np.ndarray:
    """[N, 4, 4] views walking down the street, swaying their gaze; every fourth one faces a facade."""
    poses = []
    for i in range(num_views):
        s = i / (num_views - 1)
        x = 1.0 + s * (STREET_LENGTH - 5.0)
        if i % 4 == 3:
            # Alternate sides, and per side alternate leaning forward and back, for varied facade angles.
            k = i // 4
            side, lean = (1.0 if k % 2 == 0 else -1.0), (1.0 if k % 4 < 2 else -1.0)
            yaw = side * (np.pi / 2 + lean * np.radians(25.0))
            poses.append(look(np.array([x, -1.5 * side, EYE_HEIGHT]), yaw, np.radians(12.0)))
        else:
            yaw = np.radians(25.0) * np.sin(3 * np.pi * s)
            position = np.array([x, 1.5 * np.sin(2 * np.pi * s), EYE_HEIGHT + 0.2 * np.cos(5 * np.pi * s)])
            poses.append(look(position, yaw, np.radians(4.0)))
    return np.stack(poses)


def camera_rays(c2w: np.ndarray, px: np.ndarray, py: np.ndarray, camera: Pinhole) -> tuple[np.ndarray, np.ndarray]:
    """Unit rays through image points (px, py) [...]; c2w is [4, 4] or [..., 4, 4]. Returns origins, dirs [..., 3]."""
    local = np.stack([(px - camera.cx) / camera.fx, -(py - camera.cy) / camera.fy, -np.ones_like(px)], -1)
    dirs = (c2w[..., :3, :3] @ local[..., None])[..., 0]
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    return np.broadcast_to(c2w[..., :3, 3], dirs.shape), dirs


def cast(layout: StreetLayout, origins: np.ndarray, dirs: np.ndarray) -> Hit:
    """Nearest hit of rays [R, 3] against the boxes (slab test, vectorised over rays and boxes) and the ground."""
    # A zero component would give 0 * inf = nan in the slab test; a tiny one gives the right infinities.
    inv = 1.0 / np.where(np.abs(dirs) < 1e-12, 1e-12, dirs)  # [R, 3]
    t0 = (layout.lo[None] - origins[:, None]) * inv[:, None]  # [R, B, 3]
    t1 = (layout.hi[None] - origins[:, None]) * inv[:, None]  # [R, B, 3]
    t_in = np.minimum(t0, t1)  # [R, B, 3]
    enter, leave = t_in.max(-1), np.maximum(t0, t1).min(-1)  # [R, B]
    t_box = np.where((enter <= leave) & (enter > 1e-6), enter, np.inf)  # [R, B]
    rays = np.arange(len(dirs))
    box = t_box.argmin(1)  # [R]
    t = t_box[rays, box]  # [R]
    axis = t_in[rays, box].argmax(-1)  # [R] the slab entered last is the face hit
    normal = np.zeros_like(dirs)  # [R, 3]
    normal[rays, axis] = -np.sign(dirs[rays, axis])
    surface = np.where(np.isfinite(t), box, SKY)
    with np.errstate(divide="ignore"):
        t_ground = np.where(dirs[:, 2] < 0, -origins[:, 2] / dirs[:, 2], np.inf)  # [R]
    ground = t_ground < t
    t = np.where(ground, t_ground, t)
    normal[ground] = (0.0, 0.0, 1.0)
    return Hit(t, normal, np.where(ground, GROUND, surface))


def _hash01(*keys: np.ndarray) -> np.ndarray:
    """Deterministic per-cell random numbers in [0, 1) from integer keys, so textures need no storage."""
    h = np.full(np.broadcast(*keys).shape, 0x9E3779B97F4A7C15, dtype=np.uint64)
    for key in keys:
        h ^= np.asarray(key, dtype=np.int64).astype(np.uint64) + (h << np.uint64(6)) + (h >> np.uint64(2))
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
    return (h >> np.uint64(11)).astype(np.float64) / 2.0**53


def _ground_albedo(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Asphalt road with lane markings, tiled sidewalks, then grass; features wide enough not to alias."""
    ay = np.abs(y)
    cell = np.floor(x / 1.5), np.floor(y / 1.5)
    colour = (0.25 + 0.08 * _hash01(*cell))[:, None] * np.ones(3)  # [P, 3]
    tile = (np.abs(x - np.round(x)) < 0.04) | (np.abs(y - np.round(y)) < 0.04)
    paving = np.where(tile, 0.45, 0.6 + 0.12 * _hash01(np.floor(x), np.floor(y), 7))[:, None] * np.ones(3)
    colour = np.where((ay >= ROAD_HALF_WIDTH)[:, None], paving, colour)
    checker = (np.floor(x / 3.0) + np.floor(y / 3.0)) % 2
    grass = np.array([0.25, 0.45, 0.18]) * (0.85 + 0.15 * checker)[:, None]
    colour = np.where((ay >= BUILDING_LINE + 1.5)[:, None], grass, colour)
    dash = (ay < 0.12) & (np.mod(x, 4.0) < 2.0)
    colour = np.where(dash[:, None], (0.9, 0.8, 0.3), colour)
    return np.where((np.abs(ay - ROAD_HALF_WIDTH + 0.4) < 0.1)[:, None], 0.9, colour)


def _box_albedo(layout: StreetLayout, box: np.ndarray, point: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Facade textures in face coordinates (u along the wall from its corner, v = height); roofs are plain."""
    base, accent = layout.colours[box, 0], layout.colours[box, 1]  # [P, 3] each
    x_face = np.abs(normal[:, 0]) > 0.5
    u = np.where(x_face, point[:, 1] - layout.lo[box, 1], point[:, 0] - layout.lo[box, 0])  # [P]
    v = point[:, 2]  # [P]
    face = np.argmax(np.abs(normal), -1) * 2 + (normal.sum(-1) > 0)  # [P] which of the six faces
    style = layout.style[box]
    colour = base.copy()

    # Windows on a floor grid, some lit, with a ground-floor band in the accent colour.
    col, floor = np.floor(u / 2.2), np.floor(v / 3.0)
    fu, fv = u / 2.2 - col, v / 3.0 - floor
    pane = (np.abs(fu - 0.5) < 0.25) & (fv > 0.3) & (fv < 0.8)
    lit = _hash01(col, floor, box, face) < 0.3
    dark = np.array([0.15, 0.2, 0.3]) * (0.7 + 0.6 * _hash01(col, floor, box))[:, None]  # [P, 3]
    glass = np.where(lit[:, None], (0.95, 0.85, 0.45), dark)
    windows = np.where(pane[:, None], glass, np.where((floor == 0)[:, None], accent, base))
    colour = np.where((style == 0)[:, None], windows, colour)

    # Running-bond blocks with light mortar and a random shade per block.
    row = np.floor(v / 0.6)
    bu = u / 1.2 + 0.5 * (row % 2)
    mortar = (np.abs(bu - np.round(bu)) < 0.06) | (np.abs(v / 0.6 - np.round(v / 0.6)) < 0.1)
    blocks = np.where(mortar[:, None], 0.8, base * (0.7 + 0.6 * _hash01(np.floor(bu), row, box))[:, None])
    colour = np.where((style == 1)[:, None], blocks, colour)

    # Horizontal bands in the two colours, crossed by darker pilasters.
    bands = np.where((np.floor(v / 0.8) % 2 == 0)[:, None], base, accent)
    stripes = np.where((np.mod(u, 3.0) < 0.4)[:, None], 0.5 * base, bands)
    colour = np.where((style == 2)[:, None], stripes, colour)
    return np.where((np.abs(normal[:, 2]) > 0.5)[:, None], 0.6 * base, colour)


def radiance(layout: StreetLayout, hit: Hit, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Colour [R, 3] in [0, 1] seen along each ray: shaded albedo where it hits, the sky gradient elsewhere."""
    point = origins + np.where(np.isfinite(hit.t), hit.t, 0.0)[:, None] * dirs  # [R, 3]
    colour = np.zeros_like(dirs)  # [R, 3]
    ground = hit.surface == GROUND
    colour[ground] = _ground_albedo(point[ground, 0], point[ground, 1])
    box = hit.surface >= 0
    colour[box] = _box_albedo(layout, hit.surface[box], point[box], hit.normal[box])
    colour *= (AMBIENT + DIFFUSE * np.clip(hit.normal @ SUN, 0.0, None))[:, None]
    up = np.sqrt(np.clip(dirs[:, 2], 0.0, 1.0))[:, None]
    colour = np.where((hit.surface == SKY)[:, None], (1 - up) * SKY_HORIZON + up * SKY_ZENITH, colour)
    return np.clip(colour, 0.0, 1.0)


def to_uint8(colour: np.ndarray) -> np.ndarray:
    """Colours in [0, 1] to 8-bit, rounding as both the images and the seed points are stored."""
    return np.round(colour * 255.0).astype(np.uint8)


def render(layout: StreetLayout, c2w: np.ndarray, camera: Pinhole, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """The view [H, W, 3] uint8 from camera-to-world c2w [4, 4], averaging supersample^2 rays per pixel."""
    offsets = (np.arange(supersample) + 0.5) / supersample  # [S]
    py = np.arange(camera.height)[:, None, None, None] + offsets[None, :, None, None]  # [H, S, 1, 1]
    px = np.arange(camera.width)[None, None, :, None] + offsets[None, None, None, :]  # [1, 1, W, S]
    py, px = np.broadcast_arrays(py, px)  # [H, S, W, S] each
    origins, dirs = camera_rays(c2w, px.reshape(-1), py.reshape(-1), camera)  # [R, 3] each
    colour = radiance(layout, cast(layout, origins, dirs), origins, dirs)  # [R, 3]
    return to_uint8(colour.reshape(camera.height, supersample, camera.width, supersample, 3).mean((1, 3)))


def sample_seed_points(
    layout: StreetLayout, poses: np.ndarray, camera: Pinhole, num_points: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Points on surfaces the views see, with their seen colour and positional noise, like an SfM cloud.

    Rays through random pixels of random views make every point visible somewhere, and make the
    density fall with distance as triangulated points do. Returns xyz [P, 3] float32, rgb [P, 3] uint8.
    """
    xyz, rgb, found = [], [], 0
    while found < num_points:
        count = 2 * num_points
        views = rng.integers(0, len(poses), count)  # [R]
        px, py = rng.uniform(0, camera.width, count), rng.uniform(0, camera.height, count)  # [R] each
        origins, dirs = camera_rays(poses[views], px, py, camera)  # [R, 3] each
        hit = cast(layout, origins, dirs)
        keep = (hit.surface != SKY) & (hit.t < MAX_POINT_DISTANCE)
        origins, dirs, hit = origins[keep], dirs[keep], Hit(hit.t[keep], hit.normal[keep], hit.surface[keep])
        xyz.append(origins + hit.t[:, None] * dirs)
        rgb.append(to_uint8(radiance(layout, hit, origins, dirs)))
        found += int(keep.sum())
    points = np.concatenate(xyz)[:num_points]  # [P, 3]
    points += rng.normal(0.0, POINT_NOISE, points.shape)
    return points.astype(np.float32), np.concatenate(rgb)[:num_points]


def nerfstudio_meta(camera, width: int, height: int, frames: list, generator: dict) -> dict:
    """transforms.json of a generated scene: one undistorted pinhole camera shared by all frames, and the
    seed points in sparse_pc.ply."""
    return {
        "camera_model": "OPENCV",
        "fl_x": camera.fx, "fl_y": camera.fy, "cx": camera.cx, "cy": camera.cy, "w": width, "h": height,
        "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0,
        "ply_file_path": "sparse_pc.ply",
        "frames": frames,
        "generator": generator,
    }


def write_ply(path: Path, xyz: np.ndarray, rgb: np.ndarray) -> None:
    """Vertices with x, y, z float and red, green, blue uchar: what nerfstudio's loader (open3d) expects."""
    vertex = np.empty(len(xyz), dtype=[(n, "f4") for n in "xyz"] + [(n, "u1") for n in ("red", "green", "blue")])
    for i, name in enumerate("xyz"):
        vertex[name] = xyz[:, i]
    for i, name in enumerate(("red", "green", "blue")):
        vertex[name] = rgb[:, i]
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(path))


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


def check_output_dir(output_dir: Path, overwrite: bool) -> Path:
    """Refuse to write over a file, or over a non-empty folder unless overwrite is set."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir {output_dir} exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(f"output_dir {output_dir} is not empty (pass overwrite=True to replace it)")
    return output_dir


@contextmanager
def staged_dataset(output_dir: Path) -> Iterator[Path]:
    """A temporary folder beside output_dir that replaces it when the block completes, so that an
    interrupted run leaves no partial dataset (and the previous one, if any, intact)."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".tmp", dir=output_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's folder is private; a dataset is not
    try:
        yield staging
        if output_dir.exists():
            # Move the old dataset aside first: a rename cannot replace a non-empty folder.
            old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".old", dir=output_dir.parent))
            os.replace(output_dir, old)
            os.replace(staging, output_dir)
            shutil.rmtree(old)
        else:
            os.replace(staging, output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def generate_street_scene(
    output_dir: Path,
    num_views: int = 28,
    width: int = 128,
    height: int = 96,
    num_points: int = 4000,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the street as a nerfstudio dataset (transforms.json, images/, sparse_pc.ply) into output_dir.

    The seed picks the buildings (sizes, textures, colours) and the seed points; the camera path depends
    only on num_views. The dataset is built in a temporary folder beside output_dir and renamed into place,
    so an interrupted run leaves no partial dataset. An existing non-empty output_dir is replaced only
    with overwrite=True. Load it with nerfstudio's `nerfstudio-data` parser (load_3D_points=True).
    """
    _check_int("num_views", num_views, 2)
    _check_int("width", width, 8)
    _check_int("height", height, 8)
    _check_int("num_points", num_points, 1)
    _check_int("seed", seed, 0)
    output_dir = check_output_dir(output_dir, overwrite)
    layout, poses, camera = make_layout(seed), camera_path(num_views), Pinhole.for_size(width, height)
    rng = np.random.default_rng([seed, 1])
    with staged_dataset(output_dir) as staging:
        (staging / "images").mkdir()
        frames = []
        for index, c2w in enumerate(poses):
            file_path = f"images/frame_{index:05d}.png"
            Image.fromarray(render(layout, c2w, camera)).save(staging / file_path)
            frames.append({"file_path": file_path, "transform_matrix": c2w.tolist()})
        write_ply(staging / "sparse_pc.ply", *sample_seed_points(layout, poses, camera, num_points, rng))
        meta = nerfstudio_meta(camera, width, height, frames,
                               {"scene": "ms_splatfacto.scenes.street", "seed": seed, "num_points": num_points})
        (staging / "transforms.json").write_text(json.dumps(meta, indent=2))
    return output_dir


def main(
    output_dir: Path,
    num_views: int = 28,
    width: int = 128,
    height: int = 96,
    num_points: int = 4000,
    seed: int = 0,
    overwrite: bool = False,
) -> None:
    """Generate the procedural street dataset (transforms.json, images/, sparse_pc.ply) into OUTPUT_DIR."""
    start = time.perf_counter()
    generate_street_scene(output_dir, num_views, width, height, num_points, seed, overwrite)
    print(
        f"Wrote {output_dir}: transforms.json, {num_views} views of {width}x{height} in images/, "
        f"{num_points} seed points in sparse_pc.ply (seed {seed}, {time.perf_counter() - start:.1f} s)"
    )


if __name__ == "__main__":
    import tyro

    tyro.cli(main, config=(tyro.conf.PositionalRequiredArgs,))
