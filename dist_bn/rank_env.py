"""This process's rank and the world's size as the launcher announced them, before Horovod starts.

Launchers say it in environment variables: horovodrun (HOROVOD_*), Open MPI's
mpirun (OMPI_COMM_WORLD_*), MPICH and Intel MPI (PMI_*), PMIx (PMIX_RANK) and
Slurm's srun (SLURM_*). Commands read them to print a usage error once, from
rank 0, and to check their arguments against the world, before anything
collective can hang.
"""
import os

RANK_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")
SIZE_VARIABLES = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")


def _first_number(names):
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def launcher_rank() -> int:
    """This process's rank (0 when no launcher says otherwise: a single process)."""
    rank = _first_number(RANK_VARIABLES)
    return 0 if rank is None else rank


def launcher_size():
    """The number of ranks the launcher started, or None when no launcher says."""
    return _first_number(SIZE_VARIABLES)
