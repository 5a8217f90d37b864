"""Open MPI yields the core while waiting where a rank has fewer cores than busy threads.

The rule is pure (`local_ranks`, `wants_yield`); under mpirun, Open MPI's own
value is read back through the MPI tool interface, for dist_bn imported before
and after hvd.init() and for a user who set the variable.
"""
import json
import os
import subprocess
import sys

import pytest

from dist_bn import open_mpi_waits
from dist_bn.open_mpi_waits import VARIABLE, local_ranks, wants_yield
from mpirun_helpers import mpirun_argv, run_ranks
from paths import CASES, REPO

SCRIPT = str(CASES / "open_mpi_waits_cases.py")
LOCAL = open_mpi_waits.LOCAL_SIZE_VARIABLE


@pytest.mark.parametrize("environ, affinity, node, want", [
    ({LOCAL: "2"}, 2, 2, True),            # this machine kind: 2 ranks, 2 cores, unbound
    ({LOCAL: "8"}, 16, 16, False),         # a GPU node: 2 cores per rank
    ({LOCAL: "8"}, 1, 16, True),           # the same, each rank bound to one core
    ({LOCAL: "1"}, 1, 1, True),            # one rank on one core: Horovod's thread shares it
    ({LOCAL: "2", VARIABLE: "0"}, 2, 2, False),  # the user's setting wins
    ({}, 2, 2, False),                     # not started by Open MPI's mpirun
    ({LOCAL: "n/a"}, 2, 2, False),
])
def test_rule(environ, affinity, node, want):
    assert wants_yield(local_ranks(environ), affinity, node) is want


def test_sets_the_variable_only_when_wanted():
    crowded = {LOCAL: str(10 * (os.cpu_count() or 1))}
    assert open_mpi_waits.prefer_yielding_waits(crowded) is True
    assert crowded[VARIABLE] == "1"
    mine = {LOCAL: crowded[LOCAL], VARIABLE: "0"}
    assert open_mpi_waits.prefer_yielding_waits(mine) is False and mine[VARIABLE] == "0"
    assert open_mpi_waits.prefer_yielding_waits({}) is False


@pytest.mark.parametrize("cpu_max, want", [
    ("max 100000\n", "all"), ("150000 100000\n", 1.5), ("", "all"), (None, "all")])
def test_node_cores_follow_a_container_quota(cpu_max, want, tmp_path):
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    cores = os.cpu_count() or 1
    assert open_mpi_waits.node_cores(str(path)) == (cores if want == "all" else min(cores, want))


def _expected_on_this_machine(ranks):
    """What the rule says for `ranks` unbound ranks here (mpirun_argv: -bind-to none)."""
    return open_mpi_waits.wants_yield_here({LOCAL: str(ranks)})


@pytest.mark.mpirun
@pytest.mark.parametrize("order, user_value", [("before", None), ("after", None), ("before", "0")])
def test_open_mpi_takes_it(order, user_value, tmp_path):
    argv = mpirun_argv(2, SCRIPT, order, str(tmp_path))
    if user_value is not None:
        argv[1:1] = ["-x", f"{VARIABLE}={user_value}"]
    env_before = os.environ.pop(VARIABLE, None)  # the test's own environment must not decide
    try:
        result = run_ranks(argv)
    finally:
        if env_before is not None:
            os.environ[VARIABLE] = env_before
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    crowded = _expected_on_this_machine(2)
    for report in reports:
        if user_value is not None:
            assert report["variable"] == user_value and report["open_mpi_yields"] is False
            assert report["warnings"] == []
        elif order == "before":
            assert report["open_mpi_yields"] is crowded
            assert report["variable"] == ("1" if crowded else None)
            assert report["warnings"] == []
        else:  # too late for MPI: it does not yield, and the rank is told how to fix it
            assert report["open_mpi_yields"] is False
            assert len(report["warnings"]) == (1 if crowded else 0)
            if crowded:
                assert "Import dist_bn before hvd.init()" in report["warnings"][0]


def test_importing_dist_bn_is_enough_for_a_plain_script(tmp_path):
    """No launcher: a rank's environment as Open MPI's mpirun leaves it, then `import dist_bn`."""
    env = {k: v for k, v in os.environ.items() if k != VARIABLE}
    env[LOCAL] = str(10 * (os.cpu_count() or 1))
    code = "import os, dist_bn; print(os.environ.get(%r))" % VARIABLE
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "1"
