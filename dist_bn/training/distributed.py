"""Horovod plumbing for the training job, with Horovod's TensorFlow core ops only.

Horovod 0.28.1's Keras helpers (`horovod.keras`, `horovod.tensorflow.keras`,
`hvd.broadcast_variables`, `hvd.SyncBatchNormalization`) break on Keras 3,
whose variables are not `tf.Variable`s; everything here goes through the
underlying `tf.Variable` (`keras_variable.value`) and `hvd.broadcast`,
`hvd.allreduce` and `hvd.broadcast_object`. With one process every function
still works (Horovod initializes a world of size 1 by itself).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    local_size: int = 1  # ranks on this machine

    @property
    def is_chief(self) -> bool:
        """Rank 0 writes files and prints; the others stay silent."""
        return self.rank == 0


def pin_local_gpu() -> Any | None:
    """Make GPU local_rank the only GPU this rank sees (memory growth on), as
    Horovod's docs do; returns it, or None without GPUs. Call after hvd.init()
    and before TensorFlow touches a device (visible devices and memory growth
    cannot change afterwards)."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    gpu = gpus[hvd.local_rank() % len(gpus)]
    tf.config.set_visible_devices(gpu, "GPU")
    tf.config.experimental.set_memory_growth(gpu, True)
    return gpu


def init() -> World:
    """Start Horovod and pin this rank to GPU local_rank when there are GPUs."""
    hvd.init()
    pin_local_gpu()
    return World(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size())


def broadcast_variables(variables: Sequence[Any], root_rank: int = 0, prefix: str = "broadcast") -> None:
    """Give every rank root_rank's values of `variables` (Keras or tf.Variables).

    Horovod matches collectives across ranks by name, so every rank must pass
    the same variables in the same order; names are `prefix/index`.
    """
    for i, variable in enumerate(variables):
        value = variable if isinstance(variable, tf.Variable) else variable.value  # Keras -> tf.Variable
        variable.assign(hvd.broadcast(value, root_rank=root_rank, name=f"{prefix}/{i}"))


def allreduce_sum(values: Iterable[float], name: str) -> np.ndarray:
    """Element-wise float64 sum over ranks of a short vector of numbers (eager)."""
    tensor = tf.constant(np.asarray(list(values), dtype=np.float64))
    return hvd.allreduce(tensor, op=hvd.Sum, name=name).numpy()


def broadcast_object(obj: Any, root_rank: int = 0, name: str = "object") -> Any:
    """root_rank's picklable `obj` on every rank (e.g. a decision only rank 0 can make)."""
    return hvd.broadcast_object(obj, root_rank=root_rank, name=name)


def distributed_tape(tape: tf.GradientTape) -> tf.GradientTape:
    """A tape whose gradients are averaged over ranks. Ask it for gradients with
    respect to the underlying tf.Variables (`[v.value for v in keras_vars]`):
    with Keras variables Horovod 0.28.1 fails ("'Variable' has no attribute 'ref'")."""
    return hvd.DistributedGradientTape(tape)

