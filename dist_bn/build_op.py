"""Compiles dist_bn's MPI all-reduce kernel (dist_bn/csrc/mpi_allreduce_op.cc).

    python -m dist_bn.build_op          # what scripts/bootstrap.sh runs

Like Horovod's own ops, the kernel is compiled against the installed
TensorFlow's headers (`tf.sysconfig`) and the MPI that `mpicxx` wraps, so
Horovod, mpi4py and the kernel share one libmpi. The shared object lands next
to the source with a stamp: the hash of the source and of every flag. A run
with an up-to-date stamp does nothing; `dist_bn.mpi_op` loads the object only
when the stamp matches, so a stale build is never used (the mpi4py path is,
and `collectives.transport_name()` says so).
"""
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "csrc" / "mpi_allreduce_op.cc"
LIBRARY = SOURCE.with_suffix(".so")
STAMP = SOURCE.with_suffix(".so.stamp")


def _mpicxx_flags():
    """Open MPI's (or MPICH's) compile and link flags, from mpicxx."""
    mpicxx = shutil.which("mpicxx")
    if mpicxx is None:
        raise RuntimeError("mpicxx not found: install the MPI development package "
                           "(Debian: apt-get install libopenmpi-dev), then rerun python -m dist_bn.build_op.")
    show = lambda what: shlex.split(subprocess.check_output([mpicxx, f"--showme:{what}"], text=True))  # noqa: E731
    try:
        return show("compile"), [f for f in show("link") if f != "-lmpi_cxx"]
    except (OSError, subprocess.CalledProcessError):  # MPICH: -compile_info / -link_info
        compile_info = shlex.split(subprocess.check_output([mpicxx, "-compile_info"], text=True))[1:]
        link_info = shlex.split(subprocess.check_output([mpicxx, "-link_info"], text=True))[1:]
        return compile_info, link_info


def command():
    """The g++ command line that builds the kernel (before the output path)."""
    import tensorflow as tf

    mpi_compile, mpi_link = _mpicxx_flags()
    return (["g++", "-shared", "-fPIC", "-O2", "-w", str(SOURCE)] + tf.sysconfig.get_compile_flags()
            + mpi_compile + tf.sysconfig.get_link_flags() + mpi_link)


def source_hash():
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def stamp_of(argv):
    """What the build depends on: the source's bytes and the command line."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update("\0".join(argv).encode())
    return digest.hexdigest()


def stamp_text(argv):
    """The stamp's content: the source's hash (checked at load), then the build's."""
    return f"{source_hash()} {stamp_of(argv)}\n"


def up_to_date(argv=None):
    """Whether the built kernel matches the source (and, given argv, the flags)."""
    if not (LIBRARY.exists() and STAMP.exists()):
        return False
    recorded = STAMP.read_text().split()
    if not recorded or recorded[0] != source_hash():
        return False
    return argv is None or recorded[1:2] == [stamp_of(argv)]


def build(force=False):
    """Compile unless up to date; returns the library's path."""
    argv = command()
    if not force and up_to_date(argv):
        return LIBRARY
    with tempfile.TemporaryDirectory(dir=LIBRARY.parent) as tmp:
        out = Path(tmp) / LIBRARY.name
        subprocess.run(argv + ["-o", str(out)], check=True)
        os.replace(out, LIBRARY)  # atomic: a rank loading it sees the old or the new
    STAMP.write_text(stamp_text(argv))
    return LIBRARY


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    was_current = "--force" not in args and up_to_date(command())
    path = build(force="--force" in args)
    print(f"dist_bn: MPI all-reduce kernel {'up to date' if was_current else 'built'}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
