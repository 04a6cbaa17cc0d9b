"""Full-image datamanager that hands the model several training cameras per step, and reads the images of
datasets too large for memory from disk while training runs.

Splitting tiles over members pays off most when a step renders several cameras: the camera-major tile
list is long enough for every member to get whole cameras' worth of tiles. A step's cameras share one
image size: it takes the next camera of the seeded order and the next ones of that camera's size.

`images stream` decodes the next steps' images on worker threads into a byte-bounded cache
(`image_stream.py`) instead of decoding every image before step 0; it gives the same images, cameras and
order as `cache` (nerfstudio's behaviour) bit for bit. With one camera per step (the model renders it
split over pixel rows) the workers read only the files' bytes, and the batch's `image_rows` lets each
member decode just the rows it renders (`image_rows.py`); `image` is then absent from the batch. In
cache mode `image_rows` slices the cached image.
"""

from __future__ import annotations

import os
import random
import weakref
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Callable, Dict, List, Literal, Optional, Tuple, Type

import numpy as np
import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanager, FullImageDatamanagerConfig
from nerfstudio.utils.rich_utils import CONSOLE
from rich.progress import track

from ms_splatfacto.backend.aggregate import world
from ms_splatfacto.errors import InputError
from ms_splatfacto.image_rows import KernelBuildError, TensorRows, image_ops
from ms_splatfacto.image_stream import (
    BAD_IMAGE_ERRORS, ImageStream, LazyImages, ReadableImages, decode, decoded_bytes, human_bytes, load_rows, rows_supported,
    undistort_intrinsics,
)

GiB = 2**30


@dataclass
class MsDatamanagerConfig(FullImageDatamanagerConfig):
    """nerfstudio's full-image datamanager with a batch of cameras per training step and images streamed
    from disk for large datasets."""

    _target: Type = field(default_factory=lambda: MsDatamanager)
    cameras_per_step: int = 1
    """Training cameras rendered per step. A step takes the next camera of the seeded order and the next
    ones of its image size (fewer when that size runs out before the epoch ends); each epoch still visits
    every camera once."""
    images: Literal["auto", "cache", "stream"] = "auto"
    """Where training images live: `cache` decodes them all into memory before step 0 (nerfstudio's way);
    `stream` decodes the next steps' images from disk while training runs, into a cache of `cache-bytes`;
    `auto` streams when the decoded training images would exceed `stream-above-bytes`. Both give the same
    images and training bit for bit."""
    stream_above_bytes: int = 2 * GiB
    """With `images auto`: stream when the training images decoded (height x width x 3 or 4 channels x 1
    byte for uint8 or 4 for float32, plus masks) would take more bytes than this."""
    cache_bytes: int = 1 * GiB
    """With `images stream`: most bytes of decoded images kept in memory (least recently used evicted);
    memory exceeds it at most by the images being decoded."""
    prefetch_workers: int = 2
    """With `images stream`: threads decoding images ahead of training."""
    prefetch_steps: int = 8
    """With `images stream`: decode the images of this many steps ahead (as far as `cache-bytes` allows)."""
    member_rows: bool = True
    """With `images stream` and one camera per step: the workers read the next images' files, and during the
    step each member of the model decodes only the pixel rows it renders (plus the SSIM halo rows), not the
    whole image. False decodes whole images ahead on the workers."""
    max_bad_image_fraction: float = 0.05
    """With `images stream`: an unreadable or truncated training image is skipped with one line; training
    stops when more than this fraction of the training images is unreadable."""


class MsDatamanager(FullImageDatamanager):
    config: MsDatamanagerConfig

    def __init__(self, config: MsDatamanagerConfig, *args, **kwargs) -> None:
        self._stream: Optional[ImageStream] = None
        self._hw: Optional[List[Tuple[int, int]]] = None
        self._skipped: Dict[int, str] = {}
        self._skipped_eval: Dict[int, str] = {}
        self._staged: Optional[Tuple[List[int], Dict]] = None
        self._first_batch = True
        self._planned: Optional[Tuple[int, int]] = None
        """The camera order (list id, length) the stream's window was planned from."""
        self.member_rows = False
        """Whether the stream reads files and the members decode their own rows (see `member_rows`)."""
        check_config(config)
        super().__init__(config, *args, **kwargs)
        if self.config.cache_images == "cpu" and torch.device(self.device).type == "cpu":
            # nerfstudio switches to "cpu" above 500 images, which pins memory: impossible without CUDA.
            # "gpu" means the datamanager's device, here the CPU itself.
            self.config.cache_images = "gpu"
        self.images_mode = self._choose_mode()
        if self.images_mode == "stream":
            self._start_stream()

    # ----- where the images come from -------------------------------------------------------------

    def _choose_mode(self) -> str:
        """`cache` or `stream` for `--pipeline.datamanager.images`; inference never reads training images."""
        if self.test_mode == "inference":
            return "cache"
        if self.config.images != "auto":
            return self.config.images
        self._bytes = decoded_bytes(self.train_dataset, self.config.cache_images_type)
        return "stream" if sum(self._bytes) > self.config.stream_above_bytes else "cache"

    def _start_stream(self) -> None:
        """Undistorted intrinsics for every camera now, then the first steps' images on worker threads."""
        config, image_type = self.config, self.config.cache_images_type
        sizes = getattr(self, "_bytes", None) or decoded_bytes(self.train_dataset, image_type)
        self._raw_train = undistort_intrinsics(self.train_dataset, "train")
        self._raw_eval = undistort_intrinsics(self.eval_dataset, "eval")
        on_device = config.cache_images == "gpu"
        self.train_cameras = self.train_dataset.cameras.to(self.device) if on_device else self.train_dataset.cameras
        self.member_rows = self._member_rows_possible()
        load, estimate = partial(decode, self.train_dataset, self._raw_train, image_type=image_type), sizes.__getitem__
        if self.member_rows:
            load = partial(load_rows, self.train_dataset, self._raw_train, image_type=image_type)
            files = [file_bytes(path) for path in self.train_dataset.image_filenames]
            estimate = files.__getitem__
        self._stream = ImageStream(  # no reference back to the datamanager: the finalizer below can run
            load, estimate, config.cache_bytes, config.prefetch_workers,
        )
        weakref.finalize(self, self._stream.close)
        if torch.device(self.device).type == "cuda":  # pinned copies of the next batch on a side stream
            self._copy_stream = torch.cuda.Stream(device=self.device)
        why = ""
        if config.images == "auto":
            why = f", above --pipeline.datamanager.stream-above-bytes {human_bytes(config.stream_above_bytes)}"
        rows = ", each member decoding the pixel rows it renders" if self.member_rows else ""
        CONSOLE.log(
            f"Streaming {len(self.train_dataset)} training images from disk ({human_bytes(sum(sizes))} decoded{why}): "
            f"{config.prefetch_workers} workers, {config.prefetch_steps} steps ahead, "
            f"a cache of {human_bytes(config.cache_bytes)}{rows}."
        )
        self._prefetch()

    def _member_rows_possible(self) -> bool:
        """`member-rows` where it can work: one camera per step, nerfstudio's plain image dataset, and the
        row decoder built (else one line, and whole images as before)."""
        if not (self.config.member_rows and self.config.cameras_per_step == 1 and rows_supported(self.train_dataset)):
            return False
        try:
            image_ops()
        except KernelBuildError as err:
            CONSOLE.log(f"[yellow]Decoding whole training images: the row decoder is unavailable ({str(err).splitlines()[0]})[/yellow]")
            return False
        return True

    @cached_property
    def cached_train(self):
        """nerfstudio's decoded training images; in stream mode each is decoded when asked for (tools and
        tests; training reads through the stream)."""
        if self.images_mode != "stream":
            return self._load_images("train", cache_images_device=self.config.cache_images)
        return LazyImages(lambda i: self._read(self.train_dataset, self._raw_train, i), len(self.train_dataset))

    @cached_property
    def cached_eval(self):
        """nerfstudio's decoded evaluation images; in stream mode decoded when asked for and not kept."""
        if self.images_mode != "stream":
            return self._load_images("eval", cache_images_device=self.config.cache_images)
        return LazyImages(lambda i: self._read(self.eval_dataset, self._raw_eval, i), len(self.eval_dataset))

    @property
    def fixed_indices_eval_dataloader(self):
        """nerfstudio's (camera, data) list of every evaluation image; lazy in stream mode."""
        if self.images_mode != "stream":
            return super().fixed_indices_eval_dataloader
        cameras = self.eval_dataset.cameras.to(self.device)

        def item(i: int):
            data = self._eval_data(i)
            return None if data is None else (cameras[i : i + 1], data)

        return ReadableImages(LazyImages(item, len(self.eval_dataset)))

    def next_eval_image(self, step: int) -> Tuple[Cameras, Dict]:
        """nerfstudio's draw of an unseen evaluation camera; in stream mode an unreadable image is skipped
        (one line, counted) and the next one drawn, as in training."""
        if self.images_mode != "stream":
            return super().next_eval_image(step)
        for _ in range(len(self.eval_dataset)):
            image_idx = self.eval_unseen_cameras.pop(random.randint(0, len(self.eval_unseen_cameras) - 1))
            if len(self.eval_unseen_cameras) == 0:
                self.eval_unseen_cameras = list(range(len(self.eval_dataset)))
            data = self._eval_data(image_idx)
            if data is not None:
                return self.eval_dataset.cameras[image_idx : image_idx + 1].to(self.device), data
        raise InputError(f"No evaluation image can be read ({len(self._skipped_eval)} tried, e.g. "
                         f"{next(iter(self._skipped_eval.values()))}); repair them or train without evaluation.")

    def _eval_data(self, idx: int) -> Optional[Dict]:
        """Evaluation image `idx` on the device, or None (after one line the first time, counted) where it
        cannot be read."""
        if idx in self._skipped_eval:
            return None
        try:
            data = self.cached_eval[idx].copy()
        except InputError as err:
            self._skipped_eval[idx] = str(err)
            CONSOLE.print(f"Skipped unreadable evaluation image: {err}; {len(self._skipped_eval)} of "
                          f"{len(self.eval_dataset)} so far.", style="yellow", markup=False, highlight=False, soft_wrap=True)
            return None
        data["image"] = data["image"].to(self.device)
        return data

    @property
    def skipped_eval_images(self) -> Dict[int, str]:
        """Evaluation images skipped as unreadable so far (camera index to error)."""
        return dict(self._skipped_eval)

    def _read(self, dataset, raw: Cameras, idx: int) -> Dict:
        try:
            return decode(dataset, raw, idx, self.config.cache_images_type)
        except BAD_IMAGE_ERRORS as err:
            raise InputError(f"Cannot read image {dataset.image_filenames[idx]}: {err}") from None

    def get_train_rays_per_batch(self) -> int:
        if self.images_mode != "stream":
            return super().get_train_rays_per_batch()
        return int(self.train_cameras.height[0]) * int(self.train_cameras.width[0])

    # ----- the camera order -------------------------------------------------------------------------

    def _sizes(self) -> List[Tuple[int, int]]:
        """(height, width) of every training camera as trained on (after undistortion)."""
        if self._hw is None:
            if self.images_mode != "stream":
                self.cached_train  # nerfstudio undistorts the cameras as it caches the images
            self._hw = list(zip(self.train_cameras.height.reshape(-1).tolist(), self.train_cameras.width.reshape(-1).tolist()))
        return self._hw

    def _draw(self, queue: List[int], refill: Callable[[], List[int]], accept: Callable[[int], object]):
        """One step's cameras from `queue` (nerfstudio's `train_unseen_cameras`): its first camera, then
        the next ones of that camera's size, refilled by `refill` when emptied, as nerfstudio pops it.
        Cameras `accept` answers None for are dropped. Returns ([(camera, accepted)], queue)."""
        hw, batch, rejected = self._sizes(), [], 0
        while len(batch) < self.config.cameras_per_step:
            if batch:
                size = hw[batch[0][0]]
                pos = next((j for j, i in enumerate(queue) if hw[i] == size), None)
                if pos is None:
                    break
            else:
                pos = 0
            idx = queue.pop(pos)
            if not queue:
                queue = refill()
            got = accept(idx)
            if got is not None:
                batch.append((idx, got))
            else:
                rejected += 1
                if rejected > 2 * len(hw):
                    raise InputError(f"None of the {len(hw)} training images can be read (see the lines above).")
        return batch, queue

    @contextmanager
    def _sandboxed_sampler(self):
        """Lets `sample_train_cameras` draw future epochs without moving the real generators."""
        generator = getattr(self, "random_generator", None)
        counts = getattr(self, "train_unsampled_epoch_count", None)
        np_state = np.random.get_state() if counts is not None else None
        if generator is not None:
            self.random_generator = random.Random()
            self.random_generator.setstate(generator.getstate())
        if counts is not None:
            self.train_unsampled_epoch_count = counts.copy()
        try:
            yield
        finally:
            if generator is not None:
                self.random_generator = generator
            if counts is not None:
                self.train_unsampled_epoch_count = counts
                np.random.set_state(np_state)

    def upcoming(self, steps: int) -> List[List[int]]:
        """The cameras of the next `steps` steps, as `next_train` will draw them (images known to be
        unreadable skipped), without drawing them."""
        bad = self._stream.bad if self._stream is not None else {}
        queue, batches = list(self.train_unseen_cameras), []
        with self._sandboxed_sampler():
            for _ in range(steps):
                batch, queue = self._draw(queue, self.sample_train_cameras, lambda i: None if i in bad else True)
                batches.append([i for i, _ in batch])
        return batches

    def _prefetch(self) -> List[int]:
        """Plan the stream's next `prefetch_steps` steps; returns the next step's cameras."""
        batches = self.upcoming(self.config.prefetch_steps)
        self._stream.plan([i for b in batches for i in b], keep=len(batches[0]))
        return batches[0]

    # ----- batches ----------------------------------------------------------------------------------

    def _fetch(self, idx: int) -> Optional[Dict]:
        """Camera `idx`'s decoded image, or None (after one line, counted) where it cannot be read."""
        if self._stream is None:
            return self.cached_train[idx]
        data = self._stream.get(idx)
        if world.active():  # every rank must skip the same cameras, even where only one rank cannot read a file
            failed = world.ranks_with(data is None)
            if failed and data is not None:
                self._stream.bad[idx] = f"unreadable on rank {failed[0]} but not here: the ranks' copies differ"
                data = None
        if data is None and idx not in self._skipped:
            self._skipped[idx] = error = self._stream.bad[idx]
            total, path = len(self.train_dataset), self.train_dataset.image_filenames[idx]
            limit = self.config.max_bad_image_fraction * total
            if len(self._skipped) > limit:
                raise InputError(
                    f"Training stopped: {len(self._skipped)} of {total} training images cannot be read, more than "
                    f"--pipeline.datamanager.max-bad-image-fraction {self.config.max_bad_image_fraction} allows "
                    f"(the latest: {path}: {error}); repair or remove them, or raise the fraction."
                )
            CONSOLE.print(
                f"Skipped unreadable training image {path} ({error}); {len(self._skipped)} of {total} so far, "
                f"training stops above {int(limit)}.", style="yellow", markup=False, highlight=False, soft_wrap=True,
            )
        return data

    @property
    def skipped_images(self) -> Dict[int, str]:
        """Training images skipped as unreadable so far (camera index to error)."""
        return dict(self._skipped)

    def next_train(self, step: int) -> Tuple[Cameras, Dict]:
        """One camera as nerfstudio gives it, or up to `cameras_per_step` of them of one size: Cameras [B]
        and each per-image entry of the batch (image, mask) stacked to [B, H, W, ...]."""
        queue = self.train_unseen_cameras
        if self._stream is not None and self._planned != (id(queue), len(queue)):  # first step, or a resume
            first = self._prefetch()
            if self._first_batch:  # step 0 waits for its own images only
                for idx in track(first, description="Reading the first training images", transient=True):
                    self._stream.get(idx)
                self._first_batch = False
        drawn, self.train_unseen_cameras = self._draw(self.train_unseen_cameras, self.sample_train_cameras, self._fetch)
        indices, datas = [i for i, _ in drawn], [d for _, d in drawn]
        staged = self._staged if self._staged is not None and self._staged[0] == indices else None
        if len(indices) == 1:  # one camera (also a short batch) as nerfstudio gives it: the model takes it unbatched
            data = datas[0].copy()  # as nerfstudio: never mutate the cached dictionary
            if "image" in data:  # else the members read their rows from data["image_rows"]
                data["image"] = staged[1]["image"] if staged else data["image"].to(self.device)
                data["image_rows"] = TensorRows(data["image"])
            camera = self.train_cameras[indices[0] : indices[0] + 1].to(self.device)
            if camera.metadata is None:
                camera.metadata = {}
            camera.metadata["cam_idx"] = indices[0]
            batch = data
        else:
            cameras = camera = self.train_cameras[torch.tensor(indices)].to(self.device)
            cameras.metadata = {"cam_idx": indices}
            batch = staged[1] if staged else stack(datas, self.device)
        if staged:
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
            for value in batch.values():
                if torch.is_tensor(value) and value.is_cuda:
                    value.record_stream(torch.cuda.current_stream(self.device))
        if self._stream is not None:  # last: the new decodes then compete less with this call for the GIL
            self._prefetch()
            self._planned = (id(self.train_unseen_cameras), len(self.train_unseen_cameras))
            self._stage_next()
        return camera, batch

    def _stage_next(self) -> None:
        """CUDA only: start copying the next step's batch, if already decoded, from pinned memory on a side
        stream, so the copy overlaps this step's compute."""
        self._staged = None
        if getattr(self, "_copy_stream", None) is None or self.member_rows:
            return
        upcoming = self.upcoming(1)[0]
        if not all(self._stream.ready(i) for i in upcoming) or any(i in self._stream.bad for i in upcoming):
            return
        datas = [self._stream.get(i) for i in upcoming]
        pinned = {"image": datas[0]["image"]} if len(datas) == 1 else stack(datas, "cpu")
        with torch.cuda.stream(self._copy_stream):
            moved = {k: v.pin_memory().to(self.device, non_blocking=True) if k == "image" else v for k, v in pinned.items()}
        self._staged = (upcoming, moved)


def file_bytes(path) -> int:
    """A file's size (0 where it cannot be read: it is counted when met)."""
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def stack(datas: List[Dict], device) -> Dict:
    """Per-image entries stacked to [B, ...]; the images moved to `device` (masks stay, as nerfstudio's)."""
    batch = {key: torch.stack([d[key] for d in datas]) for key in datas[0] if torch.is_tensor(datas[0][key])}
    batch["image"] = batch["image"].to(device)
    return batch


def check_config(config: MsDatamanagerConfig) -> None:
    """One line naming the option for values that cannot work."""
    checks = [
        ("cameras-per-step", config.cameras_per_step >= 1, "at least 1"),
        ("images", config.images in ("auto", "cache", "stream"), "auto, cache or stream"),
        ("cache-bytes", config.cache_bytes >= 1, "a positive number of bytes"),
        ("prefetch-workers", config.prefetch_workers >= 1, "at least 1"),
        ("prefetch-steps", config.prefetch_steps >= 1, "at least 1"),
        ("max-bad-image-fraction", 0 <= config.max_bad_image_fraction <= 1, "between 0 and 1"),
    ]
    for name, ok, wanted in checks:
        if not ok:
            raise InputError(f"--pipeline.datamanager.{name} must be {wanted}, got {getattr(config, name.replace('-', '_'))}.")
