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

from dist_bn import rank_env
from dist_bn.training.rundir import (MARKER_FILE, RunDirError, aside_name, load_saved_config, prepare_run_dir,
                                     resume_conflicts, save_config)
from dist_bn.training.schema import load_config

TIMEOUT_S = 120
NOW = time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1))


def earlier_run(path: Path) -> Path:
    """A directory as the job leaves it: its marker and some output."""
    path.mkdir(parents=True)
    prepare_run_dir(path, resume=False, overwrite=False)
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
    assert sorted(p.name for p in run.iterdir()) == [MARKER_FILE]  # a fresh run directory


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


@pytest.mark.parametrize("resume, overwrite", [(True, False), (False, True)])
def test_a_directory_the_job_did_not_make_is_never_continued_or_renamed(tmp_path, resume, overwrite):
    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("mine: 1\n")
    with pytest.raises(RunDirError, match="has no .dist_bn-run marker"):
        prepare_run_dir(foreign, resume=resume, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]
    assert sorted(p.name for p in foreign.iterdir()) == ["config.yaml"]


def test_system_directories_are_refused_through_symlinks(tmp_path):
    (tmp_path / "link").symlink_to("/etc")
    for resume, overwrite in ((True, False), (False, True), (False, False)):
        with pytest.raises(RunDirError, match="/etc is in the system directory /etc"):
            prepare_run_dir(tmp_path / "link", resume=resume, overwrite=overwrite)
    with pytest.raises(RunDirError, match="is the home directory"):
        prepare_run_dir(os.path.expanduser("~"), resume=True, overwrite=False)
    assert (tmp_path / "link").resolve() == Path("/etc") and not Path("/etc", MARKER_FILE).exists()


def test_a_symlinked_run_dir_is_used_where_it_points(tmp_path):
    real = earlier_run(tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    moved = prepare_run_dir(tmp_path / "link", resume=False, overwrite=True, now=NOW)
    assert moved == tmp_path / "real.old-20260102-030405" and (moved / "metrics.json").exists()
    assert (tmp_path / "link").is_symlink() and (real / MARKER_FILE).exists()


def test_a_run_from_before_markers_is_recognized_by_its_config(tmp_path):
    (tmp_path / "c.yaml").write_text("")
    old = tmp_path / "old"
    old.mkdir()
    save_config(old, load_config(tmp_path / "c.yaml"))
    assert prepare_run_dir(old, resume=True, overwrite=False) is None
    assert (old / MARKER_FILE).exists()


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"model: [unclosed\n", b"- a list\n"])
def test_an_unreadable_saved_config_is_one_line(tmp_path, content):
    (tmp_path / "config.yaml").write_bytes(content)
    with pytest.raises(RunDirError) as info:
        load_saved_config(tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path / "config.yaml") in str(info.value)


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
    for name in rank_env.RANK_VARIABLES:
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
    assert sorted(p.name for p in run.iterdir()) == [MARKER_FILE, "metrics.json"]
