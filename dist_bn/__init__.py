"""dist_bn: exact synchronized batch normalization for Keras 3 with Horovod.

`SyncBatchNormalization` is a drop-in `keras.layers.BatchNormalization` whose
training statistics cover the global batch of all ranks; `sync_moments` is the
distributed `tf.nn.moments`; `convert_sync_batchnorm` converts a model and
`revert_sync_batchnorm` converts it back. For inference: `precise_bn` (and
the `PreciseBN` callback) sets exact population statistics, `fold_batchnorm`
folds BN into the layer before it. `dist_bn.keras` (imported on its own,
`import dist_bn.keras as hvd`) makes Keras 3's `model.fit` work across
Horovod ranks under Horovod's names: `DistributedOptimizer` and callbacks.

Where things live:
  layer.py            SyncBatchNormalization (weights, call; no numerics)
  ops.py              sync_moments, sync_batch_normalization: forward and backward
  moments.py          per-rank moments and their exact merge (pure numerics)
  kernels.py          the normalization itself, TF's fused kernel where it applies
  collectives.py      the all-reduce and the process set it runs in; its
                      transports: mpi_transport.py (+ collective_watchdog.py)
                      and Horovod
  convert.py          convert_sync_batchnorm / revert_sync_batchnorm at any depth
  precise_statistics.py  precise_bn and PreciseBN
  folding.py, export.py  fold_batchnorm; dist-bn-export
  keras/              model.fit across ranks (DistributedOptimizer, callbacks)
  training/           the 3D-conv training job (python -m dist_bn.training),
                      its config schema (training/schema.py) on config/
  verify/, bench/     dist-bn-verify and dist-bn-bench
  reference.py        float64 NumPy batch norm, the tests' and verify's truth
  rank_env.py, keras_backend.py  the launcher's rank variables; the backend check
  open_mpi_waits.py   Open MPI yields the core while waiting where ranks have
                      fewer cores than busy threads (set here, at import)
"""
import importlib

from dist_bn.open_mpi_waits import prefer_yielding_waits as _prefer_yielding_waits

_prefer_yielding_waits()  # before MPI starts (hvd.init()), which reads it

# Public name -> module defining it (no module is named like a public name,
# so `import dist_bn.<module>` never shadows one). Imported on first use (PEP 562), so that
# `import dist_bn.config` or `dist_bn.training.rundir` (the launcher's
# imports) does not start TensorFlow.
_EXPORTS = {
    "PreciseBN": "dist_bn.precise_statistics",
    "SyncBatchNormalization": "dist_bn.layer",
    "convert_sync_batchnorm": "dist_bn.convert",
    "fold_batchnorm": "dist_bn.folding",
    "precise_bn": "dist_bn.precise_statistics",
    "revert_sync_batchnorm": "dist_bn.convert",
    "sync_batch_normalization": "dist_bn.ops",
    "sync_moments": "dist_bn.ops",
}

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


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dist_bn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
