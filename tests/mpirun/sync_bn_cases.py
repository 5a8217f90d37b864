"""Runs on every rank under mpirun/horovodrun: SyncBatchNormalization vs references.

Every rank draws the same global batches from a seed, keeps its own slice,
trains the layer on it, and measures its results against float64 NumPy and
against keras.layers.BatchNormalization, both run on the whole concatenated
batch. Errors are written, per case, to REPORT_DIR/rank<R>.json; the pytest
side (tests/test_mpirun.py) holds the tolerances and asserts.

Usage: python sync_bn_cases.py REPORT_DIR
"""
import dataclasses
import json
import os
import sys
import zlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reference  # noqa: E402

import dist_bn  # noqa: E402

STEPS = 3
MOMENTUM = 0.9
EPSILON = 1e-3


@dataclasses.dataclass
class Case:
    name: str
    sample_shape: tuple  # one sample, channels included
    axis: int
    sizes: str = "equal"  # equal | uneven | one_empty | all_empty
    offset: float = 0.0
    dtype: str = "float32"  # float32 | mixed_float16
    subset: bool = False  # sync within a process set smaller than the world
    tensor_training: bool = False  # training flag as a bool tensor in tf.function

    @property
    def channels(self):
        return self.sample_shape[self.axis - 1 if self.axis > 0 else self.axis]


CASES = [
    Case("dense_2d_equal", (5,), -1),
    Case("dense_2d_uneven", (5,), -1, sizes="uneven"),
    Case("conv2d_nhwc_uneven", (4, 5, 3), -1, sizes="uneven"),
    Case("conv2d_nhwc_one_empty", (4, 5, 3), -1, sizes="one_empty"),
    Case("conv3d_ndhwc_equal", (3, 4, 5, 6), -1, tensor_training=True),
    Case("conv3d_ndhwc_uneven", (3, 4, 5, 6), -1, sizes="uneven", tensor_training=True),
    Case("conv3d_ndhwc_one_empty", (3, 4, 5, 6), -1, sizes="one_empty"),
    Case("conv3d_ncdhw_equal", (6, 3, 4, 5), 1),
    Case("conv3d_ncdhw_uneven", (6, 3, 4, 5), 1, sizes="uneven", tensor_training=True),
    Case("conv3d_ncdhw_one_empty", (6, 3, 4, 5), 1, sizes="one_empty"),
    Case("conv3d_ndhwc_offset_1e3", (3, 4, 5, 6), -1, sizes="uneven", offset=1e3),
    Case("conv3d_ncdhw_offset_1e3", (6, 3, 4, 5), 1, sizes="uneven", offset=1e3),
    Case("conv3d_ndhwc_fp16", (3, 4, 5, 6), -1, sizes="uneven", dtype="mixed_float16"),
    Case("conv3d_ndhwc_all_empty", (3, 4, 5, 6), -1, sizes="all_empty"),
    Case("conv3d_ndhwc_subset", (3, 4, 5, 6), -1, sizes="uneven", subset=True),
]


def batch_sizes(kind, n):
    """Per-rank batch sizes of one step for a group of n ranks."""
    return {
        "equal": [2] * n,
        "uneven": [1 + 2 * i for i in range(n)],
        "one_empty": [0 if i == n - 1 else 2 + i for i in range(n)],
        "all_empty": [0] * n,
    }[kind]


def group_of(case):
    """(process set, its ranks) this rank syncs with in `case`."""
    if case.subset:
        head = list(range(hvd.size() - 1))
        ranks = head if hvd.rank() in head else [hvd.size() - 1]
        return SUBSETS[tuple(ranks)], ranks
    return None, list(range(hvd.size()))


def scaled_error(actual, expected):
    """max |actual - expected| relative to the largest |expected| (or 1 if that is < 1)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if expected.size == 0:
        return 0.0 if actual.size == 0 else float("inf")
    if not np.all(np.isfinite(actual)):
        return float("inf")
    return float(np.max(np.abs(actual - expected)) / max(1.0, np.max(np.abs(expected))))


def make_layer(cls, case, kind):
    kwargs = dict(axis=case.axis, momentum=MOMENTUM, epsilon=EPSILON, dtype=case.dtype,
                  name=f"{kind}_{case.name}")
    if cls is dist_bn.SyncBatchNormalization:
        kwargs["process_set"] = group_of(case)[0]
    layer = cls(**kwargs)
    layer.build((None,) + case.sample_shape)
    c = case.channels
    layer.set_weights([1.0 + 0.1 * np.arange(c), 0.05 * np.arange(c) - 0.1,
                       0.2 * np.ones(c), 1.5 * np.ones(c)])
    return layer


def train_steps(layer, batches, dy, tensor_training):
    """Training steps on `batches`; returns (y, dx, dgamma, dbeta) of the first."""
    dtype = tf.float16 if layer.dtype_policy.name == "mixed_float16" else tf.float32
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


def run_case(case):
    process_set, ranks = group_of(case)
    me = ranks.index(hvd.rank())
    rng = np.random.RandomState(zlib.crc32(case.name.encode()))
    sizes = batch_sizes(case.sizes, len(ranks))
    lo, hi = sum(sizes[:me]), sum(sizes[: me + 1])
    channel_shift = reference._per_channel(np.arange(case.channels), len(case.sample_shape) + 1, case.axis)
    batches = [
        (case.offset * (1 + channel_shift) + (1 + 0.5 * channel_shift)
         * rng.randn(sum(sizes), *case.sample_shape) + channel_shift)
        for _ in range(STEPS)
    ]
    if case.dtype == "mixed_float16":
        batches = [b.astype(np.float16) for b in batches]
    else:
        batches = [b.astype(np.float32) for b in batches]
    dy = rng.randn(sum(sizes), *case.sample_shape).astype(np.float32)

    sync = make_layer(dist_bn.SyncBatchNormalization, case, "sync")
    keras_bn = make_layer(keras.layers.BatchNormalization, case, "keras")
    gamma, beta, mean0, var0 = [w.numpy().astype(np.float64) for w in sync.weights]

    y, dx, dgamma, dbeta = train_steps(sync, [b[lo:hi] for b in batches], dy[lo:hi],
                                       case.tensor_training)
    dgamma = hvd.allreduce(dgamma, op=hvd.Sum, process_set=process_set or hvd.global_process_set,
                           name=f"test/{case.name}/dgamma").numpy()
    dbeta = hvd.allreduce(dbeta, op=hvd.Sum, process_set=process_set or hvd.global_process_set,
                          name=f"test/{case.name}/dbeta").numpy()
    moving = [sync.moving_mean.numpy(), sync.moving_variance.numpy()]

    ref_y = reference.forward(batches[0], case.axis, gamma, beta, EPSILON)
    ref_dx, ref_dgamma, ref_dbeta = reference.backward(batches[0], dy, case.axis, gamma, EPSILON)
    ref_moving = reference.moving_statistics(batches, case.axis, MOMENTUM, mean0, var0)
    k_y, k_dx, k_dgamma, k_dbeta = train_steps(keras_bn, batches, dy, False)
    k_moving = [keras_bn.moving_mean.numpy(), keras_bn.moving_variance.numpy()]

    gathered = hvd.allgather(np.concatenate(moving)[None], name=f"test/{case.name}/moving",
                             process_set=process_set or hvd.global_process_set).numpy()
    bitwise_equal = all(g.tobytes() == gathered[0].tobytes() for g in gathered)

    inference_in = tf.constant(batches[0][lo:hi])
    infer = tf.function(lambda x, t: sync(x, training=t))
    y_inf = infer(inference_in, tf.constant(False)) if case.tensor_training else sync(inference_in, training=False)
    unchanged = all(np.array_equal(a, b.numpy()) for a, b in
                    zip(moving, [sync.moving_mean, sync.moving_variance]))
    ref_inf = ((batches[0][lo:hi].astype(np.float64) - reference._per_channel(moving[0], y.ndim, case.axis))
               / np.sqrt(reference._per_channel(moving[1], y.ndim, case.axis) + EPSILON)
               * reference._per_channel(gamma, y.ndim, case.axis)
               + reference._per_channel(beta, y.ndim, case.axis))

    return {
        "ranks": len(ranks),
        "batch_sizes": sizes,
        "output_dtype": str(y.dtype),
        "vs_numpy": {
            "y": scaled_error(y, ref_y[lo:hi]),
            "dx": scaled_error(dx, ref_dx[lo:hi]),
            "dgamma": scaled_error(dgamma, ref_dgamma),
            "dbeta": scaled_error(dbeta, ref_dbeta),
            "moving_mean": scaled_error(moving[0], ref_moving[0]),
            "moving_variance": scaled_error(moving[1], ref_moving[1]),
            "inference_y": scaled_error(y_inf, ref_inf),
        },
        "vs_keras": {
            "y": scaled_error(y, k_y[lo:hi]),
            "dx": scaled_error(dx, k_dx[lo:hi]),
            "dgamma": scaled_error(dgamma, k_dgamma),
            "dbeta": scaled_error(dbeta, k_dbeta),
            "moving_mean": scaled_error(moving[0], k_moving[0]),
            "moving_variance": scaled_error(moving[1], k_moving[1]),
        },
        "moving_bitwise_equal_across_ranks": bool(bitwise_equal),
        "inference_leaves_moving_unchanged": bool(unchanged),
    }


def run_sync_moments():
    """sync_moments: values and the gradient of the sum of every rank's loss."""
    rng = np.random.RandomState(7)
    sizes = batch_sizes("uneven", hvd.size())
    lo, hi = sum(sizes[: hvd.rank()]), sum(sizes[: hvd.rank() + 1])
    x = (5.0 + rng.randn(sum(sizes), 3, 4, 2)).astype(np.float32)
    a, b = rng.randn(hvd.size(), 2), rng.randn(hvd.size(), 2)
    xl = tf.constant(x[lo:hi])
    with tf.GradientTape() as tape:
        tape.watch(xl)
        mean, var = dist_bn.sync_moments(xl, axes=[0, 1, 2], name="test/sync_moments")
        loss = tf.reduce_sum(a[hvd.rank()] * mean) + tf.reduce_sum(b[hvd.rank()] * var)
    dx = tape.gradient(loss, xl).numpy()
    count, ref_mean, ref_var = reference.moments(x, -1)
    ref_dx = a.sum(0) / count + b.sum(0) * 2 * (x[lo:hi] - ref_mean) / count
    return {"vs_numpy": {"mean": scaled_error(mean, ref_mean), "variance": scaled_error(var, ref_var),
                         "dx": scaled_error(dx, ref_dx)}}


def run_channel_mismatch():
    """Ranks with different channel counts must get a clear error, not a hang."""
    layer = dist_bn.SyncBatchNormalization(name="mismatch")
    x = tf.ones([2, 3, 4 + hvd.rank()])
    try:
        layer(x, training=True)
    except ValueError as error:
        return {"error": str(error)}
    return {"error": None}


def main(report_dir):
    global SUBSETS
    size = int(os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("HOROVOD_SIZE") or 1)
    sets = [hvd.ProcessSet(list(range(size - 1))), hvd.ProcessSet([size - 1])] if size >= 3 else []
    hvd.init(process_sets=sets)
    SUBSETS = {tuple(ps.ranks): ps for ps in sets}
    report = {"world": hvd.size(), "cases": {}}
    for case in CASES:
        if case.subset and hvd.size() < 3:
            continue
        keras.mixed_precision.set_dtype_policy("float32")
        report["cases"][case.name] = run_case(case)
    report["cases"]["sync_moments"] = run_sync_moments()
    report["cases"]["channel_mismatch"] = run_channel_mismatch()
    with open(os.path.join(report_dir, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
