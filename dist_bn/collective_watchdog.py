"""Ends the job when a dist_bn collective waits too long, with one line saying where.

A rank that is stopped (SIGSTOP), dead without its launcher noticing, or
waiting in a different collective (it skipped a layer, or ran it with another
training flag) leaves its peers blocked in `MPI_Allreduce` forever. A daemon
thread per process looks once a second at the collective in flight (the
mpi4py path's, and the compiled kernel's through `Watchdog.watch`); past the
timeout it prints one line naming the collective, its sequence number, the
process set and the ranks that did not complete it, then calls `MPI_Abort`,
which makes mpirun end every rank with a non-zero status.

The same thread sends a heartbeat to the next rank of the world every second
and listens for the previous rank's. Silence for the timeout means that rank
is stopped or frozen even when this one waits elsewhere (in one of Horovod's
collectives, whose MPI controller never times out): same line, same abort.
A rank leaving normally says goodbye first, so its successor stops listening.
"""
import atexit
import itertools
import sys
import threading
import time

import horovod.tensorflow as hvd
import numpy as np

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
        self._heartbeat = None
        self._sources = []  # callables: the oldest collective in flight elsewhere, or None
        self._mpi_lock = threading.Lock()  # the watchdog's MPI calls vs the goodbye at exit

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

    def watch(self, source):
        """Also time what `source()` reports: the oldest collective it has in flight as
        (age_s, name, sequence, description, ranks), or None (the compiled kernel's)."""
        with self._lock:
            if source not in self._sources:
                self._sources.append(source)
            if self._thread is None and self.timeout_s > 0:
                self._thread = threading.Thread(target=self._watch, name="dist_bn-watchdog", daemon=True)
                self._thread.start()

    def _entries(self):
        """Every collective in flight as (started, name, sequence, description, ranks)."""
        with self._lock:
            entries, sources = list(self._inflight.values()), list(self._sources)
        now = time.monotonic()
        for source in sources:
            oldest = source()
            if oldest is not None:
                entries.append((now - oldest[0],) + tuple(oldest[1:]))
        return entries

    def overdue(self, now):
        """The oldest collective in flight longer than the timeout, or None."""
        late = [entry for entry in self._entries() if now - entry[0] > self.timeout_s]
        return min(late, key=lambda entry: entry[0]) if late else None

    def start_heartbeat(self):
        """Join the world's heartbeat ring; every rank of the world must call it once."""
        if self._heartbeat is not None or self.timeout_s <= 0:
            return
        world = self.MPI.COMM_WORLD
        group = world.Get_group()
        comm = world.Create_group(group, tag=999)
        group.Free()
        if comm.Get_size() > 1:
            self._heartbeat = _Heartbeat(self.MPI, comm)
            atexit.register(self._goodbye)
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._watch, name="dist_bn-watchdog", daemon=True)
                    self._thread.start()

    def _goodbye(self):
        with self._mpi_lock:
            heartbeat, self._heartbeat = self._heartbeat, None
            if heartbeat is not None and self._mpi_usable():
                heartbeat.goodbye()

    def _mpi_usable(self):
        """False once Horovod shuts down: when any rank leaves, Horovod's background
        thread finalizes MPI in every process, while their Python still runs."""
        return hvd.is_initialized() and not self.MPI.Is_finalized()

    def _watch(self):
        period = min(1.0, self.timeout_s / 4)
        while True:
            time.sleep(period)
            now = time.monotonic()
            entry = self.overdue(now)
            if entry is not None:
                self._abort(entry)
            with self._mpi_lock:
                if self._heartbeat is not None and not self._mpi_usable():
                    self._heartbeat = None  # Horovod shut down (maybe for another rank) and ends MPI
                silent_s = self._heartbeat.beat(now) if self._heartbeat is not None else 0.0
            if silent_s > self.timeout_s:
                self._abort_silent(silent_s)

    def _abort(self, entry):
        started, name, sequence, description, ranks = entry
        rank = self.MPI.COMM_WORLD.Get_rank()
        others = [r for r in ranks if r != rank]
        self._end(
            f"dist_bn: rank {rank} waited {time.monotonic() - started:.0f} s in collective #{sequence} "
            f"'{name}' of {description}; ranks {others} did not join it (stopped, dead, or in another "
            "collective: a skipped layer call or a different training flag). Ending the job; "
            "DIST_BN_COLLECTIVE_TIMEOUT_S sets the wait."
        )

    def _abort_silent(self, silent_s):
        rank = self.MPI.COMM_WORLD.Get_rank()
        inflight = sorted(self._entries(), key=lambda entry: entry[0])
        where = (f" while rank {rank} waits in collective #{inflight[0][2]} '{inflight[0][1]}'"
                 if inflight else "")
        self._end(
            f"dist_bn: rank {self._heartbeat.previous} has not been heard from for {silent_s:.0f} s"
            f"{where} (stopped or frozen); ending the job. DIST_BN_COLLECTIVE_TIMEOUT_S sets the wait."
        )

    def _end(self, line):
        print(line, file=sys.stderr, flush=True)
        self.MPI.COMM_WORLD.Abort(EXIT_CODE)


class _Heartbeat:
    """One int64 a second to the next rank of `comm`; the time since the previous one's."""

    TAG = 7
    GOODBYE = -1

    def __init__(self, MPI, comm):
        self.MPI, self.comm = MPI, comm
        rank, size = comm.Get_rank(), comm.Get_size()
        self.next, self.previous = (rank + 1) % size, (rank - 1) % size
        self._out, self._in = np.zeros(1, np.int64), np.zeros(1, np.int64)
        self._send = None
        self._recv = comm.Irecv(self._in, source=self.previous, tag=self.TAG)
        self._heard = time.monotonic()
        self._count = 0

    def beat(self, now):
        """Send one beat (unless the last is still in flight), read what came; seconds of silence."""
        if self._send is None or self._send.Test():
            self._count += 1
            self._out[0] = self._count
            self._send = self.comm.Isend(self._out, dest=self.next, tag=self.TAG)
        while self._recv is not None and self._recv.Test():
            if self._in[0] == self.GOODBYE:
                self._recv = None  # the previous rank left normally
            else:
                self._heard = now
                self._recv = self.comm.Irecv(self._in, source=self.previous, tag=self.TAG)
        return 0.0 if self._recv is None else now - self._heard

    def goodbye(self, wait_s=2.0):
        """Tell the next rank this one leaves; cancel the pending receive."""
        deadline = time.monotonic() + wait_s
        while self._send is not None and not self._send.Test():
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        self._out[0] = self.GOODBYE
        request = self.comm.Isend(self._out, dest=self.next, tag=self.TAG)
        while not request.Test() and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._recv is not None:
            self._recv.Cancel()
            self._recv.Wait()
            self._recv = None


_WATCHDOG = None


def get(MPI, timeout_s):
    """The process's watchdog (one for every process set)."""
    global _WATCHDOG
    if _WATCHDOG is None:
        _WATCHDOG = Watchdog(MPI, timeout_s)
    return _WATCHDOG
