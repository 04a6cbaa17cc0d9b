"""Training images read from disk while training runs, for datasets too large to decode before step 0.

nerfstudio's full-image datamanager decodes (and undistorts) every image up front: 2,000 photos at
1600x1200 hold ~11 GB and start-up lasts as long as decoding them all. Here a few worker threads decode
the images of the next steps' cameras (the camera order is drawn ahead, so they are known) into a cache
bounded in bytes. PIL and OpenCV release the GIL while decoding, so threads overlap with training.
Each image goes through nerfstudio's own per-image path (`get_data`, `_undistort_image`), so a streamed
image equals the cached one bit for bit. With one camera per step the workers read only the files' bytes
(`load_rows`), and each member decodes the rows it renders during the step (`image_rows.py`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from copy import deepcopy
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set

import cv2
import numpy as np
import torch
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.data.datamanagers.full_images_datamanager import _undistort_image
from nerfstudio.data.datasets.base_dataset import InputDataset
from nerfstudio.data.utils.data_utils import get_image_mask_tensor_from_path
from PIL import Image
from rich.progress import track

BAD_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, AssertionError, cv2.error, Image.DecompressionBombError)
"""What reading an unreadable, truncated or mis-sized image raises (PIL, nerfstudio's size check, OpenCV)."""


def has_distortion(camera: Cameras) -> bool:
    """nerfstudio's test for undistorting an image (`undistort_idx` in its image cache)."""
    return camera.distortion_params is not None and not bool(torch.all(camera.distortion_params == 0))


def decoded_bytes(dataset: InputDataset, image_type: str) -> List[int]:
    """Bytes each image of `dataset` holds once decoded, from the cameras' sizes without decoding:
    height x width x channels x (1 for uint8, 4 for float32), plus one byte per pixel for a mask where the
    dataset has masks. Channels are 4 where the first image has an alpha channel that no alpha colour
    replaces (nerfstudio keeps it then), else 3 (grey and palette images are expanded to RGB)."""
    channels = 3
    outputs = dataset._dataparser_outputs
    if len(dataset) and outputs.alpha_color is None:
        try:
            with Image.open(dataset.image_filenames[0]) as image:
                channels = 4 if image.mode in ("RGBA", "RGBa") else 3
        except BAD_IMAGE_ERRORS:
            pass  # counted when training meets it
    per_pixel = channels * (4 if image_type == "float32" else 1) + (1 if outputs.mask_filenames is not None else 0)
    heights = dataset.cameras.height.reshape(-1).tolist()
    widths = dataset.cameras.width.reshape(-1).tolist()
    return [int(h) * int(w) * per_pixel for h, w in zip(heights, widths)]


def undistort_intrinsics(dataset: InputDataset, split: str) -> Cameras:
    """Give `dataset.cameras` the undistorted intrinsics and sizes that nerfstudio's image cache writes
    into them as it decodes each image, without decoding: they depend only on the camera model, its
    parameters and the image size (not on the pixels), so each distinct camera is undistorted once, by
    nerfstudio's `_undistort_image`, on a blank image of its size. Returns the original cameras, which
    decoding needs."""
    raw = deepcopy(dataset.cameras)
    cameras = dataset.cameras
    if cameras.distortion_params is None or len(dataset) == 0:
        return raw
    fields = [cameras.camera_type, cameras.fx, cameras.fy, cameras.cx, cameras.cy, cameras.width, cameras.height]
    rows = torch.cat([f.reshape(len(dataset), -1).double() for f in fields] + [cameras.distortion_params.double()], 1)
    groups: Dict[tuple, List[int]] = {}
    for idx, row in enumerate(rows.tolist()):
        # A FISHEYE624 camera's crop radius lives in its metadata: such cameras are never shared.
        key = (idx,) if int(row[0]) == CameraType.FISHEYE624.value else tuple(row)
        groups.setdefault(key, []).append(idx)
    for indices in track(groups.values(), description=f"Scanning {split} cameras (undistorted intrinsics)", transient=True):
        camera = raw[indices[0]].reshape(())
        if not has_distortion(camera):
            continue
        blank = np.zeros((int(camera.height.item()), int(camera.width.item())), dtype=np.uint8)
        K = camera.get_intrinsics_matrices().numpy()
        K, image, _ = _undistort_image(camera, camera.distortion_params.numpy(), {}, blank, K)
        at = torch.tensor(indices)
        cameras.fx[at] = float(K[0, 0])
        cameras.fy[at] = float(K[1, 1])
        cameras.cx[at] = float(K[0, 2])
        cameras.cy[at] = float(K[1, 2])
        cameras.width[at] = image.shape[1]
        cameras.height[at] = image.shape[0]
    return raw


def decode(dataset: InputDataset, raw: Cameras, idx: int, image_type: str) -> Dict:
    """Image `idx` as nerfstudio's image cache holds it (its `undistort_idx`), from the original camera
    `raw[idx]` (the dataset's cameras already hold the undistorted intrinsics)."""
    data = dataset.get_data(idx, image_type=image_type)
    camera = raw[idx].reshape(())
    assert data["image"].shape[1] == camera.width.item() and data["image"].shape[0] == camera.height.item(), (
        f'The size of image ({data["image"].shape[1]}, {data["image"].shape[0]}) loaded '
        f"does not match the camera parameters ({camera.width.item(), camera.height.item()})"
    )
    if not has_distortion(camera):
        return data
    K = camera.get_intrinsics_matrices().numpy()
    K, image, mask = _undistort_image(camera, camera.distortion_params.numpy(), data, data["image"].numpy(), K)
    data["image"] = torch.from_numpy(image)
    if mask is not None:
        data["mask"] = mask
    return data


def rows_supported(dataset: InputDataset) -> bool:
    """Whether `load_rows` can stand for `decode` on this dataset: nerfstudio's own per-image data (image,
    mask), nothing a subclass adds (depth, semantics)."""
    return type(dataset).get_data is InputDataset.get_data and type(dataset).get_metadata is InputDataset.get_metadata


def load_rows(dataset: InputDataset, raw: Cameras, idx: int, image_type: str) -> Dict:
    """Training image `idx` for members that decode their own rows (`image_rows.ImageRows`): the file's
    bytes, checked whole (recognised, the size its camera says, ending with its end marker), and the mask
    as `decode` gives it; no pixel is decoded here."""
    from ms_splatfacto.image_rows import ImageRows, check_complete

    path = Path(dataset.image_filenames[idx])
    content = path.read_bytes()
    if not content:
        raise OSError("empty file")
    data = torch.frombuffer(bytearray(content), dtype=torch.uint8)
    size = check_complete(data, path)
    camera = raw[idx].reshape(())
    if dataset.scale_factor == 1.0:
        assert size == (camera.width.item(), camera.height.item()), (
            f"The size of image {size} loaded does not match the camera parameters ({camera.width.item(), camera.height.item()})"
        )
    trained = (int(dataset.cameras.height[idx].item()), int(dataset.cameras.width[idx].item()))
    out = {"image_idx": idx, "image_rows": ImageRows(dataset, raw, idx, image_type, data, trained)}
    outputs = dataset._dataparser_outputs
    if outputs.mask_filenames is not None:
        mask = get_image_mask_tensor_from_path(filepath=outputs.mask_filenames[idx], scale_factor=dataset.scale_factor)
        if has_distortion(camera):  # undistorted as `decode` does it, beside a blank image of the camera's size
            blank = np.zeros((int(camera.height.item()), int(camera.width.item())), dtype=np.uint8)
            K = camera.get_intrinsics_matrices().numpy()
            _, _, mask = _undistort_image(camera, camera.distortion_params.numpy(), {"mask": mask}, blank, K)
        out["mask"] = mask
    return out


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def data_bytes(data: Dict) -> int:
    """Bytes a decoded image's tensors hold: their whole storage (an undistorted image is a cropped view),
    and the file bytes of a row source."""
    storages, extra = {}, 0
    for value in data.values():
        if torch.is_tensor(value):
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif hasattr(value, "held_bytes"):
            extra += value.held_bytes
    return sum(storages.values()) + extra


class LazyImages(Sequence):
    """`cached_train` / `cached_eval` in stream mode: each item decoded when asked for, nothing kept."""

    def __init__(self, get: Callable[[int], Dict], count: int) -> None:
        self._get, self._count = get, count

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return [self[i] for i in range(*idx.indices(self._count))]
        if not -self._count <= idx < self._count:
            raise IndexError(idx)
        return self._get(idx % self._count)


class ReadableImages(Sequence):
    """A `LazyImages` whose items are None where unreadable: iterating it yields the readable ones only
    (nerfstudio's evaluation loops iterate); its length stays the count of images."""

    def __init__(self, items: LazyImages) -> None:
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, idx):
        return self._items[idx]

    def __iter__(self):
        return (item for item in (self._items[i] for i in range(len(self._items))) if item is not None)


class ImageStream:
    """Decodes images on `workers` threads into a least-recently-used cache of decoded images.

    `plan(window)` names the images of the next steps in order; they are pinned (never evicted) and
    decoded ahead, as far as they fit the byte budget. Unpinned images (already consumed) are evicted
    least recently used first whenever an insertion takes the held bytes over the budget, so the held
    bytes never exceed `budget` (unless one step's images alone do) and memory at most by the images
    being decoded. An image that fails to decode is remembered in `bad` and `get` answers None for it.
    """

    def __init__(self, decode: Callable[[int], Dict], estimate: Callable[[int], int], budget: int, workers: int) -> None:
        self._decode, self._estimate, self.budget = decode, estimate, budget
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="ms-image-stream")
        self._lock = threading.Lock()
        self._cache: "OrderedDict[int, Dict]" = OrderedDict()
        self._sizes: Dict[int, int] = {}
        """Bytes of each image decoded so far (its estimate until then)."""
        self._pinned: Set[int] = set()
        self._inflight: Dict[int, Future] = {}
        self.bad: Dict[int, str] = {}
        """Images that failed to decode, with the error."""
        self.held_bytes = 0
        self.peak_held_bytes = 0
        """Most bytes of decoded images the cache held at once."""
        self.decoding = 0
        self.peak_decoding = 0
        """Most images being decoded at once (at most `workers`): the bound on memory beyond the budget."""
        self.decodes = 0
        """Images decoded (successfully or not) so far."""
        self.waits = 0
        """`get` calls that found their image not yet decoded."""

    def plan(self, window: Sequence[int], keep: int = 1) -> None:
        """Pin the images of `window` (the next steps' cameras, in order; its first `keep` always) as far
        as they fit the budget, unpin the rest, and queue the decodes of those not cached."""
        with self._lock:
            pinned, total = [], 0
            for n, idx in enumerate(dict.fromkeys(window)):
                if idx in self.bad:
                    continue
                size = self._sizes.get(idx) or self._estimate(idx)
                if n >= keep and total + size > self.budget:
                    break
                pinned.append(idx)
                total += size
            self._pinned = set(pinned)
            self._evict()
            for idx in pinned:
                self._submit(idx)

    def ready(self, idx: int) -> bool:
        with self._lock:
            return idx in self._cache or idx in self.bad

    def get(self, idx: int) -> Optional[Dict]:
        """Image `idx` decoded (waiting for it if need be), or None where it cannot be read."""
        with self._lock:
            if idx in self.bad:
                return None
            data = self._cache.get(idx)
            if data is not None:
                self._cache.move_to_end(idx)
                return data
            self.waits += 1
            future = self._submit(idx)
        return future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _submit(self, idx: int) -> Future:
        """(Under the lock.) The decode of `idx`, queued unless cached or already under way."""
        future = self._inflight.get(idx)
        if future is None and idx not in self._cache:
            future = self._inflight[idx] = self._pool.submit(self._work, idx)
        return future

    def _work(self, idx: int) -> Optional[Dict]:
        with self._lock:
            self.decoding += 1
            self.peak_decoding = max(self.peak_decoding, self.decoding)
        data, error = None, None
        try:
            data = self._decode(idx)
        except BAD_IMAGE_ERRORS as err:
            error = f"{type(err).__name__}: {err}".splitlines()[0]
        finally:
            with self._lock:
                self.decoding -= 1
                self.decodes += 1
                self._inflight.pop(idx, None)
                if error is not None:
                    self.bad[idx] = error
                elif data is not None:
                    self._sizes[idx] = data_bytes(data)
                    self._cache[idx] = data
                    self._evict(incoming=self._sizes[idx])
        return data

    def _evict(self, incoming: int = 0) -> None:
        """(Under the lock.) Count `incoming` bytes just cached, then drop unpinned images, least recently
        used first, until within budget. `held_bytes` is written once, after the evictions, so a reader
        without the lock never sees the count of an insertion before its evictions."""
        held = self.held_bytes + incoming
        for idx in list(self._cache):
            if held <= self.budget:
                break
            if idx not in self._pinned:
                del self._cache[idx]
                held -= self._sizes[idx]
        self.held_bytes = held
        self.peak_held_bytes = max(self.peak_held_bytes, held)
