"""Runs on every rank under mpirun: training Conv3D -> SyncBN with one empty shard.

oneDNN's CPU Conv3D (TF 2.18, TF_ENABLE_ONEDNN_OPTS=1, the default on many
Xeons) returns an empty batch shaped like its *input*: (0, 4, 8, 8, 3) in, (0,
4, 8, 8, 3) out instead of 8 channels. The last rank gets no clips, so its
SyncBatchNormalization layers see exactly that (a conv before BN has no bias,
whose add would fail first). Every rank trains a small 3D
conv net for several SGD steps, eagerly and in a tf.function, on its slice of the same global batches
(gradients summed with Horovod), and also trains, in one process, the same
net with Keras's BatchNormalization on the concatenated batches; it writes
the worst relative difference of every weight (moving statistics included)
to REPORT_DIR/rank<R>.json.

Usage: python empty_shard_training.py REPORT_DIR
"""
import json
import os
import sys

os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"  # the Conv3D whose empty output is misshapen
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dist_bn import SyncBatchNormalization  # noqa: E402

STEPS = 4
CLIP = (4, 8, 8, 3)
CLASSES = 4
LEARNING_RATE = 0.5


def build(norm):
    keras.utils.set_random_seed(7)  # the same initial weights for both nets, on every rank
    return keras.Sequential([
        keras.Input(CLIP),
        keras.layers.Conv3D(8, 3, padding="same", use_bias=False), norm(), keras.layers.ReLU(),
        keras.layers.Conv3D(8, 3, padding="same", use_bias=False), norm(), keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling3D(), keras.layers.Dense(CLASSES),
    ])


def sgd_step(model, x, y, global_batch, reduce):
    variables = [v.value for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        loss = loss / global_batch
    grads = [reduce(g, i) for i, g in enumerate(tape.gradient(loss, variables))]
    for v, g in zip(variables, grads):
        v.assign_sub(LEARNING_RATE * g)


def summed_over_ranks(gradient, index):
    return hvd.allreduce(gradient, op=hvd.Sum, name=f"grad/{index}")


def unchanged(gradient, index):
    return gradient


def main(report_dir):
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    sizes = [4, 2] + [0] * (size - 2) if size > 2 else [4, 0]
    own = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    rng = np.random.default_rng(0)
    ours, reference = build(SyncBatchNormalization), build(keras.layers.BatchNormalization)
    conv_out_shape = None
    graph_step = tf.function(sgd_step)
    for step in range(STEPS):
        train = sgd_step if step < STEPS // 2 else graph_step
        x = (1.0 + rng.standard_normal((sum(sizes),) + CLIP)).astype(np.float32)
        y = rng.integers(0, CLASSES, sum(sizes))
        if sizes[rank] == 0:
            conv_out_shape = ours.layers[0](x[own]).shape.as_list()
        train(ours, x[own], y[own], sum(sizes), summed_over_ranks)
        train(reference, x, y, sum(sizes), unchanged)
    worst = max(
        float(np.max(np.abs(a.numpy() - b.numpy())) / max(1e-3, np.max(np.abs(b.numpy()))))
        for a, b in zip(ours.weights, reference.weights)
    )
    report = {"sizes": sizes, "worst_weight_error": worst, "empty_conv_output_shape": conv_out_shape}
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1])
