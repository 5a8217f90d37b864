"""Which directories may hold a run: the run-directory policy as pure checks.

Shared by the launcher (`launch.preflight`, before anything starts, also in
a dry run) and the job (`dist_bn.training.rundir`, on rank 0, which then
creates or renames the directory); kept here, free of TensorFlow, so the
launcher stays quick. Every function only reads the filesystem.

  - The path is resolved first: ~ expanded, made absolute, symlinks followed.
  - `/`, the home directory, shared top-level directories (/tmp, /home, ...)
    and anything in a system tree (/etc, /usr, ...) are always refused.
  - A non-empty directory needs run.resume or run.overwrite, and the job's
    marker file `.dist_bn-run` (written into every run directory the job
    creates; a `config.yaml` with the job's header counts for runs made
    before markers existed): a directory the job did not make is never
    continued or renamed.
"""
from __future__ import annotations

import os
from pathlib import Path

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
    if resume and overwrite:
        return "run.resume and run.overwrite are both true; pick one"
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
