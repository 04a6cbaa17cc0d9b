"""`benchmarks/run.py --tiny` (the benchmark at the test suite's size) writes every figure, finite and consistent."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SECTIONS = ("meta", "step", "reference", "memory", "exchange", "simulation", "largest", "gpu", "ranks")
PLOTS = ("run_step_time.png", "run_exchange_simulation.png", "run_exchange_order.png", "run_memory.png", "run_ranks_step_time.png")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, lund_tiny: Path) -> dict:
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--tiny", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for plot in PLOTS:
        assert (out / plot).stat().st_size > 1000, plot
    return json.loads((out / "run.json").read_text())


def finite_numbers(obj) -> list:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in finite_numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in finite_numbers(v)]
    return [obj] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


def test_every_figure_is_present_and_finite(results: dict):
    assert set(SECTIONS) <= set(results)
    for section in ("step", "reference", "memory", "exchange", "simulation", "ranks"):
        assert results[section], section
        assert all(math.isfinite(x) for x in finite_numbers(results[section])), section
    for r in results["step"]:
        phases = [r[k] for k in ("forward", "loss", "backward", "adam", "stats")]
        assert all(t > 0 for t in phases) and r["total"] == pytest.approx(sum(phases), rel=1e-6)
        assert r["n_isects"] > 0 and r["evals_per_s_forward"] > 0
    assert [r["ratio_to_1_member"] for r in results["step"] if r["members"] == 1] == [1.0]
    assert all(r["reference_s"] > 0 and r["cpu_s"] > 0 for r in results["reference"])
    assert "skipped" in results["largest"] and ("skipped" in results["gpu"] or "cuda" in results["gpu"])


def test_exchange_is_zero_on_one_member_and_matches_the_grendel_remote_count(results: dict):
    for r in results["exchange"] + results["step"]:
        if r["members"] == 1:
            assert sum(r["exchange"].values()) == 0
        else:
            assert r["exchange"]["remote_read"] > 0 and r["exchange"]["other"] > 0
            # the same (record, reader) pairs: Grendel's remote count sends each record and its gradient
            assert r["grendel"]["remote_bytes"] == 2 * r["exchange"]["remote_read"]
            assert r["grendel"]["all_pairs_bytes"] >= r["grendel"]["remote_bytes"]
    sim = {r["members"]: r for r in results["simulation"] if "case" not in r}
    assert sim[1]["total"] == 0 and sim[16]["remote_read"] > 0
    few = next(r for r in results["simulation"] if r.get("case") == "few rows per member")
    assert few["rows_min"] >= 1 and few["rows_max"] <= 3 and few["remote_read"] > 0


def test_memory_per_gaussian_is_at_least_the_arithmetic_minimum(results: dict):
    for r in results["memory"]:
        assert r["arithmetic_minimum"] == 944
        assert r["live_bytes_per_gaussian"] >= 944 and r["default_malloc_bytes_per_gaussian"] >= r["live_bytes_per_gaussian"] * 0.95
        assert r["planner_bytes_per_gaussian"] >= 944


def test_ranks_section_counts_what_went_to_torch_distributed(results: dict):
    for r in results["ranks"]:
        assert r["ranks_step_s"]["min"] <= r["ranks_step_s"]["median"] <= r["ranks_step_s"]["max"]
        counted, wire = r["ranks_bytes_counted"], r["ranks_bytes_wire"]
        assert counted["remote_read"] > 0 and counted["reduce_scatter"] > 0
        # one member per rank: every byte the exchange counts crosses a process boundary
        assert all(counted[k] == wire.get(k, 0) for k in counted), (counted, wire)
