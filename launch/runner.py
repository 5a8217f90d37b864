"""Run the launcher command as a child and stand in for it: the exit code is
the job's, Ctrl-C, SIGTERM and SIGHUP reach the child exactly once, and the
child dies with this process.

The child gets its own session, so a Ctrl-C typed at the terminal reaches only
this process, which forwards it; horovodrun/mpirun then stop every rank. (In
the same process group the child would get each Ctrl-C twice, and a second
SIGINT can interrupt horovodrun while it is still tearing ranks down.) The
child's stdin is /dev/null: nothing reads it, and mpirun would otherwise try
to forward the terminal to rank 0.

A session of its own also means nothing stops the child when this process
is killed outright (SIGKILL, the OOM killer): so on Linux the child asks the
kernel for SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG), and
horovodrun and mpirun stop every rank on SIGTERM as they do when it is
forwarded. That signal reaches only the child itself, and `horovodrun --mpi`
becomes a shell whose own child is mpirun, which would outlive it; so the
ranks on this host also watch this process ($DIST_BN_LAUNCHER, see
`dist_bn.training.supervision`) and end themselves within a second of its death, which
makes mpirun stop the others.

Exit codes follow the shell: 128 + N when a signal N stopped the job (also
when it was forwarded, whatever horovodrun then returns), else the job's
own. horovodrun turns every failing rank into exit 1 and a traceback of its
own; ranks of the training job therefore also record their exit code in
$DIST_BN_EXIT_STATUS_DIR, and when one did, its code is returned and
horovodrun's traceback, which would only repeat it, is left out.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Mapping, Sequence

# The ranks' side of these variables is dist_bn.training.supervision.
from dist_bn.training.supervision import (EXIT_STATUS_DIR_VARIABLE, LAUNCHER_VARIABLE,  # noqa: F401
                                          record_exit_status, stop_with_launcher)

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
TRACEBACK_START = "Traceback (most recent call last):"


def exit_code(returncode: int) -> int:
    """A shell-style exit code: 128 + N when the child died of signal N."""
    return 128 - returncode if returncode < 0 else returncode


def recorded_exit_code(directory: str | os.PathLike) -> int | None:
    """The code recorded by the lowest rank that recorded one, else None."""
    codes = {}
    for path in Path(directory).glob("rank-*"):
        try:
            codes[int(path.name[5:])] = int(path.read_text(encoding="ascii"))
        except (OSError, ValueError):
            continue
    return codes[min(codes)] if codes else None


def _parent_death_signal():
    """A preexec_fn: SIGTERM to the child when this process dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: no dlopen in the child
    parent = os.getpid()

    def preexec():
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _copy_stderr(stream, held: list[str]) -> None:
    """Copy the child's stderr to ours, holding back an unprefixed Python
    traceback (horovodrun's own) in `held` until the job's outcome is known."""
    for line in iter(stream.readline, ""):
        if held or line.rstrip("\n") == TRACEBACK_START:
            held.append(line)
            continue
        sys.stderr.write(line)
        sys.stderr.flush()


def run(argv: Sequence[str], env: Mapping[str, str], rank_exit_codes: bool = False) -> int:
    """Start `argv` with `env`, forward signals to it until it exits, and return
    its exit code (see the module docstring). With `rank_exit_codes` (for
    horovodrun) the ranks' recorded exit codes are used and the child's stderr
    passes through this process. Raises OSError if it cannot be started."""
    child: subprocess.Popen | None = None
    pending: list[int] = []  # signals that arrive before the child exists
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        if child is None:
            pending.append(signum)
            return
        try:
            child.send_signal(signum)
        except ProcessLookupError:  # already gone; wait() collects it
            pass

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    held: list[str] = []
    with tempfile.TemporaryDirectory(prefix="dist-bn-exit-") as status_dir:
        env = {**env, LAUNCHER_VARIABLE: f"{socket.gethostname()}:{os.getpid()}"}
        if rank_exit_codes:
            env[EXIT_STATUS_DIR_VARIABLE] = status_dir
        try:
            child = subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_parent_death_signal(),
                                     stderr=subprocess.PIPE if rank_exit_codes else None,
                                     text=rank_exit_codes, errors="replace" if rank_exit_codes else None)
            copier = None
            if rank_exit_codes:
                copier = threading.Thread(target=_copy_stderr, args=(child.stderr, held), daemon=True)
                copier.start()
            for signum in pending:
                child.send_signal(signum)
            code = exit_code(child.wait())
            if copier is not None:
                copier.join()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        recorded = recorded_exit_code(status_dir) if rank_exit_codes else None
    if code != 0 and received:
        return 128 + received[0]
    if code != 0 and recorded is not None:
        return recorded  # the job said what went wrong; horovodrun's traceback would only repeat it
    sys.stderr.writelines(held)
    sys.stderr.flush()
    return code
