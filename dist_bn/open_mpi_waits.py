"""Open MPI's waits where a node's busy threads outnumber its cores.

A blocking MPI call busy-waits. Horovod's background thread makes one every
cycle (1 ms) to coordinate with the other ranks, and the rank whose cycle
starts first waits in it for the others, so one rank keeps a core busy even
when the job is idle (measured here: 3.0 s of CPU in 3 s). Where a node's
ranks, each with that thread beside its compute, outnumber the cores, the
spinning takes the core a rank's compute needs, and every synchronized BN
layer then waits for the rank it slowed: a deep net's step measured 1.29-1.45x
local BN that way, a median of 1.08x over eleven runs (1.07-1.22x) with Open
MPI yielding the core between polls (README, Performance).

Open MPI yields only when `mpi_yield_when_idle` is set, which it does itself
only when it starts more ranks than a node has slots. `prefer_yielding_waits`
(run when `dist_bn` is imported) sets it when a rank has fewer cores than
busy threads: its compute and that background thread. MPI reads it when it
starts (`hvd.init()`), so dist_bn must be imported first; the user's own
setting always wins, and other MPIs ignore the variable.
"""
import os
import sys
import warnings

VARIABLE = "OMPI_MCA_mpi_yield_when_idle"
LOCAL_SIZE_VARIABLE = "OMPI_COMM_WORLD_LOCAL_SIZE"  # set by Open MPI's mpirun (and horovodrun --mpi)
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"  # cgroup v2: "<quota> <period>" or "max <period>"
THREADS_PER_RANK = 2  # TensorFlow's compute and Horovod's background thread


def local_ranks(environ):
    """Open MPI's count of this node's ranks, or None when the user set VARIABLE
    (their setting wins) or Open MPI's mpirun did not start this process."""
    if VARIABLE in environ:
        return None
    local_size = environ.get(LOCAL_SIZE_VARIABLE, "")
    return int(local_size) if local_size.isdigit() and int(local_size) >= 1 else None


def wants_yield(ranks, affinity_cores, node_cores):
    """True when a rank's share of the cores (its own, if bound; else the
    node's, `node_cores`, split over the node's `ranks`, see local_ranks) is
    less than the THREADS_PER_RANK busy threads it runs; False for ranks None."""
    return ranks is not None and THREADS_PER_RANK > min(affinity_cores, node_cores / ranks)


def mpi_started():
    """Whether MPI has already started in this process (through Horovod or mpi4py)."""
    hvd = sys.modules.get("horovod.tensorflow")
    if hvd is not None and hvd.is_initialized():
        return True
    mpi = sys.modules.get("mpi4py.MPI")
    return mpi is not None and mpi.Is_initialized()


def affinity_cores():
    """The cores this process may run on (mpirun's binding narrows them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def node_cores(cpu_max_path=CGROUP_CPU_MAX):
    """The cores the node's ranks share: the CPU count, capped by a container's
    CPU quota (a Kubernetes CPU limit shows as cgroup v2's cpu.max)."""
    cores = os.cpu_count() or 1
    try:
        with open(cpu_max_path) as f:
            quota, period = f.read().split()[:2]
        return cores if quota == "max" else min(cores, int(quota) / int(period))
    except (OSError, ValueError, ZeroDivisionError):
        return cores


def wants_yield_here(environ):
    """`wants_yield` for this process's cores, with `environ` as its environment.

    The cores are only counted (a file read) under Open MPI's mpirun.
    """
    ranks = local_ranks(environ)
    return ranks is not None and wants_yield(ranks, affinity_cores(), node_cores())


def prefer_yielding_waits(environ=None):
    """Set VARIABLE=1 in `environ` (default: this process's) when `wants_yield`,
    unless MPI has already started (then warn with the fix). Returns whether
    it set it."""
    environ = os.environ if environ is None else environ
    if not wants_yield_here(environ):
        return False
    if mpi_started():
        warnings.warn(
            f"dist_bn was imported after MPI started, so Open MPI busy-waits although each rank "
            f"here has fewer cores than busy threads (slower synchronized BN). Import dist_bn before "
            f"hvd.init(), or run with {VARIABLE}=1 (mpirun -x {VARIABLE}=1).", stacklevel=3)
        return False
    environ[VARIABLE] = "1"
    return True
