"""The MPI transport pairs collectives correctly, and faults end the job.

Ordering: two pathways whose BN layers have the same channel count, trained
under mpirun with 4 inter-op threads, equal one process with Keras's layer on
the concatenated batch (tests/mpirun/ordering_cases.py).

Faults, injected for real (tests/mpirun/fault_cases.py): a rank running a
layer with training=False, a rank skipping a layer call, a rank stopped with
SIGSTOP (once while the others wait in a dist_bn collective, once while they
wait in a Horovod one). Each must end the job with a non-zero status and one
line naming the layer and/or the ranks, in bounded time: mis-pairs at once, a
stopped rank after DIST_BN_COLLECTIVE_TIMEOUT_S (10 s here, 60 s by default).
"""
import json
import re
import time

import pytest

from mpirun_helpers import mpirun_argv, run_ranks
from paths import CASES

pytestmark = pytest.mark.mpirun

ORDERING_SCRIPT = str(CASES / "ordering_cases.py")
TRANSPORT_SCRIPT = str(CASES / "transport_cases.py")
FAULT_SCRIPT = str(CASES / "fault_cases.py")
TIMEOUT_S = 10


@pytest.mark.parametrize("np", [2, 3])
def test_parallel_pathways_pair_by_layer(np, tmp_path):
    result = run_ranks(mpirun_argv(np, ORDERING_SCRIPT, str(tmp_path)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(np)]
    for rank, report in enumerate(reports):
        # The compiled kernel's path, and nothing else, paired the collectives.
        assert report["transport"] == "mpi" and report["paths"] == ["kernel"], report
        assert report["inter_op_threads"] == 4
        worst = max(report["errors"].values())
        assert worst <= 1e-5, f"rank {rank}: {report['errors']}"
        assert any(name.startswith("b_bn") for name in report["errors"])


def test_every_transport_sums_exactly_and_the_kernel_is_the_default(tmp_path):
    report_path = tmp_path / "report.json"
    result = run_ranks(mpirun_argv(3, TRANSPORT_SCRIPT, str(report_path)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["default"] == "mpi"
    assert len(report["errors"]) == 3 * 3 * 2 * 2
    # float64 sums of 3 values in another order may differ in the last bit.
    assert all(error <= 1e-14 for key, error in report["errors"].items() if "float64" in key), report
    assert all(error <= 1e-6 for error in report["errors"].values()), report
    assert report["without_kernel"] == "mpi4py"
    assert report["forced_without_kernel"].startswith(
        "DIST_BN_TRANSPORT=mpi, but the kernel is switched off by this test;")


def _run_fault(fault):
    argv = mpirun_argv(2, FAULT_SCRIPT, fault)
    argv[1:1] = ["-x", f"DIST_BN_COLLECTIVE_TIMEOUT_S={TIMEOUT_S}"]
    started = time.monotonic()
    result = run_ranks(argv)
    return result, time.monotonic() - started


def _dist_bn_lines(result):
    return [line.strip() for line in (result.stdout + result.stderr).splitlines()
            if line.strip().startswith("dist_bn:")]


def test_training_flag_mismatch_is_detected_on_every_rank():
    result, _ = _run_fault("training_mismatch")
    assert result.returncode != 0
    lines = set(_dist_bn_lines(result))
    assert len(lines) == 1, lines
    line = lines.pop()
    assert "mis-paired collective" in line
    assert "rank 0: 'dist_bn/bn_a/moments'" in line and "rank 1: 'dist_bn/bn_b/moments'" in line
    assert "rank 0 step 2" not in result.stdout  # the mis-paired step never completed


def test_skipped_layer_call_is_detected():
    result, _ = _run_fault("skip_call")
    assert result.returncode != 0
    lines = _dist_bn_lines(result)
    assert lines and all("mis-paired collective" in line for line in lines)
    assert any("rank 0: 'dist_bn/bn_c/moments'" in line for line in lines)
    assert "rank 0 step 2" not in result.stdout


def test_unequal_payload_lengths_fail_at_once_on_every_rank():
    # MPI leaves an all-reduce of unequal counts undefined (Open MPI truncates,
    # hangs or crashes): the kernel's fixed-size header catches it first.
    result, _ = _run_fault("length_mismatch")
    assert result.returncode != 0
    lines = set(_dist_bn_lines(result))
    assert lines == {"dist_bn: mis-paired collective in the global process set (payload lengths "
                     "differ: channel counts?): rank 0: 'probe/moments' (#12, 9 values), rank 1: "
                     "'probe/moments' (#12, 11 values). Every rank of a process set must call the "
                     "same SyncBatchNormalization layers in the same order with the same training "
                     "flag."}, lines
    # Caught by the header (the watchdog's line would say "waited"), before the step.
    assert "rank 0 step 2" not in result.stdout and "rank 1 step 2" not in result.stdout


def test_stopped_rank_ends_the_job_after_the_timeout():
    result, elapsed = _run_fault("stop")
    assert result.returncode != 0
    lines = _dist_bn_lines(result)
    assert len(lines) == 1, lines
    # The collective's watchdog or the heartbeat, whichever looks first: both name rank 1 and the layer.
    assert "'dist_bn/bn_a/moments'" in lines[0] and ("ranks [1] did not join" in lines[0]
                                                       or "rank 1 has not been heard from" in lines[0])
    assert "rank 0 step 1" in result.stdout and "rank 0 step 2" not in result.stdout
    assert elapsed >= TIMEOUT_S


def test_stopped_rank_ends_the_job_while_others_wait_in_horovod():
    result, elapsed = _run_fault("stop_in_horovod")
    assert result.returncode != 0
    lines = _dist_bn_lines(result)
    assert len(lines) == 1 and re.fullmatch(
        r"dist_bn: rank 1 has not been heard from for \d+ s \(stopped or frozen\); ending the job\. "
        r"DIST_BN_COLLECTIVE_TIMEOUT_S sets the wait\.", lines[0]), lines
    assert "rank 1 step 2" in result.stdout and "rank 0 step 3" not in result.stdout
    assert elapsed >= TIMEOUT_S
