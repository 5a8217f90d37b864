"""dist-bn-bench runs end to end under mpirun and reports every section.

Only that it runs and what it reports are tested here; its numbers are
measurements, read by people, never asserted.
"""
import json
import os
import sys

import pytest

from dist_bn.open_mpi_waits import LOCAL_SIZE_VARIABLE, VARIABLE, wants_yield_here
from mpirun_helpers import mpirun_argv, run_ranks
from paths import REPO


@pytest.mark.mpirun
def test_bench_reports_every_section(tmp_path):
    out = tmp_path / "bench.json"
    result = run_ranks(mpirun_argv(2, "-m", "dist_bn.bench.cli", "--steps", "2", "--warmup", "1",
                                   "--shapes", "1x2x8x8x8", "--deep-blocks", "1", "--deep-channels", "4",
                                   "--deep-shape", "1x2x4x4", "--config", str(REPO / "configs" / "demo.yaml"),
                                   "--json", str(out), "data.frames=4", "data.height=16", "data.width=16",
                                   "model.width=4", "model.depth=2"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["controller"] == "mpi"
    # mpirun_argv does not bind the ranks: each may use this process's cores
    crowded = VARIABLE not in os.environ and wants_yield_here({LOCAL_SIZE_VARIABLE: "2"})
    assert report["open_mpi_yield_when_idle"] == ("1" if crowded else os.environ.get(VARIABLE))
    variants = {row["variant"] for row in report["layer"]}
    assert variants == {"tf fused kernel (local)", "keras BatchNormalization (local)",
                        "dist_bn SyncBatchNormalization", "horovod SyncBatchNormalization"}
    assert all(row["ms"] > 0 for row in report["layer"] if "ms" in row)
    assert report["collective"][0]["mpi4py_Allreduce_ms"] > 0
    assert report["model"]["sync_ms"] > 0 and report["memory"]["sync_peak_bytes"] > 0
    deep = report["deep"]
    assert deep["bn_layers"] == 3 and deep["transport"] == "mpi"
    assert {row["variant"] for row in deep["steps"]} == {
        "keras BatchNormalization (local)", "dist_bn SyncBatchNormalization",
        "dist_bn SyncBatchNormalization, mpi4py transport",
        "dist_bn SyncBatchNormalization, horovod transport", "tf-keras BatchNormalization (local)",
        "horovod SyncBatchNormalization (tf-keras)"}
    assert all(row["ms"] > 0 for row in deep["steps"])
    assert set(deep["collective_latency_us"]) == {
        "dist_bn allreduce_sum (mpi transport)", "dist_bn allreduce_sum (mpi4py transport)",
        "dist_bn allreduce_sum (horovod transport)",
        "bare hvd.allreduce", "raw mpi4py Allreduce"}
    assert "x local BN" in result.stdout
    assert "sync/local" in result.stdout


@pytest.mark.e2e
def test_bench_refuses_to_overwrite_results(tmp_path):
    out = tmp_path / "bench.json"
    out.write_text("{}")
    result = run_ranks([sys.executable, "-m", "dist_bn.bench.cli", "--json", str(out)])
    assert result.returncode != 0 and "exists" in result.stderr
    assert out.read_text() == "{}"


def test_command_line_names_every_section_in_run_order():
    from dist_bn.bench import cli, sections

    assert tuple(sections.SECTIONS) == cli.SECTION_NAMES
