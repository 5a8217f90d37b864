"""Checks of the launching machine, done once by the launcher before it starts
anything: the launcher program is installed, files named in the config exist,
and the run directory policy holds.

They are kept out of `load_config` on purpose: ranks re-load the config on
other hosts (where the host file need not exist) and after rank 0 has created
the run directory, so these checks would give them wrong answers.
"""
from __future__ import annotations

import copy
import os
import re
import shutil
import sys
from pathlib import Path

from launch.config import Config, ConfigError
from launch.schema import host_problem

INSTALL_HINT = {
    "horovodrun": "install Horovod with `bash scripts/bootstrap.sh` (or activate .venv)",
    "mpirun": "install Open MPI with `bash scripts/bootstrap.sh` (apt package openmpi-bin)",
}


def find_launcher(backend: str, path: str | None = None) -> str:
    """The program to run for `backend`: its bare name when found on PATH (so the
    printed command is the one a shell would run), else the copy next to this
    Python (a venv's bin/, used without activating it), as an absolute path."""
    if shutil.which(backend, path=path):
        return backend
    beside = Path(sys.executable).parent / backend
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise ConfigError(f"launcher.backend: {backend} not found on PATH; {INSTALL_HINT[backend]}")


def absolute(path: str, cwd: str | os.PathLike | None = None) -> str:
    """`path` with ~ expanded, made absolute against `cwd` (default: the current
    directory), without resolving symlinks."""
    expanded = os.path.expanduser(path)
    return os.path.normpath(os.path.join(cwd or os.getcwd(), expanded))


_HOROVOD_HOSTFILE_LINE = re.compile(r"(\S+)\s+slots=(\d+)\s*")


def hostfile_slots(path: str, backend: str) -> int | None:
    """Total slots in a host file, or None when some line does not say.

    horovodrun parses the file naively (every line must be 'host slots=N'; a
    blank or comment line crashes it), so that format is enforced for it.
    Open MPI also allows comments, blank lines and lines without slots.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except IsADirectoryError:
        raise ConfigError(f"launcher.hostfile: {path} is a directory, not a host file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"launcher.hostfile: cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
    total, complete = 0, True
    for number, line in enumerate(lines, start=1):
        if backend == "horovodrun":
            match = _HOROVOD_HOSTFILE_LINE.fullmatch(line)
            if not match:
                raise ConfigError(
                    f"launcher.hostfile: {path} line {number}: horovodrun needs 'hostname slots=N' "
                    f"on every line, no blank or comment lines; got {line!r}")
            if host_problem(match.group(1)):
                raise ConfigError(f"launcher.hostfile: {path} line {number}: {host_problem(match.group(1))}")
            total += int(match.group(2))
            continue
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if host_problem(line.split()[0]):
            raise ConfigError(f"launcher.hostfile: {path} line {number}: {host_problem(line.split()[0])}")
        slots = re.search(r"\bslots=(\d+)", line)
        if slots:
            total += int(slots.group(1))
        else:
            complete = False
    if total == 0 and complete:
        raise ConfigError(f"launcher.hostfile: {path} lists no hosts")
    return total if complete else None


def check_run_dir(run_dir: str, resume: bool, overwrite: bool) -> None:
    """The job's run-directory policy (`dist_bn.training.rundir`), checked
    before anything starts: an existing non-empty run directory needs
    run.resume or run.overwrite and the job's marker; system and home
    directories are refused. (Rank 0 of the job checks again, then creates
    or renames it.)"""
    from dist_bn.training.rundir import resolve_run_dir, run_dir_problem
    problem = run_dir_problem(resolve_run_dir(run_dir), resume, overwrite)
    if problem:
        raise ConfigError(f"run.dir: {problem}")


def preflight(config: Config, cwd: str | os.PathLike | None = None, run_dir: bool = True) -> Config:
    """Run every launching-machine check; return a copy of `config` whose local
    paths (run.dir, launcher.hostfile, launcher.ssh_identity_file) are absolute.
    With run_dir=False (jobs that write no run directory, such as
    dist-bn-verify) an existing run.dir is not checked."""
    config = copy.deepcopy(config)
    launcher, run = config["launcher"], config["run"]

    for key in ("hostfile", "ssh_identity_file"):
        if launcher[key] is not None:
            launcher[key] = absolute(launcher[key], cwd)
            if not os.path.exists(launcher[key]):
                raise ConfigError(f"launcher.{key}: no such file: {launcher[key]}")

    if launcher["hostfile"] is not None:
        slots = hostfile_slots(launcher["hostfile"], launcher["backend"])
        if slots is not None and slots < launcher["num_proc"]:
            raise ConfigError(
                f"launcher.hostfile: slots in {launcher['hostfile']} add up to {slots} but "
                f"launcher.num_proc is {launcher['num_proc']}; add hosts or slots, or lower launcher.num_proc")

    run["dir"] = absolute(run["dir"], cwd)
    if run_dir:
        check_run_dir(run["dir"], run["resume"], run["overwrite"])
    return config
