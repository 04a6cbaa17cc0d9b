"""The thread count a run chooses never exceeds the cores the process may run on, and the ranks of one
machine share those cores."""

from __future__ import annotations

import os

import pytest
import torch

from ms_splatfacto.backend.aggregate.local_ranks import run_local_ranks
from ms_splatfacto.backend.threads import available_cores, choose_threads, configure_threads


@pytest.mark.parametrize(
    "cores, env, requested, expected",
    [
        (16, {}, None, 16),
        (16, {"LOCAL_WORLD_SIZE": "4"}, None, 4),
        (2, {"LOCAL_WORLD_SIZE": "4"}, None, 1),  # more ranks than cores: one thread each
        (16, {"OMP_NUM_THREADS": "3"}, None, 3),
        (2, {"OMP_NUM_THREADS": "64"}, None, 2),  # asking for more than the cores gets the cores
        (8, {"LOCAL_WORLD_SIZE": "2"}, 16, 4),
        (8, {}, 5, 5),
    ],
)
def test_choose_threads(cores, env, requested, expected):
    assert choose_threads(cores, env, requested) == expected


def test_one_process_uses_at_most_its_cores():
    before = torch.get_num_threads()
    try:
        threads = configure_threads(1024)
        assert threads == torch.get_num_threads() <= len(os.sched_getaffinity(0)) == available_cores()
    finally:
        torch.set_num_threads(before)


def _rank_threads():
    assert os.environ["LOCAL_WORLD_SIZE"] == "3"  # set as torchrun sets it for three ranks on this machine
    os.environ.pop("OMP_NUM_THREADS", None)  # no explicit cap: the share alone decides
    threads = configure_threads()
    return threads, torch.get_num_threads(), len(os.sched_getaffinity(0))


def test_each_rank_of_one_machine_gets_its_share(tmp_path):
    results = run_local_ranks(3, _rank_threads, tmp=tmp_path)
    for threads, torch_threads, cores in results:
        assert threads == torch_threads == max(1, cores // 3)
        assert 3 * threads <= max(3, cores)


def _policy_in_child(code: str, env_policy=None):
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_policy is not None:
        env["OMP_WAIT_POLICY"] = env_policy
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


CHILD = ("import os, ms_splatfacto; from ms_splatfacto.backend.threads import wait_policy_note; "
         "print(os.environ['OMP_WAIT_POLICY'], ms_splatfacto.WAIT_POLICY_APPLIED, wait_policy_note(2) is not None, wait_policy_note(1) is None)")


def test_openmp_threads_wait_passively_when_the_package_loads_first():
    assert _policy_in_child(CHILD) == ["PASSIVE", "True", "False", "True"]


def test_an_explicit_wait_policy_is_kept():
    assert _policy_in_child(CHILD, "ACTIVE") == ["ACTIVE", "True", "False", "True"]


def test_a_runtime_started_before_the_package_gets_a_hint():
    """As under ns-train, which imports torch first: too late to set; several threads get the one-line hint."""
    assert _policy_in_child("import torch; " + CHILD) == ["PASSIVE", "False", "True", "True"]


def test_ns_train_restarts_once_with_passive_waits_where_several_threads_would_spin():
    """`ns-train ms-splatfacto` loads torch before the package: it restarts itself (the same command) with
    OMP_WAIT_POLICY=PASSIVE, once, unless one thread runs (or the user set the policy)."""
    import subprocess

    from tests.conftest import BIN

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    for extra, restarts in (((), available_cores() > 1), (("--cpu-threads", "1"), False)):
        out = subprocess.run([str(BIN / "ns-train"), "ms-splatfacto", *extra, "--help"], capture_output=True, text=True,
                             env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.count("usage: ") == 1, out.stdout[:2000]
        assert out.stdout.count("restarting with OMP_WAIT_POLICY=PASSIVE") == int(restarts), out.stdout[:2000]
