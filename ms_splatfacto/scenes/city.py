"""A procedural city block grid, ray cast with numpy and written as a nerfstudio dataset of any size.

City-scale training needs thousands of consistent views of one scene, street level and aerial, which no
repository can ship. This renders them: a grid of blocks of textured buildings between streets, seen from
cameras along the streets (looking along and across) and above them (nadir and oblique). The world is
metric with z up. Shading is Lambertian and view independent; textures are box-filtered over each pixel's
footprint (as a camera's pixel integrates area), so one ray per pixel does not alias and views agree.

Usage: `python -m ms_splatfacto.scenes.city --cameras 2000 --width 256 --height 192 --output DIR [--seed 0]`.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from ms_splatfacto.scenes.city_textures import ROAD_HALF_WIDTH, STREET, ground_albedo, palette, roof_albedo, wall_albedo
from ms_splatfacto.scenes.street import (
    nerfstudio_meta,
    AMBIENT, DIFFUSE, SKY_HORIZON, SKY_ZENITH, SUN, Pinhole, _check_int, camera_rays, check_output_dir, staged_dataset,
    to_uint8, write_ply,
)

BLOCK = 44.0
"""Side of a block, metres; streets (STREET wide, facade line to facade line) run between blocks."""
AERIAL_FRACTION = (0.15, 0.15)
"""Fractions of the cameras that are nadir and oblique aerial views; the rest stand in the streets."""
MAX_POINT_DISTANCE = 150.0
"""Seed points farther than this from the view they come from are dropped (SfM triangulates those poorly)."""
POINT_NOISE = 0.02
"""Standard deviation (metres) of the noise added to the seed points, as an SfM cloud would have."""
GROUND, SKY = -1, -2
"""Surface ids of a hit that is not a building (buildings are numbered from 0)."""
KINDS = ("street", "nadir", "oblique")


@dataclass(frozen=True)
class City:
    """Buildings (axis-aligned boxes on the ground z = 0) with per-building facade parameters."""

    blocks: int
    lines: np.ndarray  # [blocks + 1] street centre lines, the same coordinates along x and y
    lo: np.ndarray  # [B, 3] min corners
    hi: np.ndarray  # [B, 3] max corners
    floor_height: np.ndarray  # [B] metres per storey
    bay: np.ndarray  # [B] metres per window column
    pane: np.ndarray  # [B, 2] window fraction of a bay (u) and of a storey (v); u = 1 gives ribbon windows
    brick: np.ndarray  # [B] bool: mortar courses on the wall
    wall: np.ndarray  # [B, 3] albedo of the wall
    accent: np.ndarray  # [B, 3] ground-floor shop front
    glass: np.ndarray  # [B, 3] unlit window
    roof: np.ndarray  # [B, 3]

    @property
    def period(self) -> float:
        """Distance between neighbouring street centre lines."""
        return BLOCK + STREET

    @property
    def extent(self) -> float:
        """Half the side of the square the streets span (perimeter streets included)."""
        return float(self.lines[-1] + STREET / 2)


def make_city(blocks: int, seed: int) -> City:
    """Blocks of 2 to 3 x 2 to 3 lots, most holding a building of 2 to 12 storeys; gaps make courtyards."""
    rng = np.random.default_rng(seed)
    lines = (np.arange(blocks + 1) - blocks / 2) * (BLOCK + STREET)
    lo, hi = [], []
    for x0, y0 in [(lines[i] + STREET / 2, lines[j] + STREET / 2) for i in range(blocks) for j in range(blocks)]:
        # Lot boundaries across the block (2 or 3 lots a side); the block's edge is the facade line.
        cu, cv = ((np.arange(n + 1) + np.r_[0, rng.uniform(-0.2, 0.2, n - 1), 0]) / n * BLOCK for n in rng.integers(2, 4, 2))
        for i, j in [(i, j) for i in range(len(cu) - 1) for j in range(len(cv) - 1)]:
            if rng.uniform() < 0.12:
                continue  # an empty lot: a courtyard or plaza
            inner = np.array([i > 0, j > 0, i < len(cu) - 2, j < len(cv) - 2])
            # A gap from the neighbours inside the block, a setback from the street.
            inset = np.where(inner, rng.uniform(0.0, 1.5, 4), rng.uniform(0.0, 1.2, 4))
            lo.append((x0 + cu[i] + inset[0], y0 + cv[j] + inset[1], 0.0))
            hi.append((x0 + cu[i + 1] - inset[2], y0 + cv[j + 1] - inset[3], rng.integers(2, 13)))  # storeys
    count = len(lo)
    lo, hi = np.array(lo), np.array(hi)
    floor_height = rng.uniform(2.9, 3.8, count)
    hi[:, 2] = hi[:, 2] * floor_height + rng.uniform(0.3, 1.2, count)  # storeys to metres, plus a parapet
    pane = np.stack([np.where(rng.uniform(size=count) < 0.2, 1.0, rng.uniform(0.35, 0.7, count)),
                     rng.uniform(0.4, 0.65, count)], 1)
    return City(
        blocks, lines, lo, hi, floor_height, rng.uniform(1.8, 3.2, count), pane, rng.uniform(size=count) < 0.3,
        palette(rng, count, (0.1, 0.45), (0.55, 0.9)), palette(rng, count, (0.4, 0.8), (0.35, 0.7)),
        palette(rng, count, (0.2, 0.5), (0.12, 0.3), hue=(0.5, 0.7)),
        palette(rng, count, (0.0, 0.2), (0.3, 0.55)),
    )


def pose(position: np.ndarray, forward: np.ndarray, up_hint: np.ndarray) -> np.ndarray:
    """Camera-to-world [4, 4], OpenGL/nerfstudio convention (looks down -Z, +Y up); up_hint sets the roll."""
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, up_hint)
    right /= np.linalg.norm(right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, np.cross(right, forward), -forward, position
    return c2w


def _heading(yaw: float, pitch: float = 0.0) -> np.ndarray:
    return np.array([np.cos(pitch) * np.cos(yaw), np.cos(pitch) * np.sin(yaw), np.sin(pitch)])


def camera_poses(city: City, count: int, seed: int) -> Tuple[np.ndarray, List[str]]:
    """[N, 4, 4] camera-to-world poses and their kinds, shuffled so any split holds every kind.

    Street cameras stand in a carriageway at 1.4 to 2.4 m, looking along it or across at the facades
    (pitched up a little). Nadir cameras look straight down from 60 to 110 m, oblique ones from 35 to 90 m
    at 25 to 55 degrees below the horizon towards the city.
    """
    rng = np.random.default_rng([seed, 1])
    nadir, oblique = (int(round(count * f)) for f in AERIAL_FRACTION)
    kinds = rng.permutation(["street"] * (count - nadir - oblique) + ["nadir"] * nadir + ["oblique"] * oblique)
    streets = city.lines[1:-1] if city.blocks >= 2 else city.lines
    top = float(city.hi[:, 2].max()) if len(city.hi) else 0.0
    poses = []
    for kind in kinds:
        if kind == "street":
            along_x = rng.uniform() < 0.5
            offset = rng.choice(streets) + rng.uniform(-1, 1) * (ROAD_HALF_WIDTH - 0.8)
            run = rng.uniform(-city.extent, city.extent)
            x, y = (run, offset) if along_x else (offset, run)
            direction = (0.0 if along_x else np.pi / 2) + (np.pi if rng.uniform() < 0.5 else 0.0)
            across = rng.uniform() < 0.4
            yaw = direction + (np.pi / 2 if across else 0.0) + rng.uniform(-1, 1) * np.radians(20)
            pitch = np.radians(rng.uniform(5, 20) if across else rng.uniform(0, 8))
            poses.append(pose(np.array([x, y, rng.uniform(1.4, 2.4)]), _heading(yaw, pitch), np.array([0, 0, 1.0])))
        elif kind == "nadir":
            xy = rng.uniform(-city.extent, city.extent, 2)
            height = max(rng.uniform(60, 110), top + 20)
            poses.append(pose(np.array([*xy, height]), np.array([0, 0, -1.0]), _heading(rng.uniform(0, 2 * np.pi))))
        else:
            xy = rng.uniform(-1.2, 1.2, 2) * city.extent
            yaw = np.arctan2(-xy[1], -xy[0]) + rng.uniform(-1, 1) * np.radians(45)
            height = max(rng.uniform(35, 90), top + 10)
            forward = _heading(yaw, -np.radians(rng.uniform(25, 55)))
            poses.append(pose(np.array([*xy, height]), forward, np.array([0, 0, 1.0])))
    return np.stack(poses), [str(k) for k in kinds]


def _box_regions(city: City, c2w: np.ndarray, camera: Pinhole) -> List[Tuple[int, float, slice, slice]]:
    """(box, distance from the camera, rows, columns) of every box that can show in the view, nearest first.

    A box's pixels lie inside its corners' projected bounding rectangle; a box reaching behind the camera
    gets the whole image. Testing rays only there is what makes a city of hundreds of boxes cheap.
    """
    w2c = np.linalg.inv(c2w)
    pick = (np.arange(8)[:, None] >> np.arange(3)) & 1  # [8, 3] which of lo / hi each corner takes
    corners = np.where(pick[None] == 1, city.hi[:, None], city.lo[:, None])  # [B, 8, 3]
    local = corners @ w2c[:3, :3].T + w2c[:3, 3]  # [B, 8, 3]
    depth = -local[..., 2]  # [B, 8]
    centre = c2w[:3, 3]
    nearest = np.clip(centre, city.lo, city.hi)  # [B, 3]
    distance = np.linalg.norm(nearest - centre, axis=1)  # [B]
    regions = []
    for b in np.argsort(distance, kind="stable"):
        if (depth[b] <= 1e-3).all():
            continue  # wholly behind the camera
        if (depth[b] > 1e-3).all():
            u = camera.fx * local[b, :, 0] / depth[b] + camera.cx
            v = -camera.fy * local[b, :, 1] / depth[b] + camera.cy
            c0, c1 = max(int(np.floor(u.min() - 0.5)), 0), min(int(np.ceil(u.max() + 0.5)), camera.width)
            r0, r1 = max(int(np.floor(v.min() - 0.5)), 0), min(int(np.ceil(v.max() + 0.5)), camera.height)
            if c0 >= c1 or r0 >= r1:
                continue
        else:
            r0, r1, c0, c1 = 0, camera.height, 0, camera.width
        regions.append((int(b), float(distance[b]), slice(r0, r1), slice(c0, c1)))
    return regions


def cast_view(city: City, c2w: np.ndarray, camera: Pinhole) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest hits of the pixel-centre rays of one view: distance t [H, W] (inf for sky), surface [H, W]
    (box index, GROUND or SKY) and the unit rays [H, W, 3]. Slab tests run box by box, nearest first,
    on the box's screen rectangle only, and skip a box that the hits so far already hide."""
    py, px = np.meshgrid(np.arange(camera.height) + 0.5, np.arange(camera.width) + 0.5, indexing="ij")  # [H, W]
    origin, dirs = camera_rays(c2w, px, py, camera)  # [H, W, 3]
    origin = c2w[:3, 3]
    with np.errstate(divide="ignore"):
        inv = [1.0 / np.where(np.abs(dirs[..., a]) < 1e-12, 1e-12, dirs[..., a]) for a in range(3)]  # 3 x [H, W]
        t = np.where(dirs[..., 2] < 0, -origin[2] / dirs[..., 2], np.inf)  # [H, W] the ground
    surface = np.where(np.isfinite(t), GROUND, SKY)
    for b, distance, rows, cols in _box_regions(city, c2w, camera):
        t_here = t[rows, cols]
        if t_here.max() < distance:
            continue  # hidden
        enter, leave = np.zeros_like(t_here), np.full_like(t_here, np.inf)
        for a in range(3):
            i = inv[a][rows, cols]
            near, far = (city.lo[b, a] - origin[a]) * i, (city.hi[b, a] - origin[a]) * i
            enter = np.maximum(enter, np.minimum(near, far))
            leave = np.minimum(leave, np.maximum(near, far))
        hit = (enter <= leave) & (enter < t_here)
        t_here[hit] = enter[hit]  # t_here is a view: this writes t
        surface[rows, cols][hit] = b
    return t, surface, dirs


def shade(city: City, t: np.ndarray, surface: np.ndarray, origin: np.ndarray, dirs: np.ndarray,
          focal: float) -> np.ndarray:
    """Colour [R, 3] in [0, 1] along rays dirs [R, 3] from origin with hits (t, surface) [R]: albedo over the
    pixel's footprint (t / focal metres, stretched on slanted surfaces), Lambertian sun and ambient light,
    the sky gradient where nothing is hit."""
    colour = np.empty_like(dirs)
    sky = surface == SKY
    up = np.sqrt(np.clip(dirs[sky, 2], 0.0, 1.0))[:, None]
    colour[sky] = (1 - up) * SKY_HORIZON + up * SKY_ZENITH
    ground = np.nonzero(surface == GROUND)[0]
    p = origin + t[ground, None] * dirs[ground]
    w = t[ground] / focal / np.maximum(-dirs[ground, 2], 0.15)
    colour[ground] = ground_albedo(city, p[:, 0], p[:, 1], w) * (AMBIENT + DIFFUSE * SUN[2])
    box = np.nonzero(surface >= 0)[0]
    b, d = surface[box], dirs[box]
    p = origin + t[box, None] * d
    # The face hit is the one the point lies on: the axis where it is nearest a slab boundary.
    to_lo, to_hi = np.abs(p - city.lo[b]), np.abs(p - city.hi[b])
    axis = np.minimum(to_lo, to_hi).argmin(1)
    rows = np.arange(len(b))
    sign = np.where(to_lo[rows, axis] < to_hi[rows, axis], -1.0, 1.0)
    w = t[box] / focal / np.maximum(np.abs(d[rows, axis]), 0.15)
    light = AMBIENT + DIFFUSE * np.clip(sign * SUN[axis], 0.0, None)
    roof = axis == 2
    colour[box[roof]] = roof_albedo(city, b[roof], p[roof, 0], p[roof, 1], w[roof]) * light[roof, None]
    wall, x_face = ~roof, axis == 0
    u = np.where(x_face, p[:, 1] - city.lo[b, 1], p[:, 0] - city.lo[b, 0])[wall]
    face = (axis * 2 + (sign > 0))[wall]
    colour[box[wall]] = wall_albedo(city, b[wall], u, p[wall, 2], face, w[wall]) * light[wall, None]
    return np.clip(colour, 0.0, 1.0)


def render_view(city: City, c2w: np.ndarray, camera: Pinhole) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The view [H, W, 3] uint8 from camera-to-world c2w, with its hit distances t [H, W] and rays [H, W, 3]."""
    t, surface, dirs = cast_view(city, c2w, camera)
    flat = shade(city, t.reshape(-1), surface.reshape(-1), c2w[:3, 3], dirs.reshape(-1, 3), camera.fx)
    return to_uint8(flat).reshape(camera.height, camera.width, 3), t, dirs


_JOB: Dict = {}
"""What a worker renders and writes views with: city, poses, camera, folder, suffix, points_per_view, seed."""


def _start_worker(job: Dict, own_process: bool = False) -> None:
    _JOB.update(job)
    if own_process:
        # glibc hands every freed array over 128 KB back to the kernel, so each view's temporaries come back
        # as fresh pages, zeroed one fault at a time: a third of the time. Keep them in the heap instead.
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 16 << 20)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
        except (OSError, AttributeError):
            pass


def _render_and_write(index: int) -> Tuple[np.ndarray, np.ndarray]:
    """Render view `index`, write it, and return seed points sampled from its pixels: xyz [K, 3] (the
    pixel-centre ray's hit) and rgb [K, 3] (the pixel as rendered, before compression)."""
    c2w, count = _JOB["poses"][index], _JOB["points_per_view"]
    image, t, dirs = render_view(_JOB["city"], c2w, _JOB["camera"])
    path = _JOB["folder"] / f"frame_{index:05d}{_JOB['suffix']}"
    # JPEG 4:4:4: the default 2x2 chroma subsampling smears the colours of small views.
    Image.fromarray(image).save(path, **({"quality": 90, "subsampling": 0} if path.suffix == ".jpg" else {}))
    rng = np.random.default_rng([_JOB["seed"], 2, index])
    candidates = rng.permutation(t.size)[: 4 * count]
    flat_t = t.reshape(-1)[candidates]
    chosen = candidates[np.isfinite(flat_t) & (flat_t < MAX_POINT_DISTANCE)][:count]
    xyz = c2w[:3, 3] + t.reshape(-1)[chosen, None] * dirs.reshape(-1, 3)[chosen]
    return xyz, image.reshape(-1, 3)[chosen]


def generate_city_scene(
    output_dir: Path, cameras: int = 200, width: int = 256, height: int = 192, blocks: int = 4,
    num_points: int = 50000, seed: int = 0, image_format: str = "jpeg", workers: Optional[int] = None,
    overwrite: bool = False,
) -> Path:
    """Write the city as a nerfstudio dataset (transforms.json, images/, sparse_pc.ply) into output_dir.

    The seed picks the buildings, the cameras and the seed points; files are identical for a seed whatever
    the number of workers. Written in a staging folder renamed into place (see `street.staged_dataset`).
    Load it with nerfstudio's `nerfstudio-data` parser (load_3D_points=True).
    """
    for name, value, minimum in (("cameras", cameras, 2), ("width", width, 8), ("height", height, 8),
                                 ("blocks", blocks, 1), ("num_points", num_points, 1), ("seed", seed, 0)):
        _check_int(name, value, minimum)
    if image_format not in ("jpeg", "png"):
        raise ValueError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(2, cores) if workers is None else workers
    _check_int("workers", workers, 1)
    output_dir = check_output_dir(output_dir, overwrite)
    city, camera = make_city(blocks, seed), Pinhole.for_size(width, height)
    poses, kinds = camera_poses(city, cameras, seed)
    suffix = ".jpg" if image_format == "jpeg" else ".png"
    with staged_dataset(output_dir) as staging:
        (staging / "images").mkdir()
        job = dict(city=city, poses=poses, camera=camera, folder=staging / "images", suffix=suffix, seed=seed,
                   points_per_view=-(-2 * num_points // cameras))
        if workers == 1:
            _start_worker(job)
            samples = [_render_and_write(i) for i in range(cameras)]
        else:
            # spawn, not fork: the caller may hold threads (torch) that a fork would copy mid-lock.
            with multiprocessing.get_context("spawn").Pool(workers, _start_worker, (job, True)) as pool:
                samples = pool.map(_render_and_write, range(cameras), chunksize=max(1, min(32, cameras // (4 * workers))))
        xyz = np.concatenate([s[0] for s in samples])
        rgb = np.concatenate([s[1] for s in samples])
        rng = np.random.default_rng([seed, 3])
        keep = np.sort(rng.permutation(len(xyz))[:num_points])
        xyz = xyz[keep] + rng.normal(0.0, POINT_NOISE, (len(keep), 3))
        write_ply(staging / "sparse_pc.ply", xyz.astype(np.float32), rgb[keep])
        frames = [{"file_path": f"images/frame_{i:05d}{suffix}", "transform_matrix": c2w.tolist(), "camera_kind": kind}
                  for i, (c2w, kind) in enumerate(zip(poses, kinds))]
        meta = nerfstudio_meta(camera, width, height, frames,
                               {"scene": "ms_splatfacto.scenes.city", "seed": seed, "blocks": blocks,
                                "num_points": int(len(keep)), "up": [0.0, 0.0, 1.0]})
        (staging / "transforms.json").write_text(json.dumps(meta, indent=1))
    return output_dir


def main(
    output: Path, cameras: int = 200, width: int = 256, height: int = 192, seed: int = 0, blocks: int = 4,
    points: int = 50000, image_format: str = "jpeg", workers: Optional[int] = None, overwrite: bool = False,
) -> None:
    """Generate the procedural city (transforms.json, images/, sparse_pc.ply) into --output.

    Args:
        output: Folder to write (must be empty or absent unless --overwrite).
        cameras: Number of views: 70% street level, 15% nadir, 15% oblique aerial.
        width: Image width in pixels.
        height: Image height in pixels.
        seed: Picks the buildings, cameras and seed points; the same seed writes the same files.
        blocks: City blocks per side of the square grid.
        points: Seed points in sparse_pc.ply (twice as many are sampled from the views' pixels, this many kept).
        image_format: jpeg (quality 90, small and fast) or png (lossless).
        workers: Processes rendering views (default: up to 2).
        overwrite: Replace a non-empty --output.
    """
    start = time.perf_counter()
    generate_city_scene(output, cameras, width, height, blocks, points, seed, image_format, workers, overwrite)
    size = sum(p.stat().st_size for p in Path(output).rglob("*") if p.is_file())
    print(f"Wrote {output}: {cameras} views of {width}x{height} in images/, seed points in sparse_pc.ply, "
          f"transforms.json ({size / 1e6:.1f} MB, seed {seed}, {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    import tyro

    tyro.cli(main)
