"""The Horovod collectives dist_bn issues, and the process set they run in.

Everything here degrades to the identity when Horovod is not initialized or
the process set has a single member, so single-process code runs unchanged
and issues no collective at all.
"""
import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf
from horovod.common import process_sets as _process_sets


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


def allreduce_sum(tensor, name, process_set):
    """Element-wise sum of `tensor` over the process set (identity for one rank).

    `name` must be the same on every rank and unique among collectives in
    flight: Horovod matches tensors across ranks by name.
    """
    if group_size(process_set) == 1:
        return tensor
    return hvd.allreduce(tensor, op=hvd.Sum, name=name, process_set=process_set)


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
