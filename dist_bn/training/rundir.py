"""The run directory: what rank 0 does with run.dir before training starts.

The policy is the launcher's (`launch.preflight.check_run_dir`), enforced
again here because the job can be started without the launcher (plain
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
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

import yaml

CONFIG_FILE = "config.yaml"
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


def prepare_run_dir(run_dir: str | os.PathLike, resume: bool, overwrite: bool,
                    now: float | None = None) -> Path | None:
    """Apply the run-directory policy to `run_dir` and make sure it exists.

    Returns where an earlier run was moved to (run.overwrite), else None.
    Raises RunDirError when the directory cannot be used.
    """
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(run_dir))))
    if resume and overwrite:
        raise RunDirError("run.resume and run.overwrite are both true; pick one")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path} exists and is not a directory; pick another run.dir")
    moved_to = None
    if path.is_dir() and any(path.iterdir()) and not resume:
        if not overwrite:
            raise RunDirError(
                f"{path} already exists and is not empty; pick another run.dir, "
                "or set run.resume=true to continue it, or run.overwrite=true to replace it "
                "(the earlier run is then renamed, not deleted)")
        moved_to = aside_name(path, now)
        path.rename(moved_to)
    path.mkdir(parents=True, exist_ok=True)
    return moved_to


def save_config(run_dir: str | os.PathLike, config: Mapping[str, Any]) -> Path:
    """Write the resolved config (every key, defaults filled in) to run_dir/config.yaml."""
    target = Path(run_dir) / CONFIG_FILE
    header = ("# Resolved config of this run (defaults filled in), written by dist_bn.training.\n"
              "# Rerun it with: dist-bn-launch THIS_FILE run.dir=NEW_DIR\n")
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(header + yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")
    tmp.replace(target)
    return target


def load_saved_config(run_dir: str | os.PathLike) -> dict | None:
    """The config.yaml saved in run_dir, or None if there is none."""
    target = Path(run_dir) / CONFIG_FILE
    if not target.is_file():
        return None
    return yaml.safe_load(target.read_text(encoding="utf-8"))


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
