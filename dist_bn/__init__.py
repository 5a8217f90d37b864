"""dist_bn: exact synchronized batch normalization for Keras 3 with Horovod.

`SyncBatchNormalization` is a drop-in `keras.layers.BatchNormalization` whose
training statistics cover the global batch of all ranks; `sync_moments` is the
distributed `tf.nn.moments`; `convert_sync_batchnorm` converts a model and
`revert_sync_batchnorm` converts it back. For inference: `precise_bn` (and
the `PreciseBN` callback) sets exact population statistics, `fold_batchnorm`
folds BN into the layer before it. `dist_bn.keras` (imported on its own,
`import dist_bn.keras as hvd`) makes Keras 3's `model.fit` work across
Horovod ranks under Horovod's names: `DistributedOptimizer` and callbacks.
"""
from dist_bn.convert import convert_sync_batchnorm, revert_sync_batchnorm
from dist_bn.folding import fold_batchnorm
from dist_bn.ops import sync_batch_normalization, sync_moments
from dist_bn.precise_bn import PreciseBN, precise_bn
from dist_bn.layer import SyncBatchNormalization

__version__ = "0.1.0"
__all__ = [
    "PreciseBN",
    "SyncBatchNormalization",
    "convert_sync_batchnorm",
    "fold_batchnorm",
    "precise_bn",
    "revert_sync_batchnorm",
    "sync_batch_normalization",
    "sync_moments",
]
