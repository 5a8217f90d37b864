"""`load_model`: a saved model with its optimizer wrapped in `DistributedOptimizer`.

A saved model records its base optimizer (see `dist_bn.keras.optimizer`);
this loads it with Keras and wraps that optimizer again, its state (slots,
iterations) carried over, so training resumes across ranks where it stopped.
"""
import keras

from dist_bn.keras.optimizer import DistributedOptimizer


def load_model(filepath, custom_objects=None, compile=True, safe_mode=True, **distributed_kwargs):
    """`keras.saving.load_model(...)`, the optimizer wrapped by `DistributedOptimizer(**distributed_kwargs)`.

    `distributed_kwargs` are DistributedOptimizer's (`op`, `compression`,
    `sparse_as_dense`, ...). A model saved without an optimizer, or loaded
    with `compile=False`, is returned as loaded.
    """
    model = keras.saving.load_model(filepath, custom_objects=custom_objects, compile=compile,
                                    safe_mode=safe_mode)
    if getattr(model, "optimizer", None) is not None:
        model.optimizer = DistributedOptimizer(model.optimizer, **distributed_kwargs)
    return model
