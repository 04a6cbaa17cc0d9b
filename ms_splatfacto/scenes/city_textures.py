"""What the city's surfaces look like: facades, roofs and street paint, box-filtered over each pixel's footprint.

A pixel integrates the area it sees; filtering the textures over that footprint (exactly, for stripes)
lets one ray per pixel render without aliasing, so that distant windows and lane markings do not shimmer
differently in every view. Footprints w are in metres; colours are albedo in [0, 1].
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

import numpy as np

from ms_splatfacto.scenes.street import _hash01

if TYPE_CHECKING:
    from ms_splatfacto.scenes.city import City

STREET = 16.0
"""Width of a street between blocks, facade line to facade line, metres."""
ROAD_HALF_WIDTH = 5.0
"""Half the carriageway; the rest of the street is sidewalk."""
LIT = np.array([0.95, 0.85, 0.5])
"""Albedo of a lit window."""


def palette(rng: np.random.Generator, count: int, saturation: Tuple[float, float], value: Tuple[float, float],
            hue: Tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """[count, 3] RGB colours with hue, saturation and value drawn uniformly from the ranges."""
    h, s, v = rng.uniform(*hue, count), rng.uniform(*saturation, count), rng.uniform(*value, count)
    k = (np.array([5.0, 3.0, 1.0]) + h[:, None] * 6) % 6  # [count, 3] the usual HSV to RGB formula
    return v[:, None] - (v * s)[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def coverage(x: np.ndarray, width: np.ndarray, period, start, length) -> np.ndarray:
    """Fraction of each footprint [x - width/2, x + width/2] on the stripes [start, start + length) + k period:
    stripes box-filtered over the pixel, exactly, so that they neither alias nor shimmer between views."""

    def integral(y):
        y = y - start
        k = np.floor(y / period)
        return k * length + np.clip(y - k * period, 0.0, length)

    return (integral(x + width / 2) - integral(x - width / 2)) / width


def step(x: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Fraction of the footprint [x - width/2, x + width/2] where the coordinate is positive."""
    return np.clip(x / width + 0.5, 0.0, 1.0)


def cell_shade(width: np.ndarray, cell: float, *keys: np.ndarray) -> np.ndarray:
    """Per-cell random value in [0, 1) that fades to its mean 0.5 as the footprint reaches the cell size."""
    return 0.5 + (_hash01(*keys) - 0.5) * np.clip(1.5 - width / cell, 0.0, 1.0)


def mix(a, b, w: np.ndarray) -> np.ndarray:
    """a where w = 0, b where w = 1; w [P] weights colours [P, 3] or [3]."""
    return a + (b - a) * w[:, None]


def wall_albedo(city: City, b: np.ndarray, u: np.ndarray, v: np.ndarray, face: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Albedo [P, 3] of wall points on boxes b [P] at (u along the wall, v height) [P] on faces [P] (0 to 3),
    footprints w [P]: storeys of windows (some lit), a shop front on the ground floor, cornices and, on
    brick buildings, mortar courses."""
    floor_h, bay = city.floor_height[b], city.bay[b]
    wall = city.wall[b] * (0.9 + 0.2 * cell_shade(w, 6.0, np.floor(u / 6), np.floor(v / 6), b))[:, None]
    wall = mix(wall, 0.85, 0.7 * coverage(v, w, 0.5, 0.0, 0.06) * city.brick[b])
    column, storey = np.floor(u / bay), np.floor(v / floor_h)
    lit = _hash01(column, storey, b, face, 1) < 0.2
    glass = np.where(lit[:, None], LIT, city.glass[b] * (0.8 + 0.4 * _hash01(column, storey, b, 2))[:, None])
    glass = mix(glass, 0.2 * LIT + 0.8 * city.glass[b], np.clip(w / bay, 0.0, 1.0))  # lit or not averages out
    pane_u, above = city.pane[b, 0] * bay, step(v - floor_h, w)
    windows = np.where(pane_u >= bay, 1.0, coverage(u, w, bay, (bay - pane_u) / 2, pane_u))
    windows *= coverage(v, w, floor_h, 0.35 * floor_h, city.pane[b, 1] * floor_h) * above
    shop = coverage(u, w, bay * 2, 0.3, bay * 2 - 0.6) * coverage(v, w, 1e9, 0.4, floor_h - 1.2)
    colour = mix(wall, city.accent[b], 1.0 - above)
    colour = mix(colour, 0.5 * city.glass[b] + 0.2, shop)
    colour = mix(colour, 0.6 * city.wall[b], coverage(v, w, floor_h, floor_h - 0.25, 0.25) * above)
    return mix(colour, glass, windows)


def roof_albedo(city: City, b: np.ndarray, x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Albedo [P, 3] of roof points (x, y) [P] on boxes b [P]: a light parapet band along the edges, patches."""
    edge = np.minimum(np.minimum(x - city.lo[b, 0], city.hi[b, 0] - x), np.minimum(y - city.lo[b, 1], city.hi[b, 1] - y))
    roof = city.roof[b] * (0.85 + 0.3 * cell_shade(w, 4.0, np.floor(x / 4), np.floor(y / 4), b, 3))[:, None]
    return mix(roof, 0.75, 1.0 - step(edge - 0.5, w))


def ground_albedo(city: City, x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Albedo [P, 3] of ground points (x, y) [P] with footprints w [P]: asphalt carriageways with centre
    dashes, edge lines and zebra crossings, tiled sidewalks, courtyards of grass or paving, fields outside."""
    w = np.maximum(w, 1e-3)
    first, period = city.lines[0], city.period
    inside = step(city.extent - np.maximum(np.abs(x), np.abs(y)), w)  # [P] 1 within the street grid
    # Distance to the nearest street centre line of each family: lines x = c run along y, and vice versa.
    dx = np.abs((x - first + period / 2) % period - period / 2)
    dy = np.abs((y - first + period / 2) % period - period / 2)
    road_x, road_y = step(ROAD_HALF_WIDTH - dx, w), step(ROAD_HALF_WIDTH - dy, w)
    road = np.maximum(road_x, road_y)
    street = np.maximum(step(STREET / 2 - dx, w), step(STREET / 2 - dy, w))
    cell = np.floor(x / 1.5), np.floor(y / 1.5)
    asphalt = (0.24 + 0.08 * cell_shade(w, 1.5, *cell))[:, None] * np.ones(3)
    dash_x = coverage(dx, w, 1e9, -0.1, 0.2) * coverage(y, w, 4.0, 0.0, 2.0) * (1 - road_y)
    dash_y = coverage(dy, w, 1e9, -0.1, 0.2) * coverage(x, w, 4.0, 0.0, 2.0) * (1 - road_x)
    line = coverage(np.minimum(dx, dy), w, 1e9, ROAD_HALF_WIDTH - 0.45, 0.15) * (1 - road_x * road_y)
    zebra = (coverage(dy, w, 1e9, ROAD_HALF_WIDTH + 0.5, 3.0) * road_x * coverage(x, w, 1.0, 0.0, 0.5)
             + coverage(dx, w, 1e9, ROAD_HALF_WIDTH + 0.5, 3.0) * road_y * coverage(y, w, 1.0, 0.0, 0.5))
    asphalt = mix(asphalt, (0.9, 0.8, 0.3), np.clip(dash_x + dash_y, 0, 1))
    asphalt = mix(asphalt, 0.9, np.clip(line + zebra, 0, 1))
    tiles = 1 - (1 - coverage(x, w, 1.2, 0.0, 0.05)) * (1 - coverage(y, w, 1.2, 0.0, 0.05))
    paving = (0.55 + 0.12 * cell_shade(w, 1.2, np.floor(x / 1.2), np.floor(y / 1.2), 4))[:, None] * np.ones(3)
    paving = mix(paving, 0.42, tiles)
    block = np.floor((x - first) / period), np.floor((y - first) / period)
    grass_here = _hash01(*block, 5) < 0.6
    court = np.where(grass_here[:, None], (0.27, 0.45, 0.2), (0.62, 0.55, 0.45))
    court = court * (0.85 + 0.3 * cell_shade(w, 2.0, np.floor(x / 2), np.floor(y / 2), 6))[:, None]
    field = np.floor(x / 12), np.floor(y / 12)
    fields = mix(np.array([0.32, 0.5, 0.22]), np.array([0.6, 0.52, 0.3]), cell_shade(w, 12.0, *field, 7))
    colour = mix(mix(court, paving, street), asphalt, road)
    return mix(fields, colour, inside)
