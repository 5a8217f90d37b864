"""dist-bn-verify (the dist_bn.verify package) and `dist-bn-launch verify`.

The pure parts (process-set layouts, batch sizes, judging, the table, usage
errors) run in this process; the command itself runs as one process, and as
2 ranks under `dist-bn-launch verify` with mpirun. The multi-rank exactness
cases themselves are tests/dist_bn/test_mpirun.py's (the same runner), and the
two-host run is tests/launch/test_cluster_netns.py's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dist_bn.verify import cases, cli, judge, world
from dist_bn.verify.cases import Case, UsageError
from dist_bn.verify.judge import Row
from paths import REPO

QUIET = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_NUM_INTEROP_THREADS="1", TF_NUM_INTRAOP_THREADS="1",
             PYTHONUNBUFFERED="1")


# --- process sets ------------------------------------------------------------------


@pytest.mark.parametrize("spec, size, groups", [
    ("0-7:8-15", 16, [list(range(8)), list(range(8, 16))]),
    ("0,2:1,3", 4, [[0, 2], [1, 3]]),
    ("0:1:2", 3, [[0], [1], [2]]),
    ("2,0-1", 3, [[0, 1, 2]]),
])
def test_parse_partition(spec, size, groups):
    assert world.parse_partition(spec, size) == groups


@pytest.mark.parametrize("spec, size, message", [
    ("0-2", 4, "missing [3]"),
    ("0-3:3", 4, "repeated or out of range [3]"),
    ("0-4", 4, "repeated or out of range [4]"),
    ("0-1:x", 2, "'x' is not a rank or a range"),
    ("3-1", 4, "range '3-1' is empty"),
])
def test_parse_partition_errors(spec, size, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        world.parse_partition(spec, size)


def test_node_partition_from_local_ranks():
    layout = [(0, 0, 2), (1, 1, 2), (2, 0, 3), (3, 1, 3), (4, 2, 3), (5, 0, 1)]
    assert world.node_partition(layout) == [[0, 1], [2, 3, 4], [5]]


def test_node_partition_needs_consecutive_ranks():
    by_node = [(0, 0, 2), (1, 0, 2), (2, 1, 2), (3, 1, 2)]  # mpirun -map-by node
    with pytest.raises(UsageError, match="ranks of each node to be consecutive, but rank 1 has local rank 0"):
        world.node_partition(by_node)


# --- data --------------------------------------------------------------------------------


def test_batch_sizes():
    assert cases.batch_sizes("uneven", 3) == [1, 3, 5]
    assert cases.batch_sizes("one_empty", 3) == [2, 3, 0]
    assert cases.batch_sizes("all_empty", 2) == [0, 0]
    assert sum(cases.batch_sizes("uneven", 128)) == 16 * 64  # linear in the world size
    assert len(set(cases.batch_sizes("uneven", 8))) == 8


def test_bfloat16_rounding_matches_tensorflow():
    import tensorflow as tf
    rng = np.random.RandomState(0)
    x = np.concatenate([rng.randn(1000) * 10 ** rng.uniform(-3, 4, 1000),
                        [1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 0.0, 65504.0]]).astype(np.float32)
    expected = tf.cast(tf.cast(x, tf.bfloat16), tf.float32).numpy()
    np.testing.assert_array_equal(cases.round_to_bfloat16(x), expected)


def test_global_batches_are_the_same_everywhere_and_exact_in_their_dtype():
    case = Case("c", (3, 4), -1, sizes="uneven", dtype="mixed_bfloat16")
    (a, _), (b, _) = cases.global_batches(case, 9), cases.global_batches(case, 9)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert all(np.array_equal(x, cases.round_to_bfloat16(x)) for x in a)
    half, _ = cases.global_batches(Case("h", (3,), -1, dtype="mixed_float16"), 4)
    assert half[0].dtype == np.float16


def test_scaled_error():
    assert judge.scaled_error([1.0, 2.0], [1.0, 2.5]) == pytest.approx(0.2)
    assert judge.scaled_error([0.1], [0.0]) == pytest.approx(0.1)  # below 1: absolute
    assert judge.scaled_error([], np.zeros(0)) == 0.0
    assert judge.scaled_error([np.nan], [1.0]) == float("inf")
    assert judge.scaled_error([1.0, 2.0], [1.0]) == float("inf")


def test_catalog_and_tolerances():
    chosen = cases.selected_cases(None, ["float32", "bfloat16"])
    names = [(c.name, c.dtype) for c in chosen]
    assert ("conv3d_ndhwc_offset_1e3", "float32") in names
    assert ("conv3d_ndhwc_offset_1e3", "mixed_bfloat16") not in names
    assert len(chosen) == 2 * len(cases.CATALOG) - 1
    assert cases.tolerances(Case("x", (1,), -1, offset=1e3)) is cases.OFFSET
    assert cases.tolerances(Case("x", (1,), -1, dtype="mixed_float16")) is cases.FLOAT16
    assert cases.keras_tolerances(Case("x", (1,), -1, offset=1e3)) is cases.KERAS_OFFSET
    assert cases.keras_tolerances(Case("x", (1,), -1)) is cases.FLOAT32
    with pytest.raises(UsageError, match="unknown case 'nope'"):
        cases.selected_cases(["nope"], ["float32"])


# --- judging and the table ----------------------------------------------------------------


def result(**errors):
    numbers = {k: 0.0 for k in ("y", "dx", "dgamma", "dbeta", "moving_mean", "moving_variance", "inference_y")}
    numbers.update(errors)
    return {"statistics": {"mean": 1e-8, "variance": 1e-8}, "vs_numpy": numbers, "count_exact": True,
            "moving_bitwise_equal_across_ranks": True, "inference_leaves_moving_unchanged": True,
            "output_dtype": "float32"}


def test_judge_passes_and_shows_the_error_closest_to_its_tolerance():
    row, failures = judge.judge_case("all", "float32", "c", [(0, result(y=2e-6)), (1, result(dx=5e-6))],
                                      cases.FLOAT32)
    assert failures == [] and row.passed
    assert (row.worst, row.error, row.tolerance) == ("dx r1", 5e-6, 1e-5)


def test_judge_fails_on_any_rank():
    row, failures = judge.judge_case("node", "float32", "c", [(0, result()), (1, result(dgamma=3e-5))],
                                      cases.FLOAT32)
    assert not row.passed and failures == ["rank 1 dgamma: 3e-05 > 1e-05"]


def test_judge_fails_on_a_broken_check():
    bad = result()
    bad["moving_bitwise_equal_across_ranks"] = False
    row, failures = judge.judge_case("all", "float32", "c", [(0, result()), (1, bad)], cases.FLOAT32)
    assert not row.passed and failures == ["rank 1: moving statistics differ between ranks of the set"]
    assert row.worst == failures[0]


def test_judge_scales_tolerances():
    row, _ = judge.judge_case("all", "float32", "c", [(0, result(y=2e-5))], cases.FLOAT32, scale=10)
    assert row.passed and row.tolerance == pytest.approx(1e-4)
    row, failures = judge.judge_case("all", "float32", "c", [(0, result(y=1e-9))], cases.FLOAT32, scale=0)
    assert not row.passed and failures


def test_judge_results_uses_each_case_s_tolerances_and_every_reference():
    from dist_bn.verify.judge import Result
    offset = Case("off", (3,), -1, offset=1e3)
    layer = dict(result(), case=offset.as_dict(), vs_keras={"y": 1e-3, "dx": 0.0})
    bad_stats = dict(layer, statistics={"mean": 2e-6, "variance": 0.0}, count_exact=False)
    keras_off = dict(layer, vs_keras={"y": 3e-3})
    mismatch_ok, mismatch_bad = {"error": "channel counts differ across ranks (...)"}, {"error": None}
    moments = {"vs_numpy": {"mean": 1e-7, "variance": 2e-6, "dx": 0.0}}
    everyone = [[Result("all", "float32", "off", layer), Result("all", "float32", "sync_moments", moments),
                 Result("all", "float32", "channel_mismatch", mismatch_ok)],
                [Result("all", "float32", "off", bad_stats), Result("all", "float32", "sync_moments", moments),
                 Result("all", "float32", "channel_mismatch", mismatch_bad)]]
    rows, failures = judge.judge_results(everyone)
    assert [row.passed for row in rows] == [False, False, False]
    assert failures == ["all float32 off: rank 1 mean: 2e-06 > 1e-06",
                        "all float32 off: rank 1: global count differs from the reference",
                        "all float32 sync_moments: rank 0 variance: 2e-06 > 1e-06",
                        "all float32 sync_moments: rank 1 variance: 2e-06 > 1e-06",
                        "all float32 channel_mismatch: rank 1: no clear error for mismatched channels"]
    rows, failures = judge.judge_results([[Result("all", "float32", "off", keras_off)]])
    assert failures == ["all float32 off: rank 0 y (vs Keras): 0.003 > 0.002"]  # KERAS_OFFSET's y


def test_nodes_from_local_ranks():
    layout = ((0, 0, 2), (1, 1, 2), (2, 0, 1))
    assert world.node_blocks(layout) == [[0, 1], [2]]
    assert world.World({}, layout).node_sizes == [2, 1]


def test_format_table():
    table = judge.format_table([Row("all", "float32", "dense", "y r0", 1.5e-7, 1e-5, True),
                                 Row("all", "float32", "channel_mismatch", "error on every rank", None, None, False)])
    lines = table.splitlines()
    assert lines[0].split() == ["set", "dtype", "case", "worst", "error", "tolerance", "result"]
    assert lines[1].split() == ["all", "float32", "dense", "y", "r0", "1.50e-07", "1e-05", "pass"]
    assert lines[2].split()[-3:] == ["-", "-", "FAIL"]


def test_hosts_line():
    assert judge.hosts_line(["a", "a", "b"]) == "hosts: a (ranks 0-1), b (rank 2)"
    assert judge.hosts_line([f"n{i}" for i in range(10)]).endswith("n7 (rank 7), ... 2 more")


def test_gloo_loopback_warning(monkeypatch):
    import socket
    monkeypatch.setenv("HOROVOD_GLOO_RENDEZVOUS_ADDR", "10.0.0.1")
    monkeypatch.setenv("HOROVOD_CROSS_SIZE", "2")
    monkeypatch.setattr(socket, "gethostname", lambda: "node7")
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")
    assert "'node7' resolves to 127.0.1.1" in world.gloo_loopback_warning()
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "10.0.0.7")
    assert world.gloo_loopback_warning() is None
    monkeypatch.setenv("HOROVOD_CROSS_SIZE", "1")  # one host: loopback is fine
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")
    assert world.gloo_loopback_warning() is None


# --- the command -------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--dtypes", "float64"], "--dtypes: unknown dtype 'float64'; use float32, float16 or bfloat16"),
    (["--cases", "nope"], "--cases: unknown case 'nope'"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--process-sets", "0:1"], "process set '0:1' must list every rank 0..2 exactly once"),
])
def test_usage_errors_exit_2_before_horovod_starts(monkeypatch, capsys, argv, message):
    monkeypatch.setenv("HOROVOD_SIZE", "3")
    monkeypatch.setenv("HOROVOD_RANK", "0")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"dist-bn-verify: error: {message}" + err.split(message, 1)[1] and err.count("\n") == 1


def test_usage_errors_are_printed_by_rank_0_only(monkeypatch, capsys):
    monkeypatch.setenv("HOROVOD_RANK", "1")
    assert cli.main(["--dtypes", "float64"]) == 2
    assert capsys.readouterr().err == ""


def test_list(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    for case in cases.CATALOG:
        assert case.name in out
    assert "conv3d_ndhwc_offset_1e3: sample (3, 4, 5, 6), axis -1, batches uneven, channel offsets 1000..6000" in out


def run_verify(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_bn.verify", *argv], capture_output=True, text=True,
                          env=QUIET, cwd=REPO, timeout=timeout)


@pytest.mark.e2e
def test_one_process_passes_and_writes_json(tmp_path):
    report = tmp_path / "verify.json"
    result = run_verify("--dtypes", "float32", "bfloat16", "--cases", "conv2d_nhwc_one_empty",
                        "conv3d_ndhwc_offset_1e3", "--json", str(report))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("dist-bn-verify: 1 ranks on 1 node(s) (1), Horovod 0.28.1")
    table = [line.split() for line in lines if line.startswith("all ")]
    assert [(r[1], r[2], r[-1]) for r in table] == [
        ("float32", "conv2d_nhwc_one_empty", "pass"), ("float32", "conv3d_ndhwc_offset_1e3", "pass"),
        ("bfloat16", "conv2d_nhwc_one_empty", "pass"), ("float32", "sync_moments", "pass")]
    assert lines[-1] == "4 passed, 0 failed"
    data = json.loads(report.read_text())
    assert data["world"] == 1
    (layout, dtype, name, first), *_ = data["ranks"][0]
    assert (layout, dtype, name) == ("all", "float32", "conv2d_nhwc_one_empty")
    assert first["batch_sizes"] == [0] and first["count_exact"] and set(first["statistics"]) == {"mean", "variance"}


@pytest.mark.e2e
def test_a_mismatch_exits_1_with_the_failures_listed():
    result = run_verify("--dtypes", "float32", "--cases", "conv3d_ndhwc_uneven", "--tolerance-scale", "0")
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert "all  float32  conv3d_ndhwc_uneven" in result.stdout and "FAIL" in result.stdout
    assert "0 passed, 2 failed" in result.stdout
    assert "  all float32 conv3d_ndhwc_uneven: rank 0 " in result.stdout


def test_dist_bn_launch_verify_dry_run_runs_verify_and_ignores_run_dir(tmp_path, capsys, monkeypatch):
    from launch.cli import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "checkpoint").write_text("x")  # would stop a training launch
    config = REPO / "configs" / "demo.yaml"
    assert main(["verify", str(config), "launcher.num_proc=4", "--dry-run", "--", "--dtypes", "float32"]) == 0
    command = capsys.readouterr().out.splitlines()[-1].split()
    assert command[command.index("-np") + 1] == "4"
    assert command[-4:] == ["-m", "dist_bn.verify", "--dtypes", "float32"]


def test_dist_bn_launch_verify_puts_verify_options_after_dashes(tmp_path, capsys):
    from launch.cli import main
    with pytest.raises(SystemExit) as info:
        main(["verify", str(REPO / "configs" / "demo.yaml"), "--process-sets", "node"])
    assert info.value.code == 2
    assert "options of dist-bn-verify go after --" in capsys.readouterr().err


@pytest.mark.mpirun
def test_dist_bn_launch_verify_two_ranks_with_mpirun():
    """Two ranks on this machine under the config's launcher settings (mpirun),
    with the world, per-node and explicit process sets and a half dtype."""
    argv = [sys.executable, "-m", "launch", "verify", "configs/demo.yaml", "launcher.backend=mpirun",
            "launcher.controller=mpi", "--", "--process-sets", "all", "node", "0:1", "--dtypes", "float32",
            "bfloat16", "--cases", "conv2d_nhwc_one_empty", "conv3d_ncdhw_uneven"]
    result = subprocess.run(argv, capture_output=True, text=True, env=QUIET, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    assert "dist-bn-verify: 2 ranks on 1 node(s) (2), Horovod 0.28.1 (mpi controller" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["all"], ["node"], ["0:1"])]
    assert {(r[0], r[1]) for r in rows if r[2] != "sync_moments" and r[2] != "channel_mismatch"} == {
        (layout, dtype) for layout in ("all", "node", "0:1") for dtype in ("float32", "bfloat16")}
    assert all(r[-1] == "pass" for r in rows)
    assert any(r[2] == "channel_mismatch" for r in rows)
    assert "14 passed, 0 failed" in out
