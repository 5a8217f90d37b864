"""`DistributedOptimizer`: any Keras 3 optimizer, its gradients all-reduced over ranks.

Horovod's own `horovod.tensorflow.keras.DistributedOptimizer` needs Keras 2.
This one wraps a `keras.optimizers.Optimizer` the way Horovod does: a
subclass of the optimizer's own class, created on the fly, that has the same
name and module, so a saved model records (and loads with) the base optimizer
and nothing of dist_bn or Horovod. Its only change is `apply`, which every
Keras path goes through (`model.fit`, `train_on_batch`, `apply_gradients` in
a custom loop): the gradients are all-reduced first, in one
`hvd.grouped_allreduce` so Horovod can fuse them, sparse gradients
(`tf.IndexedSlices`, e.g. from `Embedding`) by allgather as Horovod does, or
densified with `sparse_as_dense=True`.

Mixed precision: wrap the `LossScaleOptimizer` (Keras then does not wrap it
again in `compile`), so the scaled gradients are reduced before the finite
check and every rank takes the same branch. A `LossScaleOptimizer` around a
DistributedOptimizer would check finiteness per rank, and ranks that disagree
would hang in the all-reduce; `BroadcastGlobalVariablesCallback` refuses it.
"""
import horovod.tensorflow as hvd
import keras
import tensorflow as tf

from dist_bn import keras_backend

_MARK = "_dist_bn_allreduce"


def is_distributed(optimizer):
    """Whether `optimizer` was made by `DistributedOptimizer`."""
    return hasattr(type(optimizer), _MARK)


def allreduce_gradients(grads, op=hvd.Average, compression=hvd.Compression.none,
                        sparse_as_dense=False, gradient_predivide_factor=1.0,
                        process_set=hvd.global_process_set):
    """`grads` reduced over the process set in one grouped all-reduce; None stays None.

    The identity when Horovod is not initialized or the set has one rank.
    """
    if not hvd.is_initialized() or process_set.size() == 1:
        return list(grads)
    present = [i for i, g in enumerate(grads) if g is not None]
    tensors = []
    for i in present:
        g = grads[i]
        if sparse_as_dense and isinstance(g, tf.IndexedSlices):
            g = tf.convert_to_tensor(g)
        tensors.append(g)
    prescale = postscale = 1.0
    if gradient_predivide_factor != 1.0:
        if op != hvd.Average:
            raise ValueError("gradient_predivide_factor needs op=hvd.Average; "
                             f"got op={op!r}")
        op = hvd.Sum
        prescale = 1.0 / gradient_predivide_factor
        postscale = gradient_predivide_factor / process_set.size()
    reduced = hvd.grouped_allreduce(tensors, op=op, compression=compression,
                                    prescale_factor=prescale, postscale_factor=postscale,
                                    process_set=process_set)
    out = list(grads)
    for i, g in zip(present, reduced):
        out[i] = g
    return out


def DistributedOptimizer(optimizer, name=None, compression=hvd.Compression.none,
                         sparse_as_dense=False, op=hvd.Average, gradient_predivide_factor=1.0,
                         process_set=hvd.global_process_set):
    """`optimizer` as an optimizer of the same class whose gradients are all-reduced.

    Arguments are Horovod's (`op`: hvd.Average or hvd.Sum, `compression`,
    `sparse_as_dense`, `gradient_predivide_factor`, `process_set`); `name`
    renames the optimizer. The returned optimizer is built from
    `optimizer.get_config()`; a built `optimizer`'s state (iterations, slots)
    is carried over.
    """
    keras_backend.require_tensorflow("DistributedOptimizer")
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError("DistributedOptimizer wraps a keras.optimizers.Optimizer; got "
                        f"{type(optimizer).__name__}. Pass e.g. keras.optimizers.SGD(...).")
    if is_distributed(optimizer):
        raise ValueError("This optimizer is already a DistributedOptimizer; wrap it once.")
    if op not in (hvd.Average, hvd.Sum):
        raise ValueError(f"DistributedOptimizer supports op=hvd.Average or hvd.Sum; got {op!r}.")
    if optimizer.built and isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        raise ValueError("Wrap the LossScaleOptimizer before it is built (before fit or "
                         "compile's build), or rebuild it from its config.")
    base = type(optimizer)
    reduce_options = dict(op=op, compression=compression, sparse_as_dense=sparse_as_dense,
                          gradient_predivide_factor=gradient_predivide_factor,
                          process_set=process_set)

    def apply(self, grads, trainable_variables=None):
        grads = allreduce_gradients(list(grads), **reduce_options)
        return super(cls, self).apply(grads, trainable_variables)

    cls = type(base.__name__, (base,), {
        "apply": apply,
        _MARK: True,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
    })
    config = optimizer.get_config()
    if name is not None:
        config["name"] = name
    distributed = cls.from_config(config)
    if optimizer.built:
        state = {}
        optimizer.save_own_variables(state)
        distributed.build(optimizer._trainable_variables)
        distributed.load_own_variables(state)
    return distributed
