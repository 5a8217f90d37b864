"""dist_bn.training.rundir and the worker's own checks (`python -m dist_bn.training`).

The worker enforces the run-directory policy itself, since it can be started
without the launcher (plain mpirun); the CLI cases below start it directly as
one process, the way such a start would look on one rank.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_bn.training.rundir import (RunDirError, aside_name, load_saved_config, prepare_run_dir,
                                     resume_conflicts, save_config)
from launch.config import load_config

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120
NOW = time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1))


def earlier_run(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.json").write_text("{}")
    return path


def test_creates_a_missing_directory(tmp_path):
    target = tmp_path / "a" / "b"
    assert prepare_run_dir(target, resume=False, overwrite=False) is None
    assert target.is_dir()


def test_uses_an_empty_directory(tmp_path):
    assert prepare_run_dir(tmp_path, resume=False, overwrite=False) is None


def test_refuses_an_earlier_run(tmp_path):
    run = earlier_run(tmp_path / "run")
    with pytest.raises(RunDirError, match="run.resume=true.*run.overwrite=true"):
        prepare_run_dir(run, resume=False, overwrite=False)
    assert (run / "metrics.json").exists()


def test_resume_keeps_the_directory(tmp_path):
    run = earlier_run(tmp_path / "run")
    assert prepare_run_dir(run, resume=True, overwrite=False) is None
    assert (run / "metrics.json").exists()


def test_overwrite_moves_the_earlier_run_aside(tmp_path):
    run = earlier_run(tmp_path / "run")
    moved = prepare_run_dir(run, resume=False, overwrite=True, now=NOW)
    assert moved == tmp_path / "run.old-20260102-030405"
    assert (moved / "metrics.json").read_text() == "{}"  # nothing lost
    assert run.is_dir() and not any(run.iterdir())


def test_overwrite_never_reuses_an_aside_name(tmp_path):
    run = earlier_run(tmp_path / "run")
    first = prepare_run_dir(run, resume=False, overwrite=True, now=NOW)
    (run / "metrics.json").write_text("second")
    second = prepare_run_dir(run, resume=False, overwrite=True, now=NOW)
    assert second == tmp_path / "run.old-20260102-030405-2"
    assert (first / "metrics.json").read_text() == "{}" and (second / "metrics.json").read_text() == "second"
    assert aside_name(run, NOW) == tmp_path / "run.old-20260102-030405-3"


def test_overwrite_of_an_empty_or_missing_directory_moves_nothing(tmp_path):
    assert prepare_run_dir(tmp_path / "new", resume=False, overwrite=True) is None
    assert prepare_run_dir(tmp_path / "new", resume=False, overwrite=True) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]


def test_refuses_a_file_and_resume_with_overwrite(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="not a directory"):
        prepare_run_dir(tmp_path / "file", resume=True, overwrite=False)
    with pytest.raises(RunDirError, match="pick one"):
        prepare_run_dir(tmp_path / "x", resume=True, overwrite=True)


def test_saved_config_round_trip_and_resume_conflicts(tmp_path):
    (tmp_path / "c.yaml").write_text("model: {width: 4}\n")
    config = load_config(tmp_path / "c.yaml")
    save_config(tmp_path, config)
    saved = load_saved_config(tmp_path)
    assert saved == config
    assert load_saved_config(tmp_path / "nothing") is None
    changed = load_config(tmp_path / "c.yaml", ["train.epochs=9", "model.width=8", "data.seed=2"])
    assert resume_conflicts(saved, changed) == ["model.width: 4 -> 8", "data.seed: 0 -> 2"]
    assert resume_conflicts(None, changed) == []


# --- the worker's command line ------------------------------------------------

def worker(*args, cwd):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_NUM_INTEROP_THREADS="1", TF_NUM_INTRAOP_THREADS="1")
    for name in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "dist_bn.training", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("dist_bn.training: ")]


def test_worker_config_error_is_one_line_exit_2(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  batch_sise: 4\n")
    proc = worker(tmp_path / "bad.yaml", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("dist_bn.training: error: ")
    assert "train.batch_sise: unknown key (did you mean train.batch_size?)" in lines[0]
    assert "Traceback" not in proc.stderr


def test_worker_refuses_an_earlier_run_itself(tmp_path):
    """Without the launcher's pre-check (e.g. plain mpirun) the job still refuses."""
    run = earlier_run(tmp_path / "run")
    (tmp_path / "c.yaml").write_text(f"run: {{dir: {run}}}\n")
    proc = worker(tmp_path / "c.yaml", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1 and "already exists and is not empty" in lines[0], proc.stderr
    assert sorted(p.name for p in run.iterdir()) == ["metrics.json"]
