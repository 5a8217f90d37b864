#!/usr/bin/env python
"""Exactness at the sizes video networks produce, beside Keras's and Horovod's layers.

Run on every rank, e.g. `mpirun -np 2 .venv/bin/python scripts/precision_at_scale.py`.
Each size class is a global batch of float32 clips (channel c has mean
offset * (1 + c), std 1) split unevenly over the ranks. Rank 0 prints, per
class and layer, the worst over ranks and channels of: |batch mean - truth| /
std, |batch variance / truth - 1| (both read from the moving statistics after
one step at momentum 0) and max |output - truth| / max |truth|, where truth is
float64 NumPy on the concatenated batch. The moving mean is a float32
variable, so no layer can beat the float32 rounding of the true mean, printed
as the floor. Anchors in the same run:
`keras.layers.BatchNormalization` on the whole concatenated batch in one
process, and Horovod's `SyncBatchNormalization` (through tf-keras) on the
same uneven slices.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["TF_USE_LEGACY_KERAS"] = "1"  # tf.keras is tf-keras: Horovod's layer needs Keras 2

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402  (Keras 3)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dist_bn import SyncBatchNormalization, reference  # noqa: E402

EPSILON = 1e-3
# name: (clip shape, offset, clips per rank of a 2-rank world; repeated for more)
CLASSES = {
    "8x16x56x56 (401k) / 3 clips, |mean|/std 1e3": ((16, 56, 56, 2), 1e3, (8, 3)),
    "32x16x56x56 (1.6M) / 12 clips, mean 0.1": ((16, 56, 56, 2), 0.1, (32, 12)),
    "64x16x56x56 (3.2M) / 24 clips, |mean|/std 1e4": ((16, 56, 56, 2), 1e4, (64, 24)),
}


def global_batch(shape, offset, sizes):
    rng = np.random.default_rng(int(offset * 10) + sum(sizes))
    x = rng.standard_normal((sum(sizes),) + shape, dtype=np.float32)
    x += (offset * (1.0 + np.arange(shape[-1]))).astype(np.float32)
    return x


def errors(layer, x, truth, own):
    """Worst mean, variance and output errors of one training step of `layer`."""
    _, mean, var = truth
    y = layer(tf.constant(x[own]), training=True)
    ref_y = reference.forward(x, -1, np.ones(len(mean)), np.zeros(len(mean)), EPSILON)
    moving_mean, moving_var = (np.asarray(v, np.float64) for v in layer.weights[2:4])
    return [np.max(np.abs(moving_mean - mean) / np.sqrt(var)),
            np.max(np.abs(moving_var / var - 1)),
            np.max(np.abs(np.asarray(y, np.float64) - ref_y[own])) / np.max(np.abs(ref_y))]


def main():
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    rows = []
    for name, (shape, offset, pattern) in CLASSES.items():
        sizes = [pattern[i % len(pattern)] for i in range(size)]
        x = global_batch(shape, offset, sizes)
        own = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        truth = reference.moments(x, -1)
        floor = np.max(np.abs(truth[1].astype(np.float32) - truth[1]) / np.sqrt(truth[2]))
        layers = {
            "dist_bn SyncBatchNormalization": SyncBatchNormalization(momentum=0.0, epsilon=EPSILON),
            "horovod SyncBatchNormalization": hvd.SyncBatchNormalization(momentum=0.0, epsilon=EPSILON),
        }
        for layer_name, layer in layers.items():
            worst = hvd.allreduce(tf.constant(errors(layer, x, truth, own), tf.float64), op=hvd.Max,
                                  name=f"{name}/{layer_name}").numpy()
            rows.append((name, layer_name, floor, *worst))
        # Keras's layer in one process on the whole batch (each rank the same).
        keras_bn = keras.layers.BatchNormalization(momentum=0.0, epsilon=EPSILON)
        rows.append((name, "keras BatchNormalization, 1 process", floor,
                     *errors(keras_bn, x, truth, slice(None))))
        del x
    if rank == 0:
        print(f"{size} ranks, float32 inputs; truth: float64 NumPy on the concatenated batch\n")
        print("| values per channel on rank 0 / rank 1 | layer | mean error (std; float32 floor) "
              "| variance error (rel.) | output error |")
        print("|---|---|---|---|---|")
        for name, layer_name, floor, mean_err, var_err, y_err in rows:
            print(f"| {name} | {layer_name} | {mean_err:.1e} ({floor:.1e}) | {var_err:.1e} | {y_err:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
