"""The collectives dist_bn issues, and the process set they run in.

Everything here degrades to the identity when Horovod is not initialized or
the process set has a single member, so single-process code runs unchanged
and issues no collective at all.

The layer's all-reduce (`allreduce_sum`) has three transports:
  mpi      one MPI_Iallreduce from dist_bn's compiled kernel on a communicator
           of the set's ranks (`dist_bn.mpi_transport`, `dist_bn.mpi_op`):
           ordered, checked, a few µs over the wire; used whenever Horovod's
           controller is MPI with MPI_THREAD_MULTIPLE and the kernel is built;
  mpi4py   the same collective through mpi4py in a tf.numpy_function (about
           120 µs more per call): the same conditions, kernel not built;
  horovod  `hvd.allreduce`, matched by name (about 1 ms per call): Gloo, or
           MPI without MPI_THREAD_MULTIPLE.
DIST_BN_TRANSPORT=auto (default: the first that can run), mpi, mpi4py (fail
if unavailable) or horovod picks one; `use_transport` does so for the
collectives traced inside it.
"""
import contextlib
import os

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf
from horovod.common import process_sets as _process_sets

from dist_bn import mpi_op
from dist_bn import mpi_transport

TRANSPORTS = ("auto", "mpi", "mpi4py", "horovod")
_forced_transport = None


def resolve_process_set(process_set):
    """A `hvd.ProcessSet` for None (all ranks), a ProcessSet, or a list of ranks.

    A list of ranks is looked up among the sets Horovod has registered (through
    `hvd.init(process_sets=...)` or `hvd.add_process_set`), which is how a
    layer restored from its config finds its set again.
    """
    if process_set is None:
        return hvd.global_process_set
    if isinstance(process_set, hvd.ProcessSet):
        return process_set
    ranks = sorted(int(r) for r in process_set)
    if not hvd.is_initialized():
        return hvd.ProcessSet(ranks)
    registered = _process_sets._basics._get_process_set_ids_and_ranks()
    for set_id, set_ranks in registered.items():
        if sorted(set_ranks) == ranks:
            found = hvd.ProcessSet(ranks)
            found.process_set_id = set_id
            return found
    raise ValueError(
        f"No Horovod process set with ranks {ranks} is registered. Register it "
        "on every rank with hvd.init(process_sets=[hvd.ProcessSet(ranks)]) or "
        "hvd.add_process_set(ranks) (HOROVOD_DYNAMIC_PROCESS_SETS=1)."
    )


def process_set_ranks(process_set):
    """The ranks of a process set argument as a plain list, or None for all ranks."""
    if process_set is None or process_set is hvd.global_process_set:
        return None
    if isinstance(process_set, hvd.ProcessSet):
        return None if process_set.ranks is None else list(process_set.ranks)
    return sorted(int(r) for r in process_set)


def group_size(process_set):
    """How many ranks share statistics: 1 when Horovod is not initialized."""
    if not hvd.is_initialized():
        return 1
    if not process_set.included():
        raise ValueError(
            f"Rank {hvd.rank()} is not a member of {process_set}; each rank must "
            "use a process set it belongs to (for example the ranks of its node)."
        )
    return process_set.size()


@tf.autograph.experimental.do_not_convert
def allreduce_sum(tensor, name, process_set):
    """Element-wise sum of `tensor` over the process set (identity for one rank).

    `name` must be the same on every rank and unique among collectives in
    flight: Horovod matches tensors across ranks by name, and the MPI
    transport checks that every rank's collective carries the same name.
    """
    if group_size(process_set) == 1:
        return tensor
    transport = transport_name(tensor.dtype)
    if transport in ("mpi", "mpi4py"):
        ranks = process_set.ranks or list(range(hvd.size()))
        transport = mpi_transport.transport_for(mpi_transport.mpi_or_none(), ranks,
                                                process_set.process_set_id or 0, transport == "mpi")
        return transport.allreduce_sum(tensor, name)
    return hvd.allreduce(tensor, op=hvd.Sum, name=name, process_set=process_set)


def _mpi_usable():
    """Why the MPI transport cannot run here, or None when it can."""
    if not hvd.mpi_enabled():
        return "Horovod's controller is not MPI (Gloo)"
    MPI = mpi_transport.mpi_or_none()
    if MPI is None:
        return "mpi4py is missing or MPI is not at MPI_THREAD_MULTIPLE"
    world = MPI.COMM_WORLD
    if (world.Get_size(), world.Get_rank()) != (hvd.size(), hvd.rank()):
        return "Horovod's world is not MPI_COMM_WORLD (hvd.init(comm=...))"
    return None


def transport_name(dtype=tf.float64):
    """'mpi', 'mpi4py' or 'horovod': the transport allreduce_sum uses now for `dtype`."""
    requested = _forced_transport or os.environ.get("DIST_BN_TRANSPORT", "auto")
    if requested not in TRANSPORTS:
        raise ValueError(f"DIST_BN_TRANSPORT={requested!r}: choose one of {', '.join(TRANSPORTS)}.")
    if requested == "horovod" or not hvd.is_initialized():
        return "horovod"
    why_not = _mpi_usable() if dtype.is_floating else "the tensor is not floating point"
    if why_not is None:
        kernel_missing = None if requested == "mpi4py" else mpi_op.why_unavailable()
        if kernel_missing is None:
            return "mpi4py" if requested == "mpi4py" else "mpi"
        if requested == "auto":
            return "mpi4py"
        why_not = kernel_missing
    if requested != "auto":
        raise RuntimeError(f"DIST_BN_TRANSPORT={requested}, but {why_not}; "
                           "unset it to use the fastest transport available.")
    return "horovod"


@contextlib.contextmanager
def use_transport(name):
    """Collectives traced (or run eagerly) inside use 'auto', 'mpi', 'mpi4py' or 'horovod'."""
    global _forced_transport
    if name not in TRANSPORTS:
        raise ValueError(f"transport {name!r}: choose one of {', '.join(TRANSPORTS)}.")
    previous, _forced_transport = _forced_transport, name
    try:
        yield
    finally:
        _forced_transport = previous


def check_same_on_all_ranks(values, what, name, process_set):
    """Raise a clear error unless every rank passes the same small int vector.

    Runs eagerly (lifted out of any tf.function being traced), once per caller,
    so a model built differently on some rank fails with a message that names
    the ranks instead of a shape mismatch deep inside Horovod.
    """
    if group_size(process_set) == 1:
        return
    with tf.init_scope():
        local = tf.constant([values], dtype=tf.int64)
        gathered = hvd.allgather(local, name=name, process_set=process_set).numpy()
    if not np.all(gathered == gathered[0]):
        ranks = process_set.ranks or list(range(hvd.size()))
        seen = ", ".join(f"rank {r}: {tuple(int(i) for i in v)}" for r, v in zip(ranks, gathered))
        raise ValueError(
            f"{what} differ across ranks ({seen}). Every rank must build the same "
            "model and feed inputs with the same channel count and layout."
        )
