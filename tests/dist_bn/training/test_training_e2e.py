"""End to end: the launcher starts the training job on 2 ranks, with both backends.

A tiny config (4 frames of 16x16, 4 steps per epoch) keeps each launch at
roughly 15-25 seconds on 2 cores, most of it TensorFlow's start-up. Three
launches cover everything:

  horovodrun --gloo, 2 epochs, uninterrupted   -> outputs of a complete run
  mpirun, 1 epoch                              -> outputs after one epoch
  mpirun, run.resume=true to 2 epochs          -> must equal the uninterrupted run

"Equal" means: the same eval accuracy and number of eval clips, losses and
every checkpointed tensor (weights, BN moving statistics, optimizer slots and
iteration count, epoch counter) allclose with rtol=1e-6, atol=1e-7. The job is
deterministic (fixed data order per epoch, op determinism, and a sum of two
ranks does not depend on summation order), so in practice they are bitwise
equal; the tolerance only leaves room for a backend that reduces in another
order. Resuming under the other backend also shows that a checkpoint does not
depend on the launcher.

Single-process runs (no launcher) cover Adam, local BN, resuming a finished
run, and the refusal of mixed precision without a GPU.
Every subprocess has a timeout, so a hang fails instead of blocking.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from disks import small_tmpfs
from dist_bn.training.checkpoint import checkpoint_problem

TIMEOUT_S = 180

TINY = """\
model: {width: 4, depth: 2, bn: sync, momentum: 0.9}
data: {frames: 4, height: 16, width: 16, num_classes: 4, train_clips: 32, eval_clips: 16, seed: 0}
train: {batch_size: 4, epochs: 2, learning_rate: 0.05, warmup_epochs: 0.5, log_every: 2, checkpoint_every: 1}
run: {dir: run, tensorboard: true}
launcher:
  num_proc: 2
  env: {TF_CPP_MIN_LOG_LEVEL: "2", TF_NUM_INTEROP_THREADS: "1", TF_NUM_INTRAOP_THREADS: "1"}
"""
MPIRUN = ["launcher.backend=mpirun", "launcher.controller=mpi"]

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    shutil.which("mpirun") is None or not (Path(sys.executable).parent / "horovodrun").exists(),
    reason="needs mpirun and horovodrun (scripts/bootstrap.sh)")]


def launcher_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOROVOD_", "OMPI_", "PMIX_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def launch(workdir: Path, *overrides: str, expect: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "launch", str(workdir / "tiny.yaml"), *overrides],
                          cwd=workdir, env=launcher_env(), capture_output=True, text=True, timeout=TIMEOUT_S,
                          stdin=subprocess.DEVNULL)
    if expect is not None:
        assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def workdir_for(tmp_path_factory, name: str) -> Path:
    workdir = tmp_path_factory.mktemp(name)
    (workdir / "tiny.yaml").write_text(TINY)
    return workdir


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def checkpoint_tensors(run_dir: Path) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = workdir_for(tmp_path_factory, "gloo")
    proc = launch(workdir, "launcher.controller=gloo")
    return workdir / "run", proc, metrics(workdir / "run")


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    workdir = workdir_for(tmp_path_factory, "mpirun")
    proc = launch(workdir, *MPIRUN, "train.epochs=1")
    return workdir, proc, metrics(workdir / "run"), sorted(os.listdir(workdir / "run" / "checkpoints"))


def check_complete_run(run_dir: Path, result: dict, epochs: int, stdout: str):
    assert result["complete"] is True and result["epochs"] == epochs
    assert result["world_size"] == 2 and result["global_batch_size"] == 8 and result["steps_per_epoch"] == 4
    assert result["eval_clips"] == 16  # 8 per rank, summed over ranks
    assert 0.0 <= result["eval_accuracy"] <= 1.0 and np.isfinite(result["eval_loss"])
    assert [r["epoch"] for r in result["history"]] == list(range(1, epochs + 1))
    assert result["history"][-1]["eval_accuracy"] == result["eval_accuracy"]
    assert (run_dir / "checkpoints" / f"ckpt-{epochs}.index").exists()
    assert (run_dir / "config.yaml").exists() and (run_dir / "train.log").exists()
    assert f"final eval: accuracy {result['eval_accuracy']:.4f}" in stdout
    assert "[1]<stdout>:[dist_bn]" not in stdout and "[1,1]<stdout>:[dist_bn]" not in stdout  # rank 0 only


def test_horovodrun_gloo_two_ranks(uninterrupted):
    run_dir, proc, result = uninterrupted
    assert "horovodrun -np 2 -H localhost:2 --gloo" in proc.stderr
    check_complete_run(run_dir, result, 2, proc.stdout)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.index")) == ["ckpt-1.index", "ckpt-2.index"]
    for split in ("train", "validation"):  # Keras's TensorBoard callback, rank 0 only
        assert len(list((run_dir / "tensorboard" / split).glob("events.out.tfevents.*"))) == 1, split
    assert "epoch 2/2  step 4/4  loss" in proc.stdout


def test_mpirun_two_ranks(one_epoch):
    workdir, proc, result, checkpoints = one_epoch
    assert "mpirun" in proc.stderr and "-np 2" in proc.stderr
    check_complete_run(workdir / "run", result, 1, proc.stdout)
    assert "ckpt-1.index" in checkpoints


def test_resume_gives_the_uninterrupted_result(one_epoch, uninterrupted):
    """Also without TensorFlow's `checkpoint` state file, which used to make
    run.resume start from scratch and overwrite ckpt-1: the checkpoint is
    found from its files."""
    workdir, _, _, _ = one_epoch
    (workdir / "run" / "checkpoints" / "checkpoint").unlink()
    proc = launch(workdir, *MPIRUN, "train.epochs=2", "run.resume=true")
    assert "resumed from" in proc.stdout and "(epoch 1 done)" in proc.stdout
    assert "run.resume: the checkpoint state file is missing" in proc.stderr
    resumed, expected = metrics(workdir / "run"), uninterrupted[2]
    assert resumed["resumed_from_epoch"] == 1 and resumed["epochs"] == 2
    assert [r["epoch"] for r in resumed["history"]] == [1, 2]  # the first session's epoch is kept
    assert resumed["eval_accuracy"] == expected["eval_accuracy"]
    assert resumed["eval_clips"] == expected["eval_clips"]
    for key in ("eval_loss", "train_loss", "train_accuracy"):
        np.testing.assert_allclose(resumed[key], expected[key], rtol=1e-6, atol=1e-7, err_msg=key)

    got, want = checkpoint_tensors(workdir / "run"), checkpoint_tensors(uninterrupted[0])
    assert sorted(got) == sorted(want) and any("moving_mean" in name for name in want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=name)


def single_process(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    (tmp_path / "tiny.yaml").write_text(TINY)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOROVOD_", "OMPI_", "PMIX_"))}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", TF_NUM_INTEROP_THREADS="1", TF_NUM_INTRAOP_THREADS="2")
    return subprocess.run([sys.executable, "-m", "dist_bn.training", str(tmp_path / "tiny.yaml"), *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
                          stdin=subprocess.DEVNULL)


def test_single_process_adam_local_bn_and_resume_of_a_finished_run(tmp_path):
    """No launcher: the job runs as a one-rank world. Resuming a finished run
    trains nothing and evaluates what it restored: the same numbers."""
    proc = single_process(tmp_path, "train.epochs=1", "train.optimizer=adam", "train.learning_rate=0.001",
                          "model.bn=local", "run.tensorboard=false")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = metrics(tmp_path / "run")
    assert first["world_size"] == 1 and first["bn"] == "local" and first["complete"]
    assert np.isfinite(first["eval_loss"]) and first["eval_clips"] == 16
    assert not (tmp_path / "run" / "tensorboard").exists()

    proc = single_process(tmp_path, "train.epochs=1", "train.optimizer=adam", "train.learning_rate=0.001",
                          "model.bn=local", "run.tensorboard=false", "run.resume=true")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = metrics(tmp_path / "run")
    assert again["epochs"] == 1 and again["clips_per_s"] is None and again["history"] == first["history"]
    assert (again["eval_accuracy"], again["eval_loss"]) == (first["eval_accuracy"], first["eval_loss"])


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="checks the CPU-only refusal")
def test_mixed_precision_without_gpu_is_refused(tmp_path):
    proc = single_process(tmp_path, "train.mixed_precision=true")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dist_bn.training: error: train.mixed_precision: float16 compute needs a GPU" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- faults injected for real ------------------------------------------------------------


def rank_processes(run_dir: Path) -> list[int]:
    """Processes of the training job for `run_dir` (their command line names it)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"dist_bn.training" in argv and any(str(run_dir).encode() in arg for arg in argv):
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize("backend", ["horovodrun", "mpirun"])
def test_ranks_die_with_a_killed_launcher(tmp_path, backend):
    """SIGKILL of dist-bn-launch once the ranks are running: no rank survives
    it (they used to be re-parented to init and train on)."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    run_dir = tmp_path / "run"
    overrides = ["train.epochs=1000", *(MPIRUN if backend == "mpirun" else [])]
    with open(tmp_path / "launcher.err", "w") as err:
        launcher = subprocess.Popen([sys.executable, "-m", "launch", str(tmp_path / "tiny.yaml"), *overrides],
                                    cwd=tmp_path, env=launcher_env(), stdout=subprocess.DEVNULL, stderr=err,
                                    stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (run_dir / "train.log").exists() or len(rank_processes(run_dir)) < 2:  # both ranks started
            assert launcher.poll() is None, (tmp_path / "launcher.err").read_text()
            assert time.monotonic() < deadline, "the ranks did not start"
            time.sleep(0.2)
        launcher.kill()
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 20
        while rank_processes(run_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert rank_processes(run_dir) == [], "ranks outlived the launcher"
    finally:
        for pid in rank_processes(run_dir):
            os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()


@pytest.fixture
def full_disk(tmp_path):
    """A 48 KiB tmpfs: room for the run directory, one checkpoint and a little
    more, so the run fills it while it trains (root only)."""
    with small_tmpfs(tmp_path / "disk", "48k") as mount_point:
        yield mount_point


def test_a_full_disk_ends_the_run_with_one_line(tmp_path, full_disk):
    """2 ranks under horovodrun write into a disk that fills up while they
    train: exit 1 and one error line from the job (no traceback of any rank
    or of horovodrun), no partial files, and the last checkpoint intact."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    proc = launch(tmp_path, f"run.dir={full_disk}/run", "train.epochs=5", expect=1)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "No space left on device" in errors[0], proc.stderr[-3000:]
    # Rank 0's line, tagged by horovodrun's MPI ("[1,0]") or Gloo ("[0]") controller.
    assert re.match(r"\[(1,)?0\]<stderr>:dist_bn\.training: error: cannot write ", errors[0]), errors[0]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    leftovers = [p for p in full_disk.rglob("*") if p.name.endswith((".tmp", "_temp")) or "_temp" in p.name]
    assert leftovers == []
    latest = tf.train.latest_checkpoint(str(full_disk / "run" / "checkpoints"))
    assert latest is not None and checkpoint_problem(latest) is None


def test_a_config_that_cannot_fit_in_memory_fails_fast(tmp_path):
    proc = single_process(tmp_path, "data.height=65536", "data.width=65536")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "a rank would need about " in proc.stderr and "GiB is available" in proc.stderr
    assert "Traceback" not in proc.stderr
