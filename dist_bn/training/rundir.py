"""The run directory: what rank 0 does with run.dir before training starts.

The policy's checks (`launch.run_dir_policy`, re-exported here) are the
launcher's too (`launch.preflight.check_run_dir`); they are applied again
here because the job can be started without the launcher (plain
mpirun) and because the directory can change between the launcher's check
and the job's start:

  missing or empty       created and used
  non-empty, neither     refused: it holds an earlier run
  run.resume: true       used as is; training continues from its checkpoint
  run.overwrite: true    the earlier run is not deleted: the directory is
                         renamed to `<dir>.old-<YYYYmmdd-HHMMSS>` (with a
                         `-N` suffix if that name is taken) and a fresh one
                         is created; the new name is printed

Renaming is cheap, cannot lose data, and is easy to undo; deleting old runs
is left to the user. The resolved config is saved as `config.yaml` in the
directory, and a resumed run must keep the saved run's model and data
settings (its checkpoint would not fit another model, and other data would
make the continued run a different experiment).

Only directories this job made are continued or renamed: rank 0 writes a
marker file (`.dist_bn-run`) into every run directory it creates or uses,
and a non-empty directory without it (a home directory, a source tree,
/etc) is refused whatever the flags say. The path is resolved (symlinks
followed) before any check, and `/`, the home directory and system
directories are refused even when empty. The checks are pure functions
(`resolve_run_dir`, `location_problem`, `run_dir_problem`) so that the
launcher's dry run and any training loop apply the same policy; everything
is checked before anything is written or renamed.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

import yaml

# The checks themselves are shared with the launcher's preflight, which must
# not import TensorFlow (and so this package): see launch.run_dir_policy.
from launch.run_dir_policy import (CONFIG_FILE, CONFIG_HEADER, MARKER_FILE, holds_files, is_run_dir,
                                   location_problem, resolve_run_dir, run_dir_problem)

__all__ = ["CONFIG_FILE", "MARKER_FILE", "RunDirError", "aside_name", "holds_files", "is_run_dir",
           "load_saved_config", "location_problem", "prepare_run_dir", "resolve_run_dir", "resume_conflicts",
           "run_dir_problem", "save_config", "write_marker"]

# Sections a resumed run may not change (see the module docstring).
FROZEN_SECTIONS = ("model", "data")


class RunDirError(Exception):
    """The run directory cannot be used as asked; the message says why and what to do."""


def aside_name(path: Path, now: float | None = None) -> Path:
    """A free name `<path>.old-<timestamp>[-N]` next to `path`."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    candidate = path.with_name(f"{path.name}.old-{stamp}")
    n = 2
    while candidate.exists() or candidate.is_symlink():
        candidate = path.with_name(f"{path.name}.old-{stamp}-{n}")
        n += 1
    return candidate


def write_marker(path: Path) -> None:
    """Mark `path` as a run directory of this job (kept if already there)."""
    marker = path / MARKER_FILE
    if not marker.exists():
        marker.write_text(json.dumps({"written_by": "dist_bn.training", "created": time.strftime(
            "%Y-%m-%dT%H:%M:%S%z")}) + "\n", encoding="utf-8")


def prepare_run_dir(run_dir: str | os.PathLike, resume: bool, overwrite: bool,
                    now: float | None = None) -> Path | None:
    """Apply the run-directory policy to `run_dir` and make sure it exists,
    with its marker. Everything is checked before anything is written or
    renamed.

    Returns where an earlier run was moved to (run.overwrite), else None.
    Raises RunDirError when the directory cannot be used.
    """
    path = resolve_run_dir(run_dir)
    problem = run_dir_problem(path, resume, overwrite)
    if problem:
        raise RunDirError(problem)
    moved_to = None
    if overwrite and holds_files(path):
        moved_to = aside_name(path, now)
        path.rename(moved_to)
    path.mkdir(parents=True, exist_ok=True)
    write_marker(path)
    return moved_to


def save_config(run_dir: str | os.PathLike, config: Mapping[str, Any]) -> Path:
    """Write the resolved config (every key, defaults filled in) to run_dir/config.yaml."""
    target = Path(run_dir) / CONFIG_FILE
    header = CONFIG_HEADER + "# Rerun it with: dist-bn-launch THIS_FILE run.dir=NEW_DIR\n"
    tmp = target.with_suffix(".yaml.tmp")
    try:
        tmp.write_text(header + yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")
        tmp.replace(target)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return target


def load_saved_config(run_dir: str | os.PathLike) -> dict | None:
    """The config.yaml saved in run_dir, or None if there is none. Raises
    RunDirError (one line) if it is unreadable: a resumed run checks it."""
    target = Path(run_dir) / CONFIG_FILE
    if not target.is_file():
        return None
    try:
        saved = yaml.safe_load(target.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        problem = " ".join(str(getattr(err, "strerror", None) or err).split())[:200]
        raise RunDirError(f"{target} is unreadable ({type(err).__name__}: {problem}); restore it from a backup "
                          "or move it away to resume without the model/data check") from None
    if saved is not None and not isinstance(saved, dict):
        raise RunDirError(f"{target} is not a saved config (a YAML mapping); restore it or move it away")
    return saved


def resume_conflicts(saved: Mapping[str, Any] | None, config: Mapping[str, Any]) -> list[str]:
    """'key: saved -> now' for each model/data key a resumed run changes."""
    if not saved:
        return []
    conflicts = []
    for section in FROZEN_SECTIONS:
        old, new = saved.get(section) or {}, config[section]
        for key, value in new.items():
            if key in old and old[key] != value:
                conflicts.append(f"{section}.{key}: {old[key]!r} -> {value!r}")
    return conflicts
