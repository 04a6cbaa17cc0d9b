"""Export of large models, streamed: nerfstudio's Inria-layout PLY (the bytes `ns-export gaussian-splat`
writes) and the compact `.splat` of antimatter15's viewer, without the whole model in memory twice.

    python -m ms_splatfacto.export --load-config CONFIG --output-dir DIR [--format ply|splat|both]

`ns-export gaussian-splat` sets up the whole pipeline, loads the checkpoint into it, copies every
property out of the model (`map_to_tensors`), filters each copy, and writes the PLY value by value
from Python. Here the Gaussians are read in pieces of PIECE_ROWS rows in global order, from each
member's chunk of a model in memory (`export_model`), from the written chunks of a sharded checkpoint
(one member's chunk at a time) or from a single-file checkpoint mapped into memory (its pages read as
needed): each piece is copied into one fixed buffer, filtered as nerfstudio filters (non-finite values,
opacity below 1/255, the optional oriented box) and written. One pass; peak memory is the buffers
(about 3 x PIECE_ROWS x the row size: ~50 MB at SH degree 3) plus, from a sharded checkpoint, one
written chunk. The PLY header carries the vertex count before the rows: it is written for all rows
first and rewritten at the end (the rows are moved forward in place in the rare case the count has
fewer digits).

The `.splat` is sorted like the reference converter (by descending exp(scale sum) x sigmoid(opacity)),
which takes a global pass: its records go unsorted to a temporary file beside it, and are then copied
in sorted order. That costs 12 bytes per kept Gaussian in memory (sort key and order) plus the mapped
temporary file (32 bytes per Gaussian, file-backed pages); `--no-sort` streams them in row order.

Differences from nerfstudio: a Gaussian with a non-finite position is dropped alone (nerfstudio's
filter reduces each position column to one flag, drops every row and then refuses to write), and
at SH degree 0 the colours are computed per piece, so sigmoid's last bit may differ where torch's
vector loop splits the whole tensor elsewhere. Both outputs are written atomically (a temporary file
beside, renamed when complete).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ms_splatfacto.backend.aggregate import is_aggregate
from ms_splatfacto.backend.aggregate import sharded_checkpoint
from ms_splatfacto.errors import InputError
from ms_splatfacto.io import atomic_path, fsync
from ms_splatfacto.observability import phase

PIECE_ROWS = 65536
"""Rows per piece: a multiple of torch's vector width, so pieces start where the whole tensor's loop would."""
NAMES = ("means", "scales", "quats", "features_dc", "features_rest", "opacities")
LOW_OPACITY = -5.5373
"""nerfstudio drops Gaussians whose opacity logit is below this (logit(1/255): the rasterizer skips them)."""
SH_C0 = 0.28209479177387814
SPLAT = np.dtype([("position", "<f4", (3,)), ("scale", "<f4", (3,)), ("color", "u1", (4,)), ("rotation", "u1", (4,))])
"""One Gaussian of a .splat file: 32 bytes."""
FORMATS = {"ply": ("ply",), "splat": ("splat",), "both": ("ply", "splat")}

Segment = Tuple[int, int, Callable[[], Dict[str, torch.Tensor]]]
"""Rows [start, stop) in global order and how to get them (name -> [stop - start, ...] tensor)."""


def model_segments(params: Mapping[str, torch.Tensor]) -> List[Segment]:
    """Each member's chunk of the Gaussian parameters `params` (aggregates of one layout, or ordinary
    tensors): views, no copy."""
    means = params["means"]
    if not is_aggregate(means):
        return [(0, means.shape[0], lambda: {n: params[n].detach() for n in NAMES})]
    layout = means._layout
    if any(not is_aggregate(params[n]) or params[n]._layout.bounds != layout.bounds for n in NAMES):
        raise ValueError("The Gaussian parameters are striped differently; they cannot be exported together")
    if len(layout.members.local) != len(layout.members):
        raise InputError("Export runs in one process; this model's rows lie on several ranks (export its checkpoint).")

    def member(d: int) -> Segment:
        return layout.bounds[d], layout.bounds[d + 1], lambda: {n: params[n].chunks[d].detach() for n in NAMES}

    return [member(d) for d in layout.members.local if layout.counts[d] > 0]


def pieces(segments: Iterable[Segment], piece_rows: int = PIECE_ROWS) -> Iterator[Dict[str, np.ndarray]]:
    """Rows [k * piece_rows, (k + 1) * piece_rows) of every parameter in global order, copied from the
    segments into one buffer per parameter (reused: use a piece before asking for the next)."""
    buffers: Optional[Dict[str, torch.Tensor]] = None
    filled = 0
    for start, stop, load in segments:
        rows = load()
        if buffers is None:
            buffers = {n: torch.empty((piece_rows, *t.shape[1:]), dtype=t.dtype) for n, t in rows.items()}
        at = 0
        while at < stop - start:
            take = min(piece_rows - filled, stop - start - at)
            for n, t in rows.items():
                if t.device.type == "cpu":
                    np.copyto(buffers[n][filled : filled + take].numpy(), t[at : at + take].numpy())
                else:
                    buffers[n][filled : filled + take].copy_(t[at : at + take])
            filled, at = filled + take, at + take
            if filled == piece_rows:
                yield {n: b.numpy() for n, b in buffers.items()}
                filled = 0
        del rows
    if filled and buffers is not None:
        yield {n: b[:filled].numpy() for n, b in buffers.items()}


def ply_properties(sh_degree: int, rest_coefficients: int, color_mode: str) -> List[Tuple[str, str]]:
    """nerfstudio's vertex properties in its order: (name, "float" or "uchar")."""
    props = [(name, "float") for name in ("x", "y", "z", "nx", "ny", "nz")]
    if color_mode == "rgb":
        props += [(name, "uchar") for name in ("red", "green", "blue")]
    else:
        props += [(f"f_dc_{i}", "float") for i in range(3)]
        if sh_degree > 0:
            props += [(f"f_rest_{i}", "float") for i in range(3 * rest_coefficients)]
    props += [("opacity", "float")] + [(f"scale_{i}", "float") for i in range(3)] + [(f"rot_{i}", "float") for i in range(4)]
    return props


def ply_header(count: int, props: Sequence[Tuple[str, str]]) -> bytes:
    """The header nerfstudio's `ExportGaussianSplat.write_ply` writes."""
    lines = ["ply", "format binary_little_endian 1.0", f"comment Generated by Nerstudio {version('nerfstudio')}",
             "comment Vertical Axis: z", f"element vertex {count}"]
    lines += [f"property {kind} {name}" for name, kind in props] + ["end_header"]
    return ("\n".join(lines) + "\n").encode()


class Converter:
    """One piece of parameters -> the PLY rows nerfstudio would write for it, which of them it keeps,
    and their .splat records and sort keys."""

    def __init__(self, sh_degree: int, rest_coefficients: int, color_mode: str = "sh_coeffs", obb=None) -> None:
        if color_mode not in ("sh_coeffs", "rgb"):
            raise InputError(f"Unknown PLY colour mode {color_mode!r}: use sh_coeffs or rgb.")
        self.sh_degree, self.color_mode, self.obb = sh_degree, color_mode, obb
        self.props = ply_properties(sh_degree, rest_coefficients, color_mode)
        self.dtype = np.dtype([(name, "<f4" if kind == "float" else "u1") for name, kind in self.props])

    def dc(self, piece: Dict[str, np.ndarray]) -> np.ndarray:
        """splatfacto's `shs_0`, computed as it does (torch, float32)."""
        if self.sh_degree > 0:
            return piece["features_dc"]
        return ((torch.sigmoid(torch.from_numpy(piece["features_dc"])) - 0.5) / SH_C0).numpy()

    def ply(self, piece: Dict[str, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """(PLY rows of the piece, the mask of those nerfstudio keeps: finite values, opacity at least
        1/255, inside the box)."""
        means, m = piece["means"], piece["means"].shape[0]
        if self.color_mode == "rgb":
            fdc = torch.from_numpy(piece["features_dc"])
            colors = fdc * SH_C0 + 0.5 if self.sh_degree > 0 else torch.sigmoid(fdc)  # splatfacto's `colors`
            colour_blocks = [(torch.clamp(colors, 0.0, 1.0).numpy() * 255).astype(np.uint8)]
        else:
            colour_blocks = [self.dc(piece)]
            if self.sh_degree > 0:  # Inria's order is channel-major: splatfacto's [N, K, 3] transposed
                colour_blocks.append(piece["features_rest"].transpose(0, 2, 1).reshape(m, -1))
        blocks = [means, np.zeros((m, 3), np.float32), *colour_blocks, piece["opacities"], piece["scales"], piece["quats"]]
        out = np.empty(m, dtype=self.dtype)
        if self.color_mode == "rgb":  # mixed float and uchar fields: column by column
            names = iter(self.dtype.names)
            for block in blocks:
                for j in range(block.shape[1]):
                    out[next(names)] = block[:, j]
        else:  # all float32: one [m, properties] array
            flat, col = out.view(np.float32).reshape(m, -1), 0
            for block in blocks:
                flat[:, col : col + block.shape[1]] = block
                col += block.shape[1]
        keep = ~(piece["opacities"][:, 0] < LOW_OPACITY)
        for block in blocks:
            if block.dtype.kind == "f":
                keep &= np.isfinite(block).all(axis=1)
        if self.obb is not None:
            keep &= self.obb.within(torch.from_numpy(np.ascontiguousarray(means))).numpy()
        return out, keep

    def splat(self, piece: Dict[str, np.ndarray], keep: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(.splat records of the kept rows, their sort keys), as the reference converter computes them
        from the PLY (float32 numpy)."""
        scales, opacity = piece["scales"][keep], piece["opacities"][keep][:, 0]
        records = np.empty(scales.shape[0], dtype=SPLAT)
        records["position"] = piece["means"][keep]
        records["scale"] = np.exp(scales)
        color = np.empty((scales.shape[0], 4), dtype=np.float32)
        color[:, :3] = 0.5 + SH_C0 * self.dc(piece)[keep]
        color[:, 3] = 1 / (1 + np.exp(-opacity))
        records["color"] = (color * 255).clip(0, 255).astype(np.uint8)
        rot = piece["quats"][keep]
        records["rotation"] = (rot / np.linalg.norm(rot, axis=1, keepdims=True) * 128 + 128).clip(0, 255).astype(np.uint8)
        keys = -np.exp(scales[:, 0] + scales[:, 1] + scales[:, 2]) / (1 + np.exp(-opacity))
        return records, keys


def _write_header(f, reserved: int, header: bytes, body: int) -> None:
    """Put the final `header` before the `body` bytes written after `reserved` bytes of placeholder; a
    shorter header (a count of fewer digits) moves the body forward in blocks."""
    f.seek(0)
    f.write(header)
    if len(header) == reserved:
        return
    read_at, write_at, end = reserved, len(header), reserved + body
    while read_at < end:
        f.seek(read_at)
        block = f.read(min(1 << 24, end - read_at))
        f.seek(write_at)
        f.write(block)
        read_at, write_at = read_at + len(block), write_at + len(block)
    f.truncate(write_at)


def export_gaussians(segments: Sequence[Segment], rows: int, sh_degree: int, output_dir: Path, formats: Sequence[str] = ("ply",),
                     output_filename: str = "splat.ply", ply_color_mode: str = "sh_coeffs", obb=None, sort: bool = True,
                     piece_rows: int = PIECE_ROWS) -> List[Path]:
    """Stream the Gaussians of `segments` (`rows` in all) into `output_dir`/`output_filename` (PLY)
    and/or the same name with `.splat`, in one pass; returns the paths written."""
    output_dir = Path(output_dir)
    stem = Path(output_filename)
    paths = {"ply": output_dir / stem, "splat": output_dir / stem.with_suffix(".splat")}
    converter: Optional[Converter] = None
    with contextlib.ExitStack() as stack:
        stack.enter_context(np.errstate(over="ignore", invalid="ignore"))  # exp overflow and NaN casts, as in nerfstudio
        tmp = {f: stack.enter_context(atomic_path(paths[f])) for f in formats}
        files = {f: stack.enter_context(open(tmp[f], "w+b")) for f in formats}
        unsorted = None
        if "splat" in formats and sort:
            fd, name = tempfile.mkstemp(prefix=f".{paths['splat'].name}.unsorted.", suffix=".tmp", dir=output_dir)
            os.close(fd)
            stack.callback(lambda: os.path.exists(name) and os.unlink(name))
            unsorted = stack.enter_context(open(name, "w+b"))
            keys = np.empty(rows, dtype=np.float32)
        kept = reserved = 0
        with phase(f"exporting {rows:,} Gaussians", unit="bytes") as advance:
            for piece in pieces(segments, piece_rows):
                if converter is None:
                    converter = Converter(sh_degree, piece["features_rest"].shape[1], ply_color_mode, obb)
                    advance(0, total=rows * (converter.dtype.itemsize * ("ply" in formats) + SPLAT.itemsize * ("splat" in formats)))
                    if "ply" in files:
                        reserved = files["ply"].write(ply_header(rows, converter.props))
                out, keep = converter.ply(piece)
                if "ply" in files:
                    advance(files["ply"].write(out[keep].data))
                if "splat" in files:
                    records, batch_keys = converter.splat(piece, keep)
                    if unsorted is None:
                        advance(files["splat"].write(records.data))
                    else:
                        unsorted.write(records.data)
                        keys[kept : kept + len(records)] = batch_keys
                kept += int(keep.sum())
            if converter is None:
                raise InputError("The model holds no Gaussians: nothing to export.")
            if "ply" in files:
                _write_header(files["ply"], reserved, ply_header(kept, converter.props), kept * converter.dtype.itemsize)
            if unsorted is not None and kept:
                unsorted.flush()
                order = np.argsort(keys[:kept])  # the reference converter's (unstable) sort, on the same keys
                records = np.memmap(unsorted, dtype=SPLAT, mode="r", shape=(kept,))
                for at in range(0, kept, piece_rows):
                    advance(files["splat"].write(records[order[at : at + piece_rows]].data))
                del records
        if kept == 0:
            raise InputError("No Gaussian is left to export: every one has non-finite values, low opacity or lies outside the box.")
        for f, file in files.items():
            file.flush()
            fsync(tmp[f])
    return [paths[f] for f in formats]


def export_model(model, output_dir: Path, **options) -> List[Path]:
    """`export_gaussians` of a model in memory (MsSplatfactoModel), member chunk by member chunk."""
    params = {n: model.gauss_params[n] for n in NAMES}
    return export_gaussians(model_segments(params), params["means"].shape[0], model.config.sh_degree, output_dir, **options)


def _gaussian_entries(pipeline: Mapping, path: Path) -> Dict[str, object]:
    for prefix in ("_model.gauss_params.", "_model."):
        if all(prefix + n in pipeline for n in NAMES):
            return {n: pipeline[prefix + n] for n in NAMES}
    raise InputError(f"{path} holds no splatfacto model (no _model.gauss_params.means, ...).")


def checkpoint_segments(path: Path) -> Tuple[List[Segment], int]:
    """Segments of the Gaussians of the checkpoint at `path`: a sharded one's written chunks (each read
    when its turn comes), a single file's tensors mapped from the file (pages read as needed)."""
    path = Path(path)
    if sharded_checkpoint.is_sharded(path):
        try:
            skeleton, info = sharded_checkpoint.read_skeleton(path)
        except sharded_checkpoint.CheckpointError as err:
            raise InputError(f"Cannot read checkpoint {path}: {err}.") from None
        entries = _gaussian_entries(skeleton.get("pipeline", {}), path)
        keys = {n: e[sharded_checkpoint.ROWS] for n, e in entries.items() if isinstance(e, dict)}
        plain = {n: e for n, e in entries.items() if n not in keys}
        wanted = {keys[n]: info[keys[n]][:2] for n in keys}
        rows = info[keys["means"]][0][0] if "means" in keys else plain["means"].shape[0]

        def read(start: int, stop: int) -> Dict[str, torch.Tensor]:
            got = sharded_checkpoint.read_rows(path, wanted, start, stop)
            return {n: got[keys[n]] if n in keys else plain[n][start:stop] for n in NAMES}

        spans = info[keys["means"]][2] if "means" in keys else [(0, rows)]
        return [(a, b, lambda a=a, b=b: read(a, b)) for a, b in spans if b > a], rows
    if not path.is_file():
        raise InputError(f"Checkpoint {path} does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise InputError(f"Cannot read checkpoint {path} ({str(err).splitlines()[0]}); it may be truncated.") from None
    tensors = _gaussian_entries(state.get("pipeline", {}), path)
    return [(0, tensors["means"].shape[0], lambda: tensors)], tensors["means"].shape[0]


def main(argv: Optional[Sequence[str]] = None) -> List[Path]:
    parser = argparse.ArgumentParser(prog="python -m ms_splatfacto.export", description=(
        "Stream a trained model into nerfstudio's PLY (the bytes ns-export gaussian-splat writes) and/or a .splat, "
        "piece by piece: for models too large for ns-export."))
    parser.add_argument("--load-config", type=Path, required=True, help="config.yml of the training run")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--format", choices=sorted(FORMATS), default="ply", help="PLY (nerfstudio's layout), .splat, or both")
    parser.add_argument("--output-filename", default="splat.ply", help="PLY name; the .splat takes its stem")
    parser.add_argument("--load-checkpoint", type=Path, help="a checkpoint (file or sharded folder) instead of the run's latest")
    parser.add_argument("--ply-color-mode", choices=["sh_coeffs", "rgb"], default="sh_coeffs")
    parser.add_argument("--obb-center", type=float, nargs=3)
    parser.add_argument("--obb-rotation", type=float, nargs=3, help="roll, pitch, yaw in radians")
    parser.add_argument("--obb-scale", type=float, nargs=3)
    parser.add_argument("--no-sort", action="store_true", help="write the .splat in row order (no global sort)")
    parser.add_argument("--piece-rows", type=int, default=PIECE_ROWS)
    args = parser.parse_args(argv)
    import nerfstudio.configs.method_configs  # noqa: F401  (as eval_setup: the registry first, then the config naming this plugin)
    import yaml

    from ms_splatfacto.checkpoints import checkpoint_path

    if not args.load_config.is_file():
        raise InputError(f"No config at {args.load_config}.")
    config = yaml.load(args.load_config.read_text(), Loader=yaml.Loader)
    path = args.load_checkpoint or checkpoint_path(config.get_checkpoint_dir(), getattr(config, "load_step", None))
    obb = None
    if args.obb_center and args.obb_rotation and args.obb_scale:
        from nerfstudio.data.scene_box import OrientedBox

        obb = OrientedBox.from_params(tuple(args.obb_center), tuple(args.obb_rotation), tuple(args.obb_scale))
    segments, rows = checkpoint_segments(path)
    written = export_gaussians(segments, rows, config.pipeline.model.sh_degree, args.output_dir, FORMATS[args.format],
                               args.output_filename, args.ply_color_mode, obb, not args.no_sort, args.piece_rows)
    for p in written:
        print(f"wrote {p} ({p.stat().st_size:,} bytes)")
    return written


if __name__ == "__main__":
    main()
