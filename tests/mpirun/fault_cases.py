"""Runs on every rank under mpirun: a plain training loop into which one fault is injected.

  training_mismatch  rank 1 runs layer bn_a with training=False (the others
                     True) at step 2, so its next collective (bn_b's) meets
                     the others' bn_a: detected on every rank at once;
  skip_call          rank 1 skips the last BN layer at step 2, so the
                     others wait in its collective: the watchdog ends it;
  stop               rank 1 stops itself (SIGSTOP) at step 2: the watchdog
                     of the others ends it;
  stop_in_horovod    rank 1 stops itself after step 2, so rank 0 waits in a
                     Horovod all-reduce: the heartbeat ends it;
  length_mismatch    at step 2, dist_bn.sync_moments of 4 channels on rank 0
                     and 5 on rank 1 (one name): payloads of unequal length,
                     caught by the header before any payload moves.
Each rank prints "step N" after every step it completes. The steps run
eagerly: no rank waits for another's tracing, so a short
DIST_BN_COLLECTIVE_TIMEOUT_S cannot fire before the fault.

Usage: python fault_cases.py FAULT
"""
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import dist_bn  # noqa: E402

FAULT_STEP = 2


def main(fault):
    hvd.init()
    rank = hvd.rank()
    conv = keras.layers.Conv3D(4, 1, use_bias=False)
    bn_a = dist_bn.SyncBatchNormalization(name="bn_a")
    bn_b = dist_bn.SyncBatchNormalization(name="bn_b")
    bn_c = dist_bn.SyncBatchNormalization(name="bn_c")
    x = tf.random.normal([2, 2, 3, 3, 2])

    def step(a_training, call_c):
        with tf.GradientTape() as tape:
            y = bn_b(bn_a(conv(x), training=a_training), training=True)
            if call_c:
                y = bn_c(y, training=True)
            loss = tf.reduce_sum(tf.square(y))
        variables = [w.value for w in conv.trainable_weights + bn_a.trainable_weights
                     + bn_b.trainable_weights + bn_c.trainable_weights]
        grads = hvd.DistributedGradientTape(tape).gradient(loss, variables)
        for variable, grad in zip(variables, grads):
            if grad is not None:
                variable.assign_sub(0.01 * grad)

    for i in range(5):
        faulty = rank == 1 and i == FAULT_STEP
        if faulty and fault == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        a_training = not (faulty and fault == "training_mismatch")
        call_c = not (faulty and fault == "skip_call")
        if fault == "length_mismatch" and i == FAULT_STEP:
            dist_bn.sync_moments(tf.ones([2, 4 + rank]), axes=[0], name="probe")
        step(a_training, call_c)
        print(f"rank {rank} step {i}", flush=True)
        if faulty and fault == "stop_in_horovod":
            os.kill(os.getpid(), signal.SIGSTOP)
        hvd.allreduce(tf.zeros([1]), name=f"end_of_step_{i}")


if __name__ == "__main__":
    main(sys.argv[1])
