"""The job's place in the Horovod world: start Horovod, pin a GPU, and share
decisions only rank 0 can make.

Gradients, variables and metrics go through `dist_bn.keras` (Keras 3 safe);
what is left here is Horovod's own start-up and `broadcast_object`. With one
process everything still works (Horovod initializes a world of size 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import horovod.tensorflow as hvd
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


def broadcast_object(obj: Any, root_rank: int = 0, name: str = "object") -> Any:
    """root_rank's picklable `obj` on every rank (e.g. a decision only rank 0 can make)."""
    return hvd.broadcast_object(obj, root_rank=root_rank, name=name)
