"""Pixel rows of a training image, decoded from its file without decoding the rest: with tiles split over
members, member r needs only the ground truth of the rows it renders (plus the SSIM halo below).

`file_rows` reads rows [lo, hi) of a JPEG or PNG held in memory through a small C++ extension
(`csrc/image/rows.cpp`, built on first use like the CPU kernels, cached, linked to the system's
libjpeg-turbo and libpng). JPEG: the rows before lo are skipped with `jpeg_skip_scanlines` (their
entropy-coded data is decoded, as finding row lo requires, but not reconstructed: no IDCT, upsampling or
colour conversion); decoding stops at hi. PNG: the rows before lo must still be inflated and unfiltered (each
row is filtered against the one above) but decoding stops at hi. The pixels equal PIL's, which nerfstudio
decodes with, bit for bit (libjpeg's ISLOW IDCT and fancy upsampling, both libraries' defaults).

`ImageRows` gives rows of one training image as nerfstudio's image cache holds it: uint8 or float32, alpha
composited, undistorted. Undistortion (`cv2.undistort`, which nerfstudio calls) maps each output row to a
span of source rows: OpenCV undistorts in stripes of rows, each with its own map; the stripes that overlap
the wanted rows are rebuilt with the same maps and remapped from just the source span they read, so the
rows equal the whole-image path's. Where rows cannot be had without the whole image (a `camera_res_scale_factor`
resize, fisheye cameras, `mask_color`, PNGs that are not 8-bit, interlaced or with tRNS, CMYK JPEGs) the
whole image is decoded through nerfstudio and sliced; `COUNTS` shows it.
"""

from __future__ import annotations

import functools
import io
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

import numpy as np
import torch

from ms_splatfacto.backend.build import BUILD_ROOT, CSRC, KernelBuildError, build_extension


@dataclass
class RowCounts:
    """What row reads decoded, for tests and benchmarks: one record per read (thread-safe)."""

    records: List[Tuple[str, int, int, int]] = field(default_factory=list)
    """(tag, lo, hi, rows reconstructed): `tag` names the reader (e.g. "member 2"), [lo, hi) the source
    rows asked of the file, the last the rows the decoder reconstructed (JPEG: hi - lo; PNG: hi; a whole
    decode: the image's height)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, tag: str, lo: int, hi: int, reconstructed: int) -> None:
        _TAG.reconstructed = getattr(_TAG, "reconstructed", 0) + reconstructed
        with self._lock:
            self.records.append((tag, lo, hi, reconstructed))

    def reset(self) -> None:
        with self._lock:
            self.records.clear()

    def by_tag(self) -> Dict[str, int]:
        """Rows reconstructed per tag."""
        out: Dict[str, int] = {}
        for tag, _, _, n in list(self.records):
            out[tag] = out.get(tag, 0) + n
        return out


COUNTS = RowCounts()
_TAG = threading.local()


def current_tag() -> str:
    return getattr(_TAG, "value", "")


class reading_as:
    """`with reading_as("member 2"):` tags the row reads inside (per thread) in `COUNTS`."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __enter__(self):
        self.previous, _TAG.value = current_tag(), self.tag

    def __exit__(self, *_):
        _TAG.value = self.previous


@functools.lru_cache(maxsize=None)
def image_ops():
    """`torch.ops.ms_splatfacto_image`, building the extension on first use (not needed by the backend)."""
    sources = sorted((CSRC / "image").glob("*.cpp"))
    print("ms-splatfacto: loading the image row decoder (the first build takes about 20 s)...", file=sys.stderr, flush=True)
    build_extension(
        "ms_splatfacto_image", sources, BUILD_ROOT / "image", "the image row decoder",
        "It needs libjpeg-turbo and libpng headers (apt-get install libjpeg62-turbo-dev libpng-dev); meanwhile use "
        "--pipeline.datamanager.member-rows False.",
        extra_cflags=["-O2"], extra_ldflags=["-ljpeg", "-lpng"],
    )
    return torch.ops.ms_splatfacto_image


def file_kind(data: torch.Tensor) -> Optional[str]:  # data: [n] uint8, the file's bytes
    """'jpeg' or 'png' from the file's signature, else None."""
    head = bytes(data[:8].tolist())
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head == b"\x89PNG\r\n\x1a\n":
        return "png"
    return None


def file_rows(data: torch.Tensor, lo: int, hi: int) -> Optional[np.ndarray]:  # data: [n] uint8
    """Rows [lo, hi) of the JPEG or PNG whose bytes are `data`, as `np.array(PIL.Image.open(file))` holds
    them ([hi - lo, W, C] uint8, greyscale as [.., 1]); None where the format is not one we decode by rows.
    Counted in `COUNTS` under the current `reading_as` tag. A truncated or corrupt file raises OSError."""
    assert data.dtype == torch.uint8 and data.dim() == 1, f"data must be [n] uint8 bytes, got {data.dtype} {tuple(data.shape)}"
    kind = file_kind(data)
    if kind is None:
        return None
    op = image_ops().jpeg_rows if kind == "jpeg" else image_ops().png_rows
    try:
        rows, info = op(data.contiguous(), int(lo), int(hi))
    except RuntimeError as err:
        raise OSError(str(err).splitlines()[0]) from None
    _, _, channels, reconstructed, supported = info.tolist()
    if not supported or channels == 2:  # PIL's "LA" becomes an array nerfstudio refuses: leave it to PIL
        return None
    COUNTS.add(current_tag(), int(lo), int(hi), int(reconstructed))
    return rows.numpy()


def check_complete(data: torch.Tensor, path: Path) -> Tuple[int, int]:  # data: [n] uint8
    """The (width, height) of a file that can be a whole image, which is read by rows later (maybe never to
    its end): PIL must recognise it (else OSError), and a JPEG or PNG must end with its end-of-image
    marker or IEND chunk (else OSError: truncated)."""
    from PIL import Image

    with Image.open(io.BytesIO(data.numpy())) as image:
        size = image.size
    kind, tail = file_kind(data), bytes(data[-4096:].tolist())
    if (kind == "jpeg" and b"\xff\xd9" not in tail) or (kind == "png" and b"IEND" not in tail):
        raise OSError(f"image file is truncated ({path.name} has no end-of-image marker)")
    return size


def rows_as_cached(rows: np.ndarray, image_type: str, alpha_color: Optional[torch.Tensor]) -> torch.Tensor:
    """nerfstudio's `get_image_uint8` / `get_image_float32` on rows ([h, W, 1, 3 or 4] uint8 from PIL):
    greyscale repeated to RGB, float32 = uint8 / 255, the alpha colour composited where one is set."""
    if rows.shape[2] == 1:
        rows = rows.repeat(3, axis=2)
    if image_type == "float32":
        image = torch.from_numpy(rows.astype("float32") / 255.0)
        if alpha_color is not None and image.shape[-1] == 4:
            image = image[:, :, :3] * image[:, :, -1:] + alpha_color * (1.0 - image[:, :, -1:])
        return image
    image = torch.from_numpy(rows)
    if alpha_color is not None and image.shape[-1] == 4:
        image = image[:, :, :3] * (image[:, :, -1:] / 255.0) + 255.0 * alpha_color * (1.0 - image[:, :, -1:] / 255.0)
        image = torch.clamp(image, min=0, max=255).to(torch.uint8)
    return image


@dataclass
class Undistortion:
    """What `cv2.undistort` does to a PERSPECTIVE camera's image in nerfstudio's `_undistort_image`, kept so
    that output rows can be made from a span of source rows (see the module docstring)."""

    K: np.ndarray  # [3, 3] the source camera, principal point shifted by -0.5 as nerfstudio does
    dist: np.ndarray  # [8] OpenCV's order
    new_K: np.ndarray  # [3, 3] float64, before the crop
    roi: Tuple[int, int, int, int]  # x, y, w, h of the crop
    size: Tuple[int, int]  # source (width, height)

    @staticmethod
    def of(camera) -> "Undistortion":
        """Mirrors `_undistort_image`'s PERSPECTIVE branch up to the remap (the camera has distortion)."""
        import cv2

        d = camera.distortion_params.numpy()
        assert d[3] == 0, "nerfstudio undistorts only k1, k2, k3, p1, p2"
        dist = np.array([d[0], d[1], d[4], d[5], d[2], d[3], 0, 0])
        K = camera.get_intrinsics_matrices().numpy()
        K[0, 2] = K[0, 2] - 0.5
        K[1, 2] = K[1, 2] - 0.5
        size = (int(camera.width.item()), int(camera.height.item()))
        new_K, roi = cv2.getOptimalNewCameraMatrix(K, dist, size, 0)
        return Undistortion(K, dist, new_K, tuple(int(v) for v in roi), size)

    def stripes(self, lo: int, hi: int) -> List[Tuple[int, np.ndarray, np.ndarray]]:
        """(first row, map1 [s, W, 2] int16, map2 [s, W] uint16) of OpenCV's stripes holding undistorted
        rows [lo, hi), as `cv2.undistort` builds them (4096 // width rows each, principal point shifted)."""
        import cv2

        width, height = self.size
        step = min(max(1, (1 << 12) // max(width, 1)), height)
        out, v0 = [], float(self.new_K[1, 2])
        for y in range(lo // step * step, hi, step):
            rows = min(step, height - y)
            Ar = self.new_K.astype(np.float64).copy()
            Ar[1, 2] = v0 - y
            map1, map2 = cv2.initUndistortRectifyMap(self.K, self.dist, np.eye(3), Ar, (width, rows), cv2.CV_16SC2)
            out.append((y, map1, map2))
        return out


def undistorted_rows(undistortion: Undistortion, lo: int, hi: int, source_rows) -> torch.Tensor:  # [hi - lo, w, C]
    """Rows [lo, hi) of nerfstudio's undistorted (and cropped) image, reading only the source rows the
    maps of those rows touch (bilinear: a map row's integer rows and the row below) via
    `source_rows(a, b)` ([b - a, W, C] as cached)."""
    import cv2

    x, y, w, h = undistortion.roi
    width, height = undistortion.size
    assert 0 <= lo <= hi <= h, f"rows [{lo}, {hi}) outside the undistorted image's {h} rows"
    if hi == lo:
        return source_rows(0, 0)[:, x : x + w]
    a, b = lo + y, hi + y  # rows of the uncropped undistorted image
    stripes = undistortion.stripes(a, b)
    needed = [m[max(a - s, 0) : b - s, x : x + w, 1] for s, m, _ in stripes]
    first = min(int(n.min()) for n in needed)
    last = max(int(n.max()) for n in needed)
    s0, s1 = min(max(first, 0), height), min(max(last + 2, 0), height)
    if s1 <= s0:  # every pixel maps outside the source: the border colour only
        s0, s1 = 0, min(1, height)
    crop = np.ascontiguousarray(source_rows(s0, s1).numpy())
    parts = []
    for s, map1, map2 in stripes:
        local = map1.copy()
        local[..., 1] -= s0  # int16: the same positions in the source span
        part = cv2.remap(crop, local, map2, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        parts.append(part.reshape(map1.shape[0], width, -1))
    band = np.concatenate(parts)[a - stripes[0][0] : b - stripes[0][0], x : x + w]
    return torch.from_numpy(np.ascontiguousarray(band))


class _NotByRows(Exception):
    """This image's rows need the whole image (see the module docstring)."""


class ImageRows:
    """Rows of training image `idx` of `dataset` as nerfstudio's image cache holds it, read from the file's
    bytes (read once by the datamanager's workers). `read(lo, hi, device)` is called by each member for
    its own rows; `rows` and `width` are the image's size as trained on."""

    def __init__(self, dataset, raw, idx: int, image_type: str, data: torch.Tensor, size: Tuple[int, int]) -> None:
        self.dataset, self.raw, self.idx, self.image_type = dataset, raw, idx, image_type
        raw_camera = raw[idx].reshape(())
        self.data = data  # [n] uint8, the file's bytes
        self.rows, self.width = size
        self.path = Path(dataset.image_filenames[idx])
        self.alpha_color = dataset._dataparser_outputs.alpha_color
        self.reads: Deque[Tuple[int, int, int, int]] = deque(maxlen=256)
        """(member, lo, hi, source rows reconstructed) of the members' latest reads of this image."""
        self._undistortion: Optional[Undistortion] = None
        from ms_splatfacto.image_stream import has_distortion
        from nerfstudio.cameras.cameras import CameraType

        self.distorted = has_distortion(raw_camera)
        self.raw_camera = raw_camera
        self.by_rows = (
            dataset.scale_factor == 1.0 and dataset.mask_color is None and file_kind(data) is not None
            and (not self.distorted or raw_camera.camera_type.item() == CameraType.PERSPECTIVE.value)
        )

    @property
    def held_bytes(self) -> int:
        return self.data.numel()

    def read(self, lo: int, hi: int, device: Optional[torch.device] = None, member: Optional[int] = None) -> torch.Tensor:
        """Rows [lo, hi) ([hi - lo, W, C]) on `device` (the CPU by default), equal to the cached image's
        rows bit for bit; counted in `COUNTS` as read by `member` where given."""
        if not 0 <= lo <= hi <= self.rows:
            raise ValueError(f"rows [{lo}, {hi}) outside the {self.rows} rows of {self.path}")
        if member is not None:
            with reading_as(f"member {member}"):
                before = getattr(_TAG, "reconstructed", 0)
                rows = self.read(lo, hi, device)
                self.reads.append((member, lo, hi, getattr(_TAG, "reconstructed", 0) - before))
                return rows
        try:
            try:
                if not self.by_rows:
                    raise _NotByRows
                rows = self._rows(lo, hi)
            except _NotByRows:
                self.by_rows = False
                rows = self._whole()[lo:hi]
        except OSError as err:
            raise OSError(f"Cannot read image {self.path}: {err}") from None
        assert rows.shape[:2] == (hi - lo, self.width), f"rows of {self.path}: {tuple(rows.shape)}, expected {(hi - lo, self.width)}"
        return rows if device is None else rows.to(device)

    def _source(self, lo: int, hi: int) -> torch.Tensor:
        rows = file_rows(self.data, lo, hi)
        if rows is None:  # a format left to PIL (the header told; nothing decoded)
            raise _NotByRows
        return rows_as_cached(rows, self.image_type, self.alpha_color)

    def _rows(self, lo: int, hi: int) -> torch.Tensor:
        if not self.distorted:
            return self._source(lo, hi)
        if self._undistortion is None:
            self._undistortion = Undistortion.of(self.raw_camera)
        return undistorted_rows(self._undistortion, lo, hi, self._source)

    def _whole(self) -> torch.Tensor:
        from ms_splatfacto.image_stream import decode

        image = decode(self.dataset, self.raw, self.idx, self.image_type)["image"]
        COUNTS.add(current_tag(), 0, self.rows, int(image.shape[0]))
        return image


class TensorRows:
    """Rows of an image already decoded (the cache path): slices, nothing decoded."""

    def __init__(self, image: torch.Tensor) -> None:  # image: [H, W, C]
        assert image.dim() == 3, f"image must be [H, W, C], got {tuple(image.shape)}"
        self.image = image
        self.rows, self.width = image.shape[0], image.shape[1]

    def read(self, lo: int, hi: int, device: Optional[torch.device] = None, member: Optional[int] = None) -> torch.Tensor:
        """Rows [lo, hi) ([hi - lo, W, C]) on `device`."""
        if not 0 <= lo <= hi <= self.rows:
            raise ValueError(f"rows [{lo}, {hi}) outside the image's {self.rows} rows")
        rows = self.image[lo:hi]
        return rows if device is None else rows.to(device)


def prebuild() -> None:
    """Build the extension now (setup scripts); raises KernelBuildError with the compiler's message."""
    image_ops()


__all__ = ["COUNTS", "ImageRows", "KernelBuildError", "RowCounts", "TensorRows", "check_complete", "file_rows", "reading_as"]
