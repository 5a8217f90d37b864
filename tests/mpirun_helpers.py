"""Start a Python script on several ranks with mpirun or horovodrun, from pytest.

Every launch has a timeout, so a hang fails the test instead of blocking CI.
"""
import os
import shutil
import subprocess
import sys

TIMEOUT_S = 300


def mpirun_argv(np, script, *args):
    """mpirun with the flags Horovod documents, able to oversubscribe 2 cores."""
    argv = [shutil.which("mpirun") or "mpirun", "-np", str(np), "-H", f"localhost:{np}",
            "-bind-to", "none", "-map-by", "slot", "-x", "PATH", "-x", "TF_CPP_MIN_LOG_LEVEL"]
    if os.geteuid() == 0:
        argv.append("--allow-run-as-root")
    return argv + [sys.executable, script, *args]


def horovodrun_gloo_argv(np, script, *args):
    """horovodrun with the Gloo controller (no MPI involved)."""
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    return [horovodrun, "--gloo", "-np", str(np), "-H", f"localhost:{np}",
            sys.executable, script, *args]


def run_ranks(argv):
    """Run a multi-rank job, returning its CompletedProcess; fails on timeout."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_NUM_INTEROP_THREADS="1",
               TF_NUM_INTRAOP_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
