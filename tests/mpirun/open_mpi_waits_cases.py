"""Runs on every rank under mpirun: does Open MPI yield while waiting, as dist_bn set it?

Imports dist_bn before or after hvd.init() (argument ORDER), then reads
Open MPI's own `mpi_yield_when_idle` through the MPI tool interface (MPI_T),
which shows what MPI took, not what the environment says. Each rank writes
OUT_DIR/rank<r>.json with the variable, Open MPI's value and the warnings.

Usage: python open_mpi_waits_cases.py before|after OUT_DIR
"""
import ctypes
import ctypes.util
import json
import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def open_mpi_yields():
    """Open MPI's mpi_yield_when_idle (a C bool) read through MPI_T."""
    libmpi = ctypes.CDLL(ctypes.util.find_library("mpi"), mode=ctypes.RTLD_GLOBAL)
    provided, index, count = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    handle, value = ctypes.c_void_p(), ctypes.c_int(0)
    assert libmpi.MPI_T_init_thread(3, ctypes.byref(provided)) == 0
    assert libmpi.MPI_T_cvar_get_index(b"mpi_yield_when_idle", ctypes.byref(index)) == 0
    assert libmpi.MPI_T_cvar_handle_alloc(index, None, ctypes.byref(handle), ctypes.byref(count)) == 0
    assert libmpi.MPI_T_cvar_read(handle, ctypes.byref(value)) == 0
    return bool(value.value & 0xFF)


def main(order, out_dir):
    import horovod.tensorflow as hvd
    import tensorflow as tf

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if order == "before":
            import dist_bn  # noqa: F401
            hvd.init()
        else:
            hvd.init()
            import dist_bn  # noqa: F401
    report = {"variable": os.environ.get("OMPI_MCA_mpi_yield_when_idle"),
              "open_mpi_yields": open_mpi_yields(),
              "warnings": [str(w.message) for w in caught if "dist_bn" in str(w.message)]}
    with open(os.path.join(out_dir, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump(report, f)
    hvd.allreduce(tf.zeros([1]), name="done")  # nobody leaves (and shuts Horovod down) early


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
