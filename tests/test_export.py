"""Streaming export (`python -m ms_splatfacto.export`): its PLY is byte for byte what `ns-export
gaussian-splat` writes (the trained lund_tiny model from its file checkpoint and from a sharded one
read piece by piece; models with non-finite and transparent rows, both colour modes, SH degree 0, a
crop box), its .splat is byte for byte the reference converter's output and holds the model's
values, a failed export leaves no file, and a 2M-Gaussian model on cpu:4 exports within a fixed
buffer beyond the model itself. `ns-export` reads a sharded checkpoint too."""

from __future__ import annotations

import json
import subprocess
import sys
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from plyfile import PlyData

from ms_splatfacto import export
from ms_splatfacto.backend.aggregate import aggregate, parameter
from ms_splatfacto.checkpoints import checkpoint_path, read_checkpoint, write_checkpoint
from tests.conftest import REPO, TrainedRun, ns
from tests.test_model_step import make_model

GAUSS = "_model.gauss_params."


def reference_splat(ply: Path) -> bytes:
    """antimatter15/splat's convert.py (`process_ply_to_splat`), as published."""
    plydata = PlyData.read(str(ply))
    vert = plydata["vertex"]
    sorted_indices = np.argsort(-np.exp(vert["scale_0"] + vert["scale_1"] + vert["scale_2"]) / (1 + np.exp(-vert["opacity"])))
    buffer = BytesIO()
    for idx in sorted_indices:
        v = plydata["vertex"][idx]
        position = np.array([v["x"], v["y"], v["z"]], dtype=np.float32)
        scales = np.exp(np.array([v["scale_0"], v["scale_1"], v["scale_2"]], dtype=np.float32))
        rot = np.array([v["rot_0"], v["rot_1"], v["rot_2"], v["rot_3"]], dtype=np.float32)
        SH_C0 = 0.28209479177387814
        color = np.array([0.5 + SH_C0 * v["f_dc_0"], 0.5 + SH_C0 * v["f_dc_1"], 0.5 + SH_C0 * v["f_dc_2"], 1 / (1 + np.exp(-v["opacity"]))])
        buffer.write(position.tobytes())
        buffer.write(scales.tobytes())
        buffer.write((color * 255).clip(0, 255).astype(np.uint8).tobytes())
        buffer.write(((rot / np.linalg.norm(rot)) * 128 + 128).clip(0, 255).astype(np.uint8).tobytes())
    return buffer.getvalue()


def export_cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "ms_splatfacto.export", *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def only_outputs(folder: Path) -> list:
    """The names in `folder`: no temporary may be left there."""
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def nerfstudio_ply(trained_run: TrainedRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ns_export")
    ns("ns-export", "gaussian-splat", "--load-config", str(trained_run.config), "--output-dir", str(out))
    return out / "splat.ply"


@pytest.fixture(scope="module")
def sharded_run(trained_run: TrainedRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained run re-saved as a cpu:4 sharded checkpoint, under a copy of its config: the config's path."""
    import nerfstudio.configs.method_configs  # noqa: F401  (the registry before the config that names this plugin)

    loaded = read_checkpoint(checkpoint_path(trained_run.checkpoint_dir, None))
    loaded["pipeline"] = {k: aggregate(v, "cpu:4") if k.startswith(GAUSS) else v for k, v in loaded["pipeline"].items()}
    config = yaml.load(trained_run.config.read_text(), Loader=yaml.Loader)
    config.output_dir = tmp_path_factory.mktemp("sharded_run")
    config.get_base_dir().mkdir(parents=True)
    (config.get_base_dir() / "config.yml").write_text(yaml.dump(config))
    path = write_checkpoint(loaded, config.get_checkpoint_dir(), loaded["step"])
    assert path.is_dir(), "four members write the sharded format"
    return config.get_base_dir() / "config.yml"


def test_ply_is_nerfstudios_bytes_and_splat_the_reference_converters(trained_run: TrainedRun, nerfstudio_ply: Path, tmp_path: Path):
    result = export_cli("--load-config", str(trained_run.config), "--output-dir", str(tmp_path), "--format", "both")
    assert (tmp_path / "splat.ply").read_bytes() == nerfstudio_ply.read_bytes()
    assert (tmp_path / "splat.splat").read_bytes() == reference_splat(nerfstudio_ply)
    assert only_outputs(tmp_path) == ["splat.ply", "splat.splat"]
    assert "exporting" in result.stdout + result.stderr  # the progress bar's line


def test_sharded_checkpoint_exports_the_same_bytes_piece_by_piece(sharded_run: Path, nerfstudio_ply: Path, tmp_path: Path):
    """Pieces of 1000 rows cross the written chunks (one per member, ~3700 rows each)."""
    export_cli("--load-config", str(sharded_run), "--output-dir", str(tmp_path), "--piece-rows", "1000")
    assert (tmp_path / "splat.ply").read_bytes() == nerfstudio_ply.read_bytes()


def test_ns_export_reads_a_sharded_checkpoint(sharded_run: Path, nerfstudio_ply: Path, tmp_path: Path):
    ns("ns-export", "gaussian-splat", "--load-config", str(sharded_run), "--output-dir", str(tmp_path))
    assert (tmp_path / "splat.ply").read_bytes() == nerfstudio_ply.read_bytes()


ROWS = 1000
"""Rows of the models below: with some dropped, the count in the header has one digit fewer."""


def model_with(sh_degree: int = 3, spec: str = "cpu:4", bad: bool = True):
    """A model of ROWS random Gaussians; with `bad`, some with a non-finite value in each property and
    some below nerfstudio's opacity threshold."""
    model = make_model(spec, sh_degree=sh_degree)
    g = torch.Generator().manual_seed(1)
    k = model.gauss_params["features_rest"].shape[1]
    values = {"means": torch.randn(ROWS, 3, generator=g), "scales": torch.randn(ROWS, 3, generator=g) * 0.5 - 3,
              "quats": torch.randn(ROWS, 4, generator=g), "features_dc": torch.randn(ROWS, 3, generator=g),
              "features_rest": torch.randn(ROWS, k, 3, generator=g) * 0.1, "opacities": torch.randn(ROWS, 1, generator=g) * 3}
    if bad:
        values["features_dc"][3, 1] = float("nan")
        values["opacities"][20, 0] = float("nan")
        values["scales"][30, 2] = float("-inf")
        values["quats"][40, 3] = float("nan")
        values["opacities"][50, 0] = -5.6  # transparent: below logit(1/255)
        values["opacities"][51, 0] = -5.5373  # at nerfstudio's threshold: kept
        if k:
            values["features_rest"][10, k - 1, 2] = float("inf")
    for name, value in values.items():
        model.gauss_params[name] = parameter(value, model.members)
    return model


def nerfstudio_export(model, out: Path, monkeypatch: pytest.MonkeyPatch, **options) -> Path:
    """nerfstudio's ExportGaussianSplat on `model` (its pipeline set-up replaced by the model)."""
    from nerfstudio.scripts import exporter

    monkeypatch.setattr(exporter, "eval_setup", lambda *args, **kwargs: (None, SimpleNamespace(model=model), None, None))
    exporter.ExportGaussianSplat(load_config=Path("config.yml"), output_dir=out, **options).main()
    return out / "splat.ply"


@pytest.mark.parametrize("sh_degree, color_mode, box", [(3, "sh_coeffs", False), (3, "rgb", False), (0, "sh_coeffs", False), (3, "sh_coeffs", True)],
                         ids=["sh3", "rgb", "sh0", "box"])
def test_rows_kept_are_nerfstudios(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sh_degree: int, color_mode: str, box: bool):
    model = model_with(sh_degree)
    obb = dict(obb_center=(0.2, 0.0, 0.0), obb_rotation=(0.0, 0.0, 0.5), obb_scale=(2.0, 2.5, 3.0)) if box else {}
    theirs = nerfstudio_export(model, tmp_path / "nerfstudio", monkeypatch, ply_color_mode=color_mode, **obb)
    crop = None
    if box:
        from nerfstudio.data.scene_box import OrientedBox

        crop = OrientedBox.from_params(obb["obb_center"], obb["obb_rotation"], obb["obb_scale"])
    (ours,) = export.export_model(model, tmp_path / "ours", ply_color_mode=color_mode, obb=crop, piece_rows=256)
    assert ours.read_bytes() == theirs.read_bytes()
    assert 0 < PlyData.read(str(ours))["vertex"].count < ROWS  # the header lost a digit: the rows were moved
    assert only_outputs(tmp_path / "ours") == ["splat.ply"]


def test_a_non_finite_position_drops_its_row_where_nerfstudio_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    model = model_with(bad=False)
    means = model.means.clone()
    means[5, 0] = float("nan")
    model.gauss_params["means"] = parameter(means, model.members)
    with pytest.raises(ValueError, match="not empty"):  # its filter drops every row for one position
        nerfstudio_export(model, tmp_path / "nerfstudio", monkeypatch)
    (ours,) = export.export_model(model, tmp_path / "ours")
    without = model_with(bad=False)
    for name in export.NAMES:
        rows = getattr(without, name)
        without.gauss_params[name] = parameter(torch.cat([rows[:5], rows[6:]]), without.members)
    assert ours.read_bytes() == nerfstudio_export(without, tmp_path / "nerfstudio", monkeypatch).read_bytes()


def kept_rows(model) -> torch.Tensor:
    finite = torch.ones(ROWS, dtype=torch.bool)
    for name in export.NAMES:
        finite &= torch.isfinite(getattr(model, name).reshape(ROWS, -1)).all(1)
    return finite & (model.opacities[:, 0] >= export.LOW_OPACITY)


@pytest.mark.parametrize("sort", [False, True], ids=["row order", "sorted"])
def test_splat_holds_the_model_values(tmp_path: Path, sort: bool):
    model = model_with()
    (path,) = export.export_model(model, tmp_path, formats=("splat",), sort=sort, piece_rows=256)
    assert path.name == "splat.splat" and only_outputs(tmp_path) == ["splat.splat"]
    records = np.fromfile(path, dtype=export.SPLAT)
    keep = kept_rows(model)
    assert len(records) == int(keep.sum()) == path.stat().st_size // 32
    rows = {model.means[i].numpy().tobytes(): i for i in torch.nonzero(keep)[:, 0].tolist()}
    order = [rows[p.tobytes()] for p in records["position"]]  # positions exact: each record finds its Gaussian
    assert sorted(order) == sorted(rows.values())
    scales, quats = model.scales[order].double(), model.quats[order].double()
    dc, opacity = model.features_dc[order].double(), model.opacities[order, 0].double()
    weight = torch.exp(scales.sum(1)) * torch.sigmoid(opacity)
    if sort:  # descending size x opacity
        assert (weight[1:] <= weight[:-1] * (1 + 1e-5)).all()
    else:
        assert order == sorted(order)
    assert np.allclose(records["scale"], torch.exp(scales).numpy(), rtol=1e-6)
    rgba = torch.cat([0.5 + export.SH_C0 * dc, torch.sigmoid(opacity)[:, None]], 1).clamp(0, 1).numpy() * 255
    assert np.abs(records["color"] - rgba).max() <= 1.0  # within 1/255
    rotation = (quats / quats.norm(dim=1, keepdim=True) * 128 + 128).clamp(0, 255).numpy()
    assert np.abs(records["rotation"] - rotation).max() <= 1.0


def test_a_failed_export_leaves_the_previous_files_and_no_partial_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    model = model_with()
    (ply,) = export.export_model(model, tmp_path)
    before = ply.read_bytes()
    original, calls = export.Converter.ply, []

    def fail_on_third_piece(self, piece):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return original(self, piece)

    monkeypatch.setattr(export.Converter, "ply", fail_on_third_piece)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_model(model_with(bad=False), tmp_path, formats=("ply", "splat"), piece_rows=256)
    assert ply.read_bytes() == before and only_outputs(tmp_path) == ["splat.ply"]


MEMORY = r"""
import json, resource, sys, tempfile
from pathlib import Path
import torch
from ms_splatfacto.backend.aggregate import members
from ms_splatfacto.backend.aggregate.layout import even_layout
from ms_splatfacto.backend.aggregate.storage import storage_for
from ms_splatfacto.backend.aggregate.tensor import wrap
from ms_splatfacto.export import export_gaussians, model_segments

rows = int(sys.argv[1])
layout, g = even_layout(rows, members("cpu:4")), torch.Generator().manual_seed(0)

def make(shape, scale=1.0, shift=0.0):  # filled in place: no full-size temporary raises the peak before the export
    whole, chunks = storage_for(layout).empty(layout, shape, torch.float32)
    whole.normal_(generator=g).mul_(scale).add_(shift)
    return wrap(layout, whole, chunks)

params = {"means": make((3,)), "scales": make((3,), 0.5, -4), "quats": make((4,)), "features_dc": make((3,)),
          "features_rest": make((15, 3), 0.1), "opacities": make((1,), 2.0)}
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = {"model_bytes": sum(p.numel() * p.element_size() for p in params.values()), "after_model": peak()}
with tempfile.TemporaryDirectory() as folder:
    for formats in (("ply",), ("ply", "splat")):
        paths = export_gaussians(model_segments(params), rows, 3, Path(folder), formats)
        out["after_" + "+".join(formats)] = peak()
        out["bytes_" + "+".join(formats)] = sum(p.stat().st_size for p in paths)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_a_2m_gaussian_model_exports_within_a_fixed_buffer():
    """Peak RSS growth (ru_maxrss, in a fresh process, after the model is built) of exporting a 2M-Gaussian
    model on cpu:4: the piece buffers for the PLY, plus the .splat's sort (12 bytes per Gaussian and its
    mapped unsorted records, 32 bytes per Gaussian); a second copy of the model (472 MB) would not fit."""
    rows = 2_000_000
    result = subprocess.run([sys.executable, "-c", MEMORY, str(rows)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    buffer = 128 << 20
    ply_growth = figures["after_ply"] - figures["after_model"]
    both_growth = figures["after_ply+splat"] - figures["after_model"]
    assert figures["bytes_ply"] > figures["model_bytes"]  # every row was written
    assert ply_growth < buffer, figures
    assert both_growth < buffer + 44 * rows < figures["model_bytes"], figures
