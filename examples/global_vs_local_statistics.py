"""Two ranks, two very different halves of a batch: what each rank's BN sees.

Rank r holds clips whose values are centred on 4*r, with r+1 clips (uneven
on purpose). Keras's BatchNormalization normalizes each half with its own
statistics; SyncBatchNormalization uses the statistics of the whole batch.
Run: mpirun -np 2 python examples/global_vs_local_statistics.py
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import dist_bn  # noqa: E402

hvd.init()
rank, size = hvd.rank(), hvd.size()
clips = tf.constant(4.0 * rank + np.random.RandomState(rank).randn(rank + 1, 4, 8, 8, 2), tf.float32)

local_bn = keras.layers.BatchNormalization(momentum=0.0)
sync_bn = dist_bn.SyncBatchNormalization(momentum=0.0)
local_bn(clips, training=True)
sync_bn(clips, training=True)
everything = hvd.allgather(clips, name="demo/all_clips")  # only to print the truth
true_mean, true_var = tf.nn.moments(everything, axes=[0, 1, 2, 3])

lines = [
    f"rank {rank}/{size}: {clips.shape[0]} clips",
    f"  local  BN mean {np.round(local_bn.moving_mean.numpy(), 4)} var {np.round(local_bn.moving_variance.numpy(), 4)}",
    f"  sync   BN mean {np.round(sync_bn.moving_mean.numpy(), 4)} var {np.round(sync_bn.moving_variance.numpy(), 4)}",
    f"  global truth   {np.round(true_mean.numpy(), 4)} var {np.round(true_var.numpy(), 4)}",
]
for r in range(size):  # print in rank order
    if r == rank:
        print("\n".join(lines), flush=True)
    hvd.allreduce(tf.zeros([1]), name=f"demo/barrier{r}")
if rank == 0:
    print("SyncBatchNormalization matches the global statistics on every rank; local BN does not.")
