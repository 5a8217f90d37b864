"""Keras 3 `model.fit` across Horovod ranks, under Horovod's names.

A Horovod user replaces `import horovod.tensorflow.keras as hvd` (which needs
Keras 2) with `import dist_bn.keras as hvd`; `hvd.init()`, `hvd.size()`,
`hvd.DistributedOptimizer(opt)` and `hvd.callbacks.*` keep their meaning.
"""
from horovod.tensorflow import (  # noqa: F401
    Adasum, Average, Compression, ProcessSet, Sum, add_process_set, allgather, allreduce,
    broadcast, cross_rank, cross_size, global_process_set, init, is_initialized, local_rank,
    local_size, rank, shutdown, size,
)

from dist_bn.keras import callbacks  # noqa: F401
from dist_bn.keras.evaluation import evaluate
from dist_bn.keras.saving import load_model
from dist_bn.keras.optimizer import DistributedOptimizer, allreduce_gradients, is_distributed
from dist_bn.keras.variables import broadcast_global_variables, broadcast_variables, is_random_state
from dist_bn.keras.callbacks import global_metric_results, scale_learning_rate

__all__ = [
    "DistributedOptimizer",
    "allreduce_gradients",
    "broadcast_global_variables",
    "broadcast_variables",
    "callbacks",
    "evaluate",
    "global_metric_results",
    "is_distributed",
    "is_random_state",
    "load_model",
    "scale_learning_rate",
]
