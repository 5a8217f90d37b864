"""Runs on every rank under mpirun: each transport of dist_bn's all-reduce, side by side.

Sums of per-rank float64 vectors (lengths 0, 1 and 33; eager and in a
tf.function; a float32 input) through the compiled kernel ('mpi'), mpi4py
and Horovod must equal NumPy's sum of every rank's vector. Then, with the
kernel made unavailable, 'auto' falls back to mpi4py and 'mpi' refuses with
the reason. Rank 0 writes a JSON report.

Usage: python transport_cases.py REPORT
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import horovod.tensorflow as hvd  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dist_bn import collectives, mpi_op  # noqa: E402


def vector(rank, length, dtype=np.float64):
    return np.random.RandomState(100 * rank + length).randn(length).astype(dtype)


def main(report_path):
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    process_set = collectives.resolve_process_set(None)
    report = {"default": collectives.transport_name(), "errors": {}}
    for transport in ("mpi", "mpi4py", "horovod"):
        with collectives.use_transport(transport):
            for length in (0, 1, 33):
                for dtype in (np.float64, np.float32):
                    want = sum(vector(r, length, dtype).astype(np.float64) for r in range(size))
                    x = tf.constant(vector(rank, length, dtype))
                    name = f"probe/{length}/{dtype.__name__}"
                    eager = collectives.allreduce_sum(x, name, process_set)
                    traced = tf.function(lambda: collectives.allreduce_sum(x, name, process_set))()
                    for how, got in (("eager", eager), ("traced", traced)):
                        assert got.dtype == x.dtype and got.shape == x.shape
                        error = float(np.max(np.abs(got.numpy() - want.astype(dtype)), initial=0.0))
                        report["errors"][f"{transport}/{how}/{length}/{dtype.__name__}"] = error
    mpi_op._state.update(module=None, why="the kernel is switched off by this test")
    report["without_kernel"] = collectives.transport_name()
    try:
        with collectives.use_transport("mpi"):
            collectives.transport_name()
        report["forced_without_kernel"] = "no error"
    except RuntimeError as error:
        report["forced_without_kernel"] = str(error)
    if rank == 0:
        with open(report_path, "w") as f:
            json.dump(report, f, indent=1)
    hvd.allreduce(tf.zeros([1]), name="done")  # nobody leaves (and shuts Horovod down) early


if __name__ == "__main__":
    main(sys.argv[1])
