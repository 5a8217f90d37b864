"""Running one case on this rank: the layer trained on the rank's slice, measured against the references.

Every rank of a process set calls the same function with the same arguments:
the batches are the same everywhere (`dist_bn.verify.cases`), each rank keeps
its own slice, and the errors come back as plain data for
`dist_bn.verify.judge`.
"""
from __future__ import annotations

import re

from dist_bn.verify.cases import EPSILON, MOMENTUM, STEPS, Case, batch_sizes, global_batches
from dist_bn.verify.judge import scaled_error, training_errors
from dist_bn.verify.world import Group


def _input_dtype(case: Case):
    import tensorflow as tf

    return {"mixed_float16": tf.float16, "mixed_bfloat16": tf.bfloat16}.get(case.dtype, tf.float32)


def make_layer(cls, case: Case, name: str, process_set=None):
    """A built layer of `cls` (SyncBatchNormalization or Keras's) with fixed,
    non-trivial weights."""
    import numpy as np

    import dist_bn

    kwargs = dict(axis=case.axis, momentum=MOMENTUM, epsilon=EPSILON, dtype=case.dtype, name=name)
    if cls is dist_bn.SyncBatchNormalization:
        kwargs["process_set"] = process_set
    layer = cls(**kwargs)
    layer.build((None,) + case.sample_shape)
    c = case.channels
    layer.set_weights([1.0 + 0.1 * np.arange(c), 0.05 * np.arange(c) - 0.1,
                       0.2 * np.ones(c), 1.5 * np.ones(c)])
    return layer


def train_steps(layer, batches, dy, tensor_training: bool, dtype):
    """Training steps on `batches`; returns (y, dx, dgamma, dbeta) of the first."""
    import tensorflow as tf

    call = tf.function(lambda x, t: layer(x, training=t)) if tensor_training else None
    results = None
    for x in batches:
        x = tf.constant(x, dtype)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = call(x, tf.constant(True)) if call else layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * dy)
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        if results is None:
            results = [y.numpy()] + [g.numpy() for g in grads]
    return results


def run_case(case: Case, group: Group, compare_keras: bool = False, steps: int = STEPS,
             prefix: str = "verify") -> dict:
    """Run `case` on this rank within `group` and measure it against the
    float64 reference on the group's global batch (and, with compare_keras,
    against keras.layers.BatchNormalization run on that whole batch, unless
    that batch is empty).

    Every rank of the group must call it with the same arguments. Returns
    plain data: errors per metric (see `scaled_error`) and boolean checks.
    """
    import horovod.tensorflow as hvd
    import keras
    import numpy as np
    import tensorflow as tf

    import dist_bn
    from dist_bn import ops, reference

    keras.mixed_precision.set_dtype_policy("float32")
    ranks = list(group.ranks)
    me = ranks.index(hvd.rank())
    sizes = batch_sizes(case.sizes, len(ranks))
    lo, hi = sum(sizes[:me]), sum(sizes[: me + 1])
    batches, dy = global_batches(case, sum(sizes), steps)
    dtype = _input_dtype(case)
    tag = f"{prefix}/{group.label}/{case.dtype}/{case.name}".replace(":", "_").replace(",", "_")
    layer_tag = re.sub(r"[^A-Za-z0-9_]", "_", tag)

    # The op behind the layer, once: the synchronized statistics themselves.
    gamma0 = 1.0 + 0.1 * np.arange(case.channels)
    beta0 = 0.05 * np.arange(case.channels) - 0.1
    first = tf.constant(batches[0][lo:hi], dtype)
    compute = ops.compute_dtype(dtype)
    _, stat_mean, stat_var, stat_count = dist_bn.sync_batch_normalization(
        tf.cast(first, compute), tf.constant(gamma0, compute), tf.constant(beta0, compute),
        case.axis, EPSILON, process_set=group.horovod_set, name=f"{tag}/statistics")
    ref_count, ref_mean, ref_var = reference.moments(batches[0], case.axis)

    sync = make_layer(dist_bn.SyncBatchNormalization, case, f"sync_{layer_tag}", group.horovod_set)
    gamma, beta, mean0, var0 = [w.numpy().astype(np.float64) for w in sync.weights]
    y, dx, dgamma, dbeta = train_steps(sync, [b[lo:hi] for b in batches], dy[lo:hi],
                                       case.tensor_training, dtype)
    dgamma = hvd.allreduce(dgamma, op=hvd.Sum, process_set=group.horovod_set, name=f"{tag}/dgamma").numpy()
    dbeta = hvd.allreduce(dbeta, op=hvd.Sum, process_set=group.horovod_set, name=f"{tag}/dbeta").numpy()
    moving = [sync.moving_mean.numpy(), sync.moving_variance.numpy()]
    ours = (y, dx, dgamma, dbeta, *moving)

    ref_y = reference.forward(batches[0], case.axis, gamma, beta, EPSILON)
    ref_dx, ref_dgamma, ref_dbeta = reference.backward(batches[0], dy, case.axis, gamma, EPSILON)
    ref_moving = reference.moving_statistics(batches, case.axis, MOMENTUM, mean0, var0)

    gathered = hvd.allgather(np.concatenate(moving)[None], name=f"{tag}/moving",
                             process_set=group.horovod_set).numpy()
    bitwise_equal = all(g.tobytes() == gathered[0].tobytes() for g in gathered)

    inference_in = tf.constant(batches[0][lo:hi], dtype)
    if case.tensor_training:
        y_inf = tf.function(lambda x, t: sync(x, training=t))(inference_in, tf.constant(False))
    else:
        y_inf = sync(inference_in, training=False)
    unchanged = all(np.array_equal(a, b.numpy()) for a, b in
                    zip(moving, [sync.moving_mean, sync.moving_variance]))
    ref_inf = reference.normalize(batches[0][lo:hi], case.axis, moving[0], moving[1], gamma, beta, EPSILON)

    result = {
        "case": case.as_dict(),
        "ranks": len(ranks),
        "batch_sizes": sizes,
        "output_dtype": y.dtype.name,
        "statistics": {
            "mean": scaled_error(stat_mean, ref_mean),
            "variance": scaled_error(stat_var, ref_var),
        },
        "count_exact": int(stat_count) == ref_count,
        "vs_numpy": {
            **training_errors(ours, (ref_y, ref_dx, ref_dgamma, ref_dbeta, *ref_moving), lo, hi),
            "inference_y": scaled_error(y_inf, ref_inf),
        },
        "moving_bitwise_equal_across_ranks": bool(bitwise_equal),
        "inference_leaves_moving_unchanged": bool(unchanged),
    }
    if compare_keras and sum(sizes):  # Keras's layer gives NaN statistics for an empty batch
        keras_bn = make_layer(keras.layers.BatchNormalization, case, f"keras_{layer_tag}")
        k_y, k_dx, k_dgamma, k_dbeta = train_steps(keras_bn, batches, dy, False, dtype)
        k_moving = [keras_bn.moving_mean.numpy(), keras_bn.moving_variance.numpy()]
        result["vs_keras"] = training_errors(ours, (k_y, k_dx, k_dgamma, k_dbeta, *k_moving), lo, hi)
    return result


def run_sync_moments(name: str = "test/sync_moments") -> dict:
    """sync_moments over all ranks: values and the gradient of the sum of every
    rank's loss, against float64 NumPy."""
    import horovod.tensorflow as hvd
    import numpy as np
    import tensorflow as tf

    import dist_bn
    from dist_bn import reference

    rng = np.random.RandomState(7)
    sizes = batch_sizes("uneven", hvd.size())
    lo, hi = sum(sizes[: hvd.rank()]), sum(sizes[: hvd.rank() + 1])
    x = (5.0 + rng.randn(sum(sizes), 3, 4, 2)).astype(np.float32)
    a, b = rng.randn(hvd.size(), 2), rng.randn(hvd.size(), 2)
    xl = tf.constant(x[lo:hi])
    with tf.GradientTape() as tape:
        tape.watch(xl)
        mean, var = dist_bn.sync_moments(xl, axes=[0, 1, 2], name=name)
        loss = tf.reduce_sum(a[hvd.rank()] * mean) + tf.reduce_sum(b[hvd.rank()] * var)
    dx = tape.gradient(loss, xl).numpy()
    count, ref_mean, ref_var = reference.moments(x, -1)
    ref_dx = a.sum(0) / count + b.sum(0) * 2 * (x[lo:hi] - ref_mean) / count
    return {"vs_numpy": {"mean": scaled_error(mean, ref_mean), "variance": scaled_error(var, ref_var),
                         "dx": scaled_error(dx, ref_dx)}}


def run_channel_mismatch(name: str = "mismatch") -> dict:
    """Ranks with different channel counts must get a clear error, not a hang."""
    import horovod.tensorflow as hvd
    import tensorflow as tf

    import dist_bn

    layer = dist_bn.SyncBatchNormalization(name=name)
    x = tf.ones([2, 3, 4 + hvd.rank()])
    try:
        layer(x, training=True)
    except ValueError as error:
        return {"error": str(error)}
    return {"error": None}
