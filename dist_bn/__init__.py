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
import importlib
import sys
import types

# Public name -> module defining it. Imported on first use (PEP 562), so that
# `import dist_bn.config` or `dist_bn.training.rundir` (the launcher's
# imports) does not start TensorFlow.
_EXPORTS = {
    "PreciseBN": "dist_bn.precise_bn",
    "SyncBatchNormalization": "dist_bn.layer",
    "convert_sync_batchnorm": "dist_bn.convert",
    "fold_batchnorm": "dist_bn.folding",
    "precise_bn": "dist_bn.precise_bn",
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


class _Package(types.ModuleType):
    """Keeps an exported name bound to what `_EXPORTS` names when a submodule of
    the same name is imported (`dist_bn.precise_bn`, module and function): the
    import system sets the submodule as an attribute of its package."""

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
