"""The compiled MPI all-reduce kernel (dist_bn/csrc/mpi_allreduce_op.cc), when built.

`python -m dist_bn.build_op` (run by scripts/bootstrap.sh) builds it; a build
whose stamp does not match the source is never loaded. `load()` returns None
when there is none, and `why_unavailable()` says why, so the transport falls
back to the mpi4py path.

The kernel lists the collectives it has in flight; `oldest_inflight` gives the
watchdog the oldest as (age_s, name, sequence, description, ranks), through
the per-collective key this module hands out.
"""
import ctypes
import threading

import tensorflow as tf

_lock = threading.Lock()
_state = {}
_keys = {}
_described = {}


def _load():
    from dist_bn import build_op  # not at import: `python -m dist_bn.build_op` imports this package

    if "module" in _state:
        return _state["module"]
    module, why = None, None
    if not build_op.up_to_date():
        why = ("the MPI all-reduce kernel is not built or is older than its source; "
               "run python -m dist_bn.build_op")
    else:
        try:
            module = tf.load_op_library(str(build_op.LIBRARY))
            library = ctypes.CDLL(str(build_op.LIBRARY))  # the same handle TF opened
            oldest = library.dist_bn_oldest_inflight
            oldest.restype = ctypes.c_int
            oldest.argtypes = [ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_int64),
                               ctypes.POINTER(ctypes.c_int64)]
            _state["oldest"] = oldest
        except (tf.errors.NotFoundError, OSError, AttributeError) as error:
            module, why = None, f"the MPI all-reduce kernel does not load ({error})"
    _state["module"], _state["why"] = module, why
    return module


def load():
    """The op module (with `dist_bn_mpi_allreduce`), or None."""
    with _lock:
        return _load()


def why_unavailable():
    """None when the kernel loads, else the reason."""
    with _lock:
        _load()
        return _state["why"]


def allreduce(payload, sequence, comm_handle, name, name_tag, description, ranks):
    """The kernel's op: float64 1-D `payload` summed over the communicator."""
    described = (name, description, tuple(ranks))
    with _lock:  # one key per collective: eager calls reuse TF's cached kernel
        key = _keys.setdefault(described, len(_keys))
        _described[key] = described
    return load().dist_bn_mpi_allreduce(
        payload, sequence, comm=comm_handle, name_tag=name_tag, key=key,
        collective=name, description=description, ranks=list(ranks), name="dist_bn_mpi_allreduce")


def oldest_inflight():
    """(age_s, name, sequence, description, ranks) of the oldest collective in flight, or None."""
    oldest = _state.get("oldest")
    if oldest is None:
        return None
    age, sequence, key = ctypes.c_double(), ctypes.c_int64(), ctypes.c_int64()
    if oldest(ctypes.byref(age), ctypes.byref(sequence), ctypes.byref(key)) == 0:
        return None
    name, description, ranks = _described.get(key.value, ("?", "?", ()))
    return age.value, name, sequence.value, description, list(ranks)
