"""Runs on every rank under mpirun: the layer at real sizes and with masks.

Every rank builds the same global batch from a seed and keeps its own uneven
slice. It trains SyncBatchNormalization for one step and measures, against
float64 NumPy on the concatenated batch (dist_bn.reference): the float64
global statistics, the output and input gradient of its slice, gamma's and
beta's gradients summed over ranks, and the moving statistics. Errors go to
REPORT_DIR/rank<R>.json; tests/dist_bn/test_mpirun_exactness.py asserts.

Usage: python exactness_cases.py REPORT_DIR SCALE_CASES(0|1)
"""
import json
import zlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import horovod.tensorflow as hvd  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import dist_bn  # noqa: E402
from dist_bn import SyncBatchNormalization, collectives, moments, ops, reference  # noqa: E402

EPS = 1e-3

# name: (sample shape, channel axis, per-rank batch sizes (cycled), offset, mask)
# mask: None, "random" (rank 1's part fully masked), or "all" (everything masked).
SCALE_CASES = {
    "3.2M_per_rank_offset_1e4": ((16, 56, 56, 2), -1, (64, 24), 1e4, None),
    "401k_per_rank_ncdhw_offset_1e3": ((2, 16, 56, 56), 1, (8, 3), 1e3, None),
}
MASK_CASES = {
    "masked_sequences": ((7, 3), -1, (5, 4, 2), 2.0, "random"),
    "masked_clips_ndhwc": ((2, 4, 4, 3), -1, (3, 2, 1), 1e3, "random"),
    "masked_channels_first": ((3, 4), 1, (4, 3, 2), 0.0, "random"),
    "masked_everywhere": ((5, 3), -1, (2, 3, 1), 1.0, "all"),
}


def scaled(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.size == 0:
        return 0.0
    return float(np.max(np.abs(actual - expected)) / max(1.0, np.max(np.abs(expected))))


def run(name, sample_shape, axis, pattern, offset, mask_kind):
    rank, size = hvd.rank(), hvd.size()
    sizes = [pattern[i % len(pattern)] for i in range(size)]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    shape = (sum(sizes),) + sample_shape
    channels = shape[axis]
    x = rng.standard_normal(shape, dtype=np.float32)
    x += reference.per_channel(offset * (1.0 + np.arange(channels)), len(shape), axis).astype(np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    own = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    mask = None
    if mask_kind == "random":
        mask = rng.random(shape[:-1]) > 0.3
        mask[sizes[0]: sizes[0] + sizes[1]] = False  # rank 1 holds only masked values
    elif mask_kind == "all":
        mask = np.zeros(shape[:-1], bool)
    count, mean, var = reference.moments(x, axis, mask)

    layer = SyncBatchNormalization(axis=axis, momentum=0.0, epsilon=EPS, name=name)
    xt = tf.constant(x[own])
    own_mask = None if mask is None else tf.constant(mask[own])
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt, training=True, mask=own_mask)
        loss = tf.reduce_sum(y * dy[own])
    dx, dgamma, dbeta = tape.gradient(loss, [xt, layer.gamma, layer.beta])
    dgamma = hvd.allreduce(dgamma, op=hvd.Sum, name=f"{name}/dgamma")
    dbeta = hvd.allreduce(dbeta, op=hvd.Sum, name=f"{name}/dbeta")

    ones = np.ones(channels)
    ref_dx, ref_dgamma, ref_dbeta = reference.backward(x, dy, axis, ones, EPS, mask)
    result = {
        "sizes": sizes,
        "y": scaled(y, reference.forward(x, axis, ones, 0 * ones, EPS, mask)[own]),
        "dx": scaled(dx, ref_dx[own]),
        "dgamma": scaled(dgamma, ref_dgamma),
        "dbeta": scaled(dbeta, ref_dbeta),
    }
    result["moving_digest"] = zlib.crc32(layer.moving_mean.numpy().tobytes()
                                         + layer.moving_variance.numpy().tobytes())
    if mask_kind == "all":
        result["moving_untouched"] = bool(
            np.all(layer.moving_mean.numpy() == 0) and np.all(layer.moving_variance.numpy() == 1))
    else:
        # The moving mean is float32: the float64 truth rounded, so within an
        # ulp of it (the "floor", in std) plus what the statistics got wrong.
        std = np.sqrt(var)
        result["moving_mean_std"] = float(np.max(np.abs(layer.moving_mean.numpy() - mean) / std))
        result["moving_mean_floor"] = float(np.max(np.spacing(np.abs(mean).astype(np.float32)) / std))
        result["moving_variance_rel"] = float(np.max(np.abs(layer.moving_variance.numpy() / var - 1)))
    if mask is None:
        axes = moments.reduction_axes(len(shape), axis)
        n, mean64, var64 = ops.global_moments(
            xt, axes, f"{name}/global", collectives.resolve_process_set(None))
        result["count_exact"] = bool(n.numpy() == count)
        result["mean_std"] = float(np.max(np.abs(mean64.numpy() - mean) / np.sqrt(var)))
        result["variance_rel"] = float(np.max(np.abs(var64.numpy() / var - 1)))
        sm_mean, sm_var = dist_bn.sync_moments(xt, axes, name=f"{name}/sync_moments")
        result["sync_moments_mean_rel"] = float(np.max(np.abs(sm_mean.numpy() / mean - 1)))
        result["sync_moments_variance_rel"] = float(np.max(np.abs(sm_var.numpy() / var - 1)))
    return result


def main(report_dir, scale_cases):
    hvd.init()
    cases = dict(MASK_CASES, **(SCALE_CASES if scale_cases == "1" else {}))
    report = {"world": hvd.size(), "cases": {name: run(name, *spec) for name, spec in cases.items()}}
    with open(os.path.join(report_dir, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
