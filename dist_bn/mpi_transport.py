"""dist_bn's all-reduce straight through MPI: the latency of the wire, paired safely.

Why: a Horovod collective waits for Horovod's background cycle and its
negotiation, about 1 ms for the 2C+1 values a BN layer sums, and a deep 3D
net issues two per BN layer per step, one after the other. Here the same sum
is one `MPI_Iallreduce` on a communicator of the process set's ranks created
for dist_bn alone (so it never interleaves with Horovod's own MPI traffic),
pinned to the CPU, issued by one of two paths:
  kernel  dist_bn's compiled TensorFlow kernel (`dist_bn.mpi_op`), given the
          communicator's handle by mpi4py: a few µs over the wire;
  mpi4py  a `tf.numpy_function` calling mpi4py, where the kernel is not built
          (about 120 µs of Python per call).
Tensors on a GPU are copied to the host (2C+1 values) and back: the kernel
is CPU-only, so TensorFlow places the copies.

Pairing. Horovod matched tensors by name; MPI pairs collectives by call order.
So every collective of a process set reads and increments one CPU
`tf.Variable` of that set (its sequence number), which makes TensorFlow's
automatic control dependencies run them in trace order, inside `tf.cond`
branches and in the backward pass too, whatever the inter-op threads do. Each
collective is two all-reduces: first a header [t, t^2, k, k^2], t a hash of
the collective's name and payload length, k the sequence number. The sums
equal n*t, n*t^2, n*k, n*k^2 on every rank exactly when all n ranks sent the
same t and k (Cauchy-Schwarz), so a mis-paired collective (one rank in
training mode and another not, a rank that skipped a layer, a different
channel count) is detected on every rank at once, and its payload never
moves: MPI leaves an all-reduce of unequal lengths undefined (Open MPI
truncates, hangs or crashes, measured). Both paths do the same, and fail
with one line on every rank naming each rank's collective.

Hangs. A collective that does not complete within `timeout_s` (a peer
stopped, dead, or waiting in another collective) ends the job through
`MPI_Abort` after one line naming the collective and the ranks (see
`dist_bn.collective_watchdog`, which times both paths).
"""
import os
import sys
import threading
import time
import weakref
import zlib

import numpy as np
import tensorflow as tf
from tensorflow.python.ops import gen_resource_variable_ops

from dist_bn import collective_watchdog
from dist_bn import mpi_op

# Header: [t, t^2, k, k^2]. t < 2^20 and k < 2^20 keep n*t^2 exact in
# float64 for up to 2^13 ranks.
TAG_VALUES = 4
_TAG_MODULUS = 1 << 20
_NAME_BYTES = 160
_MISMATCH_EXCHANGE_S = 10.0
_SPIN_POLLS = 50  # about 10-20 µs of polling before yielding the core


class CollectiveMismatchError(RuntimeError):
    """Ranks of a process set issued different collectives at the same point."""


def name_tag(name):
    """A stable 20-bit positive tag of a collective's name (the same on every rank)."""
    return zlib.crc32(name.encode("utf-8")) % (_TAG_MODULUS - 1) + 1


def tags(name_hash, sequence, length):
    """The float64 header [t, t^2, k, k^2] of a collective: t folds in the length."""
    t = (name_hash + 7919 * int(length)) % (_TAG_MODULUS - 1) + 1  # as the kernel does
    k = int(sequence) % _TAG_MODULUS
    return np.array([t, t * t, k, k * k], np.float64)


def tags_match(summed_tags, own_tags, size):
    """Whether every rank of `size` sent `own_tags`, from the summed prefix."""
    return bool(np.array_equal(summed_tags, size * own_tags))


def mpi_or_none():
    """mpi4py's MPI module when MPI is initialized with MPI_THREAD_MULTIPLE, else None.

    Horovod's background thread calls MPI too when its controller is MPI, so a
    second thread may only use MPI at that thread level.
    """
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    if not MPI.Is_initialized() or MPI.Is_finalized():
        return None
    if MPI.Query_thread() != MPI.THREAD_MULTIPLE:
        return None
    return MPI


class MPITransport:
    """The all-reduce of one process set: its communicator, sequence and watchdog."""

    def __init__(self, MPI, ranks, set_id, timeout_s, compiled):
        world = MPI.COMM_WORLD
        self.compiled = compiled  # the kernel, else the numpy_function
        self.MPI = MPI
        self.ranks = list(ranks)
        self.size = len(self.ranks)
        group = world.Get_group().Incl(self.ranks)
        # Collective over the set's members only; the tag keeps concurrent
        # creations for different sets apart.
        self.comm = world.Create_group(group, tag=1000 + set_id)
        group.Free()
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)  # e.g. truncation is an error, not an abort
        self.rank = self.comm.Get_rank()
        self.world_rank = world.Get_rank()
        self.description = f"process set {self.ranks}" if set_id else "the global process set"
        with tf.init_scope(), tf.device("/CPU:0"):
            self.sequence = tf.Variable(
                tf.constant(0, tf.int64), trainable=False, name=f"dist_bn_sequence_{set_id}"
            )
        self._lock = threading.Lock()
        self._handles = weakref.WeakKeyDictionary()
        self.watchdog = collective_watchdog.get(MPI, timeout_s)
        if compiled:
            self.watchdog.watch(mpi_op.oldest_inflight)
        if self.size == world.Get_size():
            self.watchdog.start_heartbeat()  # every rank of the world is here too

    def _sequence_handle(self):
        """The sequence variable's handle as the current graph may use it.

        The gradient graph of a `tf.cond` branch must not capture the (eager)
        variable itself; it reuses the tensor its forward branch captured.
        """
        graph = tf.compat.v1.get_default_graph()
        forward = getattr(graph, "_forward_graph", None)
        if forward is not None and forward in self._handles:
            return self._handles[forward]
        if tf.executing_eagerly():
            return self.sequence.handle
        if graph not in self._handles:
            self._handles[graph] = graph.capture(self.sequence.handle)
        return self._handles[graph]

    @tf.autograph.experimental.do_not_convert
    def allreduce_sum(self, tensor, name):
        """Element-wise sum of `tensor` over the set, in trace order, checked."""
        name_hash = name_tag(name)
        if self.compiled:
            with tf.device("/CPU:0"):
                handle = self._sequence_handle()
                sequence = gen_resource_variable_ops.read_variable_op(handle, tf.int64)
                payload = tf.cast(tf.reshape(tensor, [-1]), tf.float64)
                summed = mpi_op.allreduce(payload, sequence, self.MPI._handleof(self.comm), name,
                                          name_hash, self.description, self.ranks)
                with tf.control_dependencies([summed]):
                    gen_resource_variable_ops.assign_add_variable_op(handle, tf.constant(1, tf.int64))
            return tf.reshape(tf.cast(summed, tensor.dtype), tf.shape(tensor))

        def run(payload, sequence):
            return self._run(payload, int(sequence), name, name_hash)

        with tf.device("/CPU:0"):
            handle = self._sequence_handle()
            sequence = gen_resource_variable_ops.read_variable_op(handle, tf.int64)
            payload = tf.cast(tf.reshape(tensor, [-1]), tf.float64)
            summed = tf.numpy_function(run, [payload, sequence], tf.float64, stateful=True,
                                       name="dist_bn_mpi_allreduce")
            summed.set_shape(payload.shape)
            with tf.control_dependencies([summed]):
                gen_resource_variable_ops.assign_add_variable_op(handle, tf.constant(1, tf.int64))
        return tf.reshape(tf.cast(summed, tensor.dtype), tf.shape(tensor))

    def _run(self, payload, sequence, name, name_hash):
        """The header's all-reduce, then (lengths known to agree) the payload's."""
        own = tags(name_hash, sequence, payload.size)
        summed = np.empty_like(own)
        recv = np.empty_like(payload)
        with self._lock:
            token = self.watchdog.enter(name, sequence, self.description, self.ranks)
            try:
                self._allreduce(own, summed)
                paired = tags_match(summed, own, self.size)
                if paired:
                    self._allreduce(payload, recv)
                error = None
            except self.MPI.Exception as exc:
                paired, error = False, exc
            finally:
                self.watchdog.leave(token)
            if not paired:
                self._raise_mismatch(name, sequence, error)
        return recv

    def _allreduce(self, send, recv):
        """MPI_Iallreduce, polled: spin briefly, then yield the core between polls.

        A blocking MPI_Allreduce busy-waits; on a machine with more busy
        threads than cores (ranks, TensorFlow's pools, Horovod's background
        thread) that spinning takes the core the late peer needs, and the
        wait grows to scheduler time slices (milliseconds, measured).
        """
        request = self.comm.Iallreduce(send, recv, op=self.MPI.SUM)
        polls = 0
        while not request.Test():
            polls += 1
            if polls > _SPIN_POLLS:
                os.sched_yield()

    def _raise_mismatch(self, name, sequence, error):
        """Every rank of the mis-paired collective gets here: say who called what."""
        record = np.zeros(_NAME_BYTES + 8, np.uint8)
        label = name.encode("utf-8")[:_NAME_BYTES]
        record[: len(label)] = np.frombuffer(label, np.uint8)
        record[_NAME_BYTES:] = np.frombuffer(np.int64(sequence).tobytes(), np.uint8)
        gathered = np.zeros((self.size, record.size), np.uint8)
        request = self.comm.Iallgather(record, gathered)
        deadline = time.monotonic() + _MISMATCH_EXCHANGE_S
        while not request.Test():
            if time.monotonic() > deadline:
                request = None
                break
            time.sleep(0.001)
        if request is not None:
            calls = []
            for rank, row in zip(self.ranks, gathered):
                label = bytes(row[:_NAME_BYTES]).rstrip(b"\0").decode("utf-8", "replace")
                k = int(np.frombuffer(bytes(row[_NAME_BYTES:]), np.int64)[0])
                calls.append(f"rank {rank}: '{label}' (#{k})")
            seen = ", ".join(calls)
        else:
            seen = f"rank {self.world_rank}: '{name}' (#{sequence}); the other ranks did not say"
        reason = f" ({error})" if error is not None else ""
        message = (
            f"dist_bn: mis-paired collective in {self.description}{reason}: {seen}. Every rank "
            "of a process set must call the same SyncBatchNormalization layers in the same "
            "order with the same training flag."
        )
        print(message, file=sys.stderr, flush=True)
        raise CollectiveMismatchError(message)


_TRANSPORTS = {}


def timeout_from_env():
    """Seconds a collective may wait: DIST_BN_COLLECTIVE_TIMEOUT_S, default 60; 0 = forever."""
    raw = os.environ.get("DIST_BN_COLLECTIVE_TIMEOUT_S", "60")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(
            f"DIST_BN_COLLECTIVE_TIMEOUT_S={raw!r} is not a number of seconds; "
            "set e.g. 60, or 0 to wait forever."
        ) from None
    if value < 0:
        raise ValueError(f"DIST_BN_COLLECTIVE_TIMEOUT_S={raw!r} is negative; set e.g. 60, or 0 to wait forever.")
    return value


@tf.autograph.experimental.do_not_convert
def transport_for(MPI, ranks, set_id, compiled):
    """The (cached) MPITransport of a process set and path, created on first use by its members."""
    key = (set_id, tuple(ranks), compiled)
    if key not in _TRANSPORTS:
        _TRANSPORTS[key] = MPITransport(MPI, ranks, set_id, timeout_from_env(), compiled)
    return _TRANSPORTS[key]
