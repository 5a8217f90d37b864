"""Ends the job when a dist_bn collective waits too long, with one line saying where.

A rank that is stopped (SIGSTOP), dead without its launcher noticing, or
waiting in a different collective (it skipped a layer, or ran it with another
training flag) leaves its peers blocked in `MPI_Allreduce` forever. A daemon
thread per process looks once a second at the collective in flight; past the
timeout it prints one line naming the collective, its sequence number, the
process set and the ranks that did not complete it, then calls `MPI_Abort`,
which makes mpirun end every rank with a non-zero status.
"""
import itertools
import sys
import threading
import time

EXIT_CODE = 70  # EX_SOFTWARE: a distributed program error, not a usage error


class Watchdog:
    """Times the collectives in flight on this rank; aborts past `timeout_s` (0 = never)."""

    def __init__(self, MPI, timeout_s):
        self.MPI = MPI
        self.timeout_s = timeout_s
        self._inflight = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._thread = None

    def enter(self, name, sequence, description, ranks):
        """Note a collective starting; returns the token for `leave`."""
        token = next(self._ids)
        with self._lock:
            self._inflight[token] = (time.monotonic(), name, sequence, description, ranks)
            if self._thread is None and self.timeout_s > 0:
                self._thread = threading.Thread(target=self._watch, name="dist_bn-watchdog", daemon=True)
                self._thread.start()
        return token

    def leave(self, token):
        with self._lock:
            self._inflight.pop(token, None)

    def overdue(self, now):
        """The oldest collective in flight longer than the timeout, or None."""
        with self._lock:
            late = [entry for entry in self._inflight.values() if now - entry[0] > self.timeout_s]
        return min(late, key=lambda entry: entry[0]) if late else None

    def _watch(self):
        period = min(1.0, self.timeout_s / 4)
        while True:
            time.sleep(period)
            entry = self.overdue(time.monotonic())
            if entry is not None:
                self._abort(entry)

    def _abort(self, entry):
        started, name, sequence, description, ranks = entry
        rank = self.MPI.COMM_WORLD.Get_rank()
        others = [r for r in ranks if r != rank]
        print(
            f"dist_bn: rank {rank} waited {time.monotonic() - started:.0f} s in collective #{sequence} "
            f"'{name}' of {description}; ranks {others} did not join it (stopped, dead, or in another "
            "collective: a skipped layer call or a different training flag). Ending the job; "
            "DIST_BN_COLLECTIVE_TIMEOUT_S sets the wait.",
            file=sys.stderr,
            flush=True,
        )
        self.MPI.COMM_WORLD.Abort(EXIT_CODE)


_WATCHDOG = None


def get(MPI, timeout_s):
    """The process's watchdog (one for every process set)."""
    global _WATCHDOG
    if _WATCHDOG is None:
        _WATCHDOG = Watchdog(MPI, timeout_s)
    return _WATCHDOG
