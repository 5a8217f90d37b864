"""Runs on every rank under mpirun: two parallel pathways, same channel count.

Each pathway's BN layers have 4 channels, so a collective paired with the
other pathway's would not be caught by its shape. TensorFlow runs the
pathways with 4 inter-op threads, in whatever order suits each rank (their
batch sizes differ, so do their timings). A few SGD steps, eager, in a
tf.function with training=True and with a training tensor (the layer's
tf.cond), must give the weights and moving statistics that one process gets
with Keras's BatchNormalization on the concatenated batch.

Usage: python ordering_cases.py REPORT_DIR
"""
import json
import os
import sys

os.environ["TF_NUM_INTEROP_THREADS"] = "4"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import dist_bn  # noqa: E402
from dist_bn import collectives, mpi_transport  # noqa: E402

CLIP = (2, 5, 5, 3)
LEARNING_RATE = 0.1


def two_pathway_model(bn):
    """A heavy pathway (three convs) beside a light one, 4 channels throughout."""
    inputs = keras.Input(CLIP)
    a = inputs
    for i, kernel in enumerate((3, 3, 1)):
        a = keras.layers.Conv3D(4, kernel, padding="same", use_bias=False, name=f"a_conv{i}")(a)
        a = keras.layers.ReLU()(bn(momentum=0.5, name=f"a_bn{i}")(a))
    b = keras.layers.Conv3D(4, 1, use_bias=False, name="b_conv0")(inputs)
    b = bn(momentum=0.5, name="b_bn0")(b)
    b = keras.layers.ReLU()(bn(momentum=0.5, name="b_bn1")(b))
    x = keras.layers.Concatenate()([a, b])
    x = keras.layers.GlobalAveragePooling3D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


def sgd_step(model, x, y, total, training, distributed):
    """One SGD step on loss = sum of squared errors / global batch size."""
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(model(x, training=training) - y)) / total
    if distributed:
        tape = hvd.DistributedGradientTape(tape, op=hvd.Sum)
    variables = [w.value for w in model.trainable_weights]
    for variable, grad in zip(variables, tape.gradient(loss, variables)):
        variable.assign_sub(LEARNING_RATE * grad)
    return loss


def main(report_dir):
    tf.config.threading.set_inter_op_parallelism_threads(4)
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    sizes = [3 + 2 * r for r in range(size)]  # uneven: timings differ per rank
    total = sum(sizes)
    rng = np.random.RandomState(0)
    x_all = rng.randn(total, *CLIP).astype(np.float32) * 2 + 1
    y_all = rng.randn(total, 3).astype(np.float32)
    start = sum(sizes[:rank])
    x, y = tf.constant(x_all[start:start + sizes[rank]]), tf.constant(y_all[start:start + sizes[rank]])

    keras.utils.set_random_seed(1)
    model = two_pathway_model(dist_bn.SyncBatchNormalization)
    reference = two_pathway_model(keras.layers.BatchNormalization)
    reference.set_weights(model.get_weights())

    python_bool = tf.function(lambda: sgd_step(model, x, y, total, True, True))
    tensor_flag = tf.function(lambda flag: sgd_step(model, x, y, total, flag, True))
    steps = [lambda: sgd_step(model, x, y, total, True, True), python_bool, python_bool,
             lambda: tensor_flag(tf.constant(True)), lambda: tensor_flag(tf.constant(True))]
    # Asked while every rank is still in the job: once one rank leaves,
    # Horovod shuts down on all of them and the answer would be "horovod".
    transport = collectives.transport_name()
    for step in steps:
        step()
        sgd_step(reference, tf.constant(x_all), tf.constant(y_all), total, True, False)

    errors = {}
    for got, want in zip(model.weights, reference.weights):
        scale = max(1.0, float(np.max(np.abs(want.numpy()))))
        errors[got.path] = float(np.max(np.abs(got.numpy() - want.numpy()))) / scale
    report = {"world": size, "transport": transport,
              "paths": sorted("kernel" if compiled else "mpi4py"
                              for (_, _, compiled) in mpi_transport._TRANSPORTS),
              "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
              "steps": len(steps), "errors": errors}
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
