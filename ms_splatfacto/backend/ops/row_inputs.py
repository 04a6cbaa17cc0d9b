"""Ground truth where the pixels are rendered: each member reads only its own band of an image's rows.

A training image is rendered split over pixel rows (the tile plan's bands of whole tile rows); the loss
on member r reads its rows of the ground truth plus the SSIM halo rows below them (`gt_row_spans`).
`read_bands` has every local member read exactly that span from a row source (an object with
`read(lo, hi, device, member)`: the datamanager's image decoder or a cached image) on its own device,
so no member decodes or holds rows it does not render, and no rank another rank's rows. The loss
(`split_l1_ssim`) and the PSNR (`split_squared_error`) then take the bands as they are.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ms_splatfacto.backend.aggregate import exchange
from ms_splatfacto.backend.aggregate.layout import Layout
from ms_splatfacto.backend.aggregate.tensor import AggregateTensor

SSIM_HALO = 10
"""Rows below its band that a member's SSIM map rows read (an 11-row window)."""


def ssim_span(lo: int, hi: int, image_height: int) -> Tuple[bool, int]:
    """(whether SSIM map rows start in rows [lo, hi) of a stack of images `image_height` rows tall, the
    end of the rows they read). A map row starts on each image's rows but its last 10 (an 11-row window
    never crosses into the next image), so the halo below a band stops at the image's end; an image
    shorter than the window is not blurred along the rows (no halo)."""
    halo = SSIM_HALO if image_height > SSIM_HALO else 0
    map_h = image_height - halo
    if hi <= lo:
        return False, hi
    image, row = divmod(hi - 1, image_height)
    last = hi - 1 if row < map_h else image * image_height + map_h - 1  # the band's last map row
    if last < lo:
        return False, hi
    return True, max(hi, last + halo + 1)


def gt_row_spans(bounds: Sequence[int], height: int, image_height: Optional[int] = None) -> List[Tuple[int, int]]:
    """[lo, stop) of the ground-truth rows member d's loss reads: its rows [bounds[d], bounds[d+1]) and,
    where SSIM map rows start in them, the halo rows below (`ssim_span`). The rows are one image of
    `height` rows, or `height // image_height` images stacked (a camera batch's [C * H, W, 3])."""
    image_height = height if image_height is None else image_height
    assert bounds[0] == 0 and bounds[-1] == height, f"bounds must run from 0 to {height}, got {list(bounds)}"
    assert image_height > 0 and height % image_height == 0, f"{height} rows are not a stack of images {image_height} rows tall"
    return [(lo, ssim_span(lo, hi, image_height)[1]) for lo, hi in zip(bounds[:-1], bounds[1:])]


class RowBands:
    """An image ([H, W, C]) as bands of rows on the members: local member r holds rows
    [spans[r][0], spans[r][1]) on its own device (its rendered rows, then its halo rows). Other ranks'
    members' bands are None here."""

    def __init__(self, layout: Layout, shape: Tuple[int, ...], spans: List[Tuple[int, int]], bands: Dict[int, Tensor]) -> None:
        assert len(spans) == len(layout.members) and layout.rows == shape[0], (
            f"one span per member ({len(layout.members)}) over the layout's {layout.rows} rows, got {len(spans)} for {shape}"
        )
        self.layout, self.shape, self.spans, self._bands = layout, tuple(shape), spans, bands
        self.dtype = next(iter(bands.values())).dtype if bands else torch.float32

    def band(self, r: int) -> Tensor:  # [spans[r][1] - spans[r][0], W, C]
        """Local member r's band."""
        return self._bands[r]

    def map(self, fn: Callable[..., Tensor], rowed: Optional[Dict[str, Tensor]] = None,
            shared: Optional[Dict[str, Tensor]] = None) -> "RowBands":
        """`fn(band, **extras)` on each local member's band, row-local (the band keeps its rows): extras are
        the member's rows of each `rowed` ordinary [H, ...] tensor (e.g. a mask) and each `shared` tensor
        (e.g. a background colour), both moved to the member."""
        rowed, shared = rowed or {}, shared or {}
        for name, value in rowed.items():
            assert value.shape[0] == self.shape[0], f"{name} must have {self.shape[0]} rows, got {tuple(value.shape)}"
        out = {}
        for r in self.layout.members.local:
            lo, stop = self.spans[r]
            band = self._bands[r]
            extras = {name: exchange.to_member(value[lo:stop], r, self.layout) for name, value in rowed.items()}
            extras.update({name: exchange.to_member(value, r, self.layout) for name, value in shared.items()})
            out[r] = fn(band, **extras)
            assert out[r].shape[:2] == band.shape[:2], f"fn must keep the band's rows, got {tuple(out[r].shape)}"
        shape = self.shape[:2] + tuple(out[self.layout.members.local[0]].shape[2:]) if out else self.shape
        return RowBands(self.layout, shape, self.spans, out)


def read_bands(
    pred: AggregateTensor, source, scale: int = 1, prepare: Optional[Callable[[Tensor], Tensor]] = None,
    image_height: Optional[int] = None,
) -> RowBands:  # pred: [H, W, ...] or [C * image_height, W, ...]
    """The ground truth of image `pred` (or of a camera batch's stacked images, each `image_height` rows)
    as each local member's span of it (`gt_row_spans` of its row layout), read from `source` on the
    member's own device: `source.read(lo * scale, stop * scale, device, member)`, the source rows that
    `prepare` (e.g. splatfacto's stride-`scale` area downscale; row-local) turns into rows [lo, stop)."""
    assert isinstance(pred, AggregateTensor) and pred.dim() == 3, f"pred must be an aggregate [H, W, C], got {type(pred).__name__}"
    assert scale >= 1, f"scale must be at least 1, got {scale}"
    layout = pred._layout
    spans = gt_row_spans(layout.bounds, layout.rows, image_height)
    m = layout.members
    bands = {}
    for r in m.local:
        lo, stop = spans[r]
        rows = source.read(lo * scale, stop * scale, m.devices[r], r)
        assert rows.dim() == 3 and rows.shape[0] == (stop - lo) * scale, (
            f"member {r} read {tuple(rows.shape)}, expected {(stop - lo) * scale} rows"
        )
        bands[r] = rows if prepare is None else prepare(rows)
        assert bands[r].shape[:2] == (stop - lo, pred.shape[1]), (
            f"member {r}'s band is {tuple(bands[r].shape)}, expected {stop - lo} rows of {pred.shape[1]}"
        )
    channels = tuple(bands[m.local[0]].shape[2:]) if bands else (3,)
    return RowBands(layout, (layout.rows, pred.shape[1], *channels), spans, bands)


def split_squared_error(pred: AggregateTensor, gt: RowBands, dtype: Optional[torch.dtype] = None) -> Tensor:  # pred: [H, W, C]
    """sum((pred - gt)^2) over the image ([], in `dtype`, default pred's): each member sums its own rows in
    `dtype`, the partials are combined in member order on every rank: the PSNR without a whole image.
    With float64 on the CPU the sum is the same bits on any member count and split into ranks (a float32
    sum over the whole image rounds differently: equal to about 1e-7)."""
    layout = pred._layout
    assert isinstance(gt, RowBands) and gt.layout.bounds == layout.bounds and tuple(pred.shape) == gt.shape, (
        f"pred {tuple(pred.shape)} and the bands {gt.shape} must share one row layout"
    )
    dtype = dtype or pred.dtype
    m, bounds = layout.members, layout.bounds
    holders = [d for d in range(len(m)) if bounds[d + 1] > bounds[d]]
    parts = {}
    for r in m.local:
        own = pred.chunks[r].detach()
        diff = (own - gt.band(r)[: own.shape[0]]).to(dtype)
        parts[r] = torch.sum(diff * diff).reshape(1)[: int(r in holders)]
    got = exchange.replicate(m, parts, rows_per_member=[int(d in holders) for d in range(len(m))])
    return torch.cat([got[d] for d in holders]).sum(0)
