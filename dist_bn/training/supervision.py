"""A rank of the job under `dist-bn-launch`: its exit code left for the
launcher, and its end when the launcher dies.

The launcher (`launch.runner`) sets two variables in every rank's
environment: $DIST_BN_EXIT_STATUS_DIR, where a rank that stops records its
exit code (horovodrun turns every failing rank into exit 1 and a traceback
of its own; the launcher returns the recorded code instead), and
$DIST_BN_LAUNCHER, host:pid of the launcher, which ranks on its host watch
so that none outlives a SIGKILLed launcher. Without the launcher both do
nothing. Standard library only: the launcher imports this module.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Mapping

EXIT_STATUS_DIR_VARIABLE = "DIST_BN_EXIT_STATUS_DIR"
LAUNCHER_VARIABLE = "DIST_BN_LAUNCHER"  # host:pid of the launcher, for stop_with_launcher


def record_exit_status(rank: int, code: int, environ: Mapping[str, str] | None = None) -> None:
    """Called by a rank that exits with `code`: leave it where the launcher looks."""
    directory = (os.environ if environ is None else environ).get(EXIT_STATUS_DIR_VARIABLE)
    if directory:
        try:
            (Path(directory) / f"rank-{rank}").write_text(f"{code}\n", encoding="ascii")
        except OSError:
            pass  # the launcher is gone, or the directory is not ours to write


def _alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        return True  # cannot tell: keep running
    return state not in ("Z", "X")


def stop_with_launcher(environ: Mapping[str, str] | None = None, period_s: float = 1.0):
    """Called by a rank: SIGTERM this process once the launcher that started it is gone.

    Only on the launcher's host ($DIST_BN_LAUNCHER is host:pid); elsewhere,
    and without a launcher, it does nothing and returns None. Otherwise it
    returns the daemon thread that polls every `period_s` seconds.
    """
    host, _, pid = (os.environ if environ is None else environ).get(LAUNCHER_VARIABLE, "").rpartition(":")
    if not pid.isdigit() or host != socket.gethostname():
        return None
    launcher = int(pid)

    def watch():
        while _alive(launcher):
            time.sleep(period_s)
        print(f"dist_bn: the launcher (pid {launcher}) is gone; stopping this rank", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="dist_bn-launcher-watch", daemon=True)
    thread.start()
    return thread
