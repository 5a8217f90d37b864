"""The run directory: what rank 0 does with run.dir before training starts.

The checks are the launcher's too (`launch.preflight.check_run_dir`, in
its dry run as well; this module imports no TensorFlow, so the launcher
stays quick); the job applies them again because it can be started without
the launcher (plain mpirun) and because the directory can change between
the launcher's check and the job's start:

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

  - The path is resolved first: ~ expanded, made absolute, symlinks followed.
  - `/`, the home directory, shared top-level directories (/tmp, /home, ...)
    and anything in a system tree (/etc, /usr, ...) are always refused.
  - A non-empty directory needs run.resume or run.overwrite, and the job's
    marker file (a `config.yaml` with the job's header counts for runs made
    before markers existed).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

import yaml

from dist_bn.training.schema import resume_or_overwrite_problem

CONFIG_FILE = "config.yaml"
MARKER_FILE = ".dist_bn-run"
CONFIG_HEADER = "# Resolved config of this run (defaults filled in), written by dist_bn.training.\n"
# Never a run directory, even empty: the root, shared top-level directories,
# and (with everything under them) the system's own trees.
REFUSED_DIRS = ("/", "/home", "/root", "/tmp", "/var", "/var/tmp", "/opt", "/srv", "/mnt", "/media", "/run")
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/sbin", "/sys",
                "/usr")


def resolve_run_dir(run_dir: str | os.PathLike, cwd: str | os.PathLike | None = None) -> Path:
    """`run_dir` with ~ expanded, made absolute (against `cwd`, default the
    current directory) and every symlink followed: the directory that would
    really be written."""
    path = Path(os.path.expanduser(os.fspath(run_dir)))
    return (Path(cwd or os.getcwd()) / path).resolve()


def location_problem(path: Path, home: str | os.PathLike | None = None) -> str | None:
    """Why the resolved `path` can never be a run directory (the root, the
    home directory, a shared top-level or system directory), else None."""
    home_dir = Path(home if home is not None else os.path.expanduser("~")).resolve()
    text = str(path)
    if text in REFUSED_DIRS or path == home_dir:
        what = "the home directory" if path == home_dir else "a system directory"
        return f"{path} is {what}, never a run directory; pick a new directory such as runs/NAME"
    for tree in SYSTEM_TREES:
        if text == tree or text.startswith(tree + "/"):
            return f"{path} is in the system directory {tree}, never a run directory; pick one such as runs/NAME"
    return None


def is_run_dir(path: Path) -> bool:
    """Whether `path` holds a run this job wrote: its marker file (or, from
    before markers existed, the job's config.yaml header)."""
    if (path / MARKER_FILE).is_file():
        return True
    try:
        with open(path / CONFIG_FILE, encoding="utf-8") as f:
            return f.readline() == CONFIG_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def holds_files(path: Path) -> bool:
    """Whether the directory `path` has anything in it besides the marker."""
    return path.is_dir() and any(entry.name != MARKER_FILE for entry in path.iterdir())


def run_dir_problem(path: Path, resume: bool, overwrite: bool) -> str | None:
    """Why the resolved `path` cannot be used as asked, else None. Reads only."""
    problem = resume_or_overwrite_problem(resume, overwrite)
    if problem:
        return problem
    problem = location_problem(path)
    if problem:
        return problem
    if path.exists() and not path.is_dir():
        return f"{path} exists and is not a directory; pick another run.dir"
    try:
        empty = not holds_files(path)
    except OSError as err:
        return f"cannot read {path}: {err.strerror or err}; pick another run.dir"
    if empty:
        return None
    if not (resume or overwrite):
        return (f"{path} already exists and is not empty; pick another run.dir, "
                "or set run.resume=true to continue it, or run.overwrite=true to replace it "
                "(the earlier run is then renamed, not deleted)")
    if not is_run_dir(path):
        action = "continue it (run.resume)" if resume else "rename it (run.overwrite)"
        return (f"{path} is not empty and has no {MARKER_FILE} marker, so it is not a run directory this job "
                f"wrote; refusing to {action}; pick another run.dir")
    return None


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
    """Write the job's resolved sections (every key, defaults filled in) to run_dir/config.yaml."""
    target = Path(run_dir) / CONFIG_FILE
    header = CONFIG_HEADER + ("# The job's sections only; rerun it with: dist-bn-launch THIS_FILE run.dir=NEW_DIR\n"
                              "# (add your launcher/horovod sections, or the launcher's defaults apply)\n")
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
