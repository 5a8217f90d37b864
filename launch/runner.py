"""Run the launcher command as a child and stand in for it: the exit code is
the job's, and Ctrl-C, SIGTERM and SIGHUP reach the child exactly once.

The child gets its own session, so a Ctrl-C typed at the terminal reaches only
this process, which forwards it; horovodrun/mpirun then stop every rank. (In
the same process group the child would get each Ctrl-C twice, and a second
SIGINT can interrupt horovodrun while it is still tearing ranks down.) The
child's stdin is /dev/null: nothing reads it, and mpirun would otherwise try
to forward the terminal to rank 0.
"""
from __future__ import annotations

import signal
import subprocess
from typing import Mapping, Sequence

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def exit_code(returncode: int) -> int:
    """A shell-style exit code: 128 + N when the child died of signal N."""
    return 128 - returncode if returncode < 0 else returncode


def run(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """Start `argv` with `env`, forward signals to it until it exits, and return
    its exit code (see `exit_code`). Raises OSError if it cannot be started."""
    child: subprocess.Popen | None = None
    pending: list[int] = []  # signals that arrive before the child exists

    def forward(signum, _frame):
        if child is None:
            pending.append(signum)
            return
        try:
            child.send_signal(signum)
        except ProcessLookupError:  # already gone; wait() collects it
            pass

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    try:
        child = subprocess.Popen(list(argv), env=dict(env), stdin=subprocess.DEVNULL, start_new_session=True)
        for signum in pending:
            child.send_signal(signum)
        return exit_code(child.wait())
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
