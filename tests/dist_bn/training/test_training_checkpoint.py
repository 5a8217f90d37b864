"""dist_bn.training.checkpoint: which checkpoint a resumed run continues from,
damaged checkpoints and state files, and saves that fail on a full disk.

Everything runs in this process on a one-rank world (no Horovod collective
is needed then) with the tiny model of the end-to-end tests. Damage is done
to real checkpoint files (truncated, bytes flipped, index removed, state file
garbled) and the full disk is a real one: a small tmpfs mounted for the test
(skipped where mounting is not allowed).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from disks import small_tmpfs
from dist_bn.training.checkpoint import (CheckpointError, Checkpoints, ResumeError, checkpoint_problem,
                                         choose_checkpoint, find_checkpoints, state_file_problem)
from dist_bn.training.distributed import World
from dist_bn.training.model import build_model
from dist_bn.training.callbacks import RunTensorBoard
from dist_bn.training.report import Reporter, ReportError
from dist_bn.training.schema import load_config


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text("model: {width: 4, depth: 2}\ndata: {frames: 4, height: 16, width: 16}\n")
    return load_config(path)


def checkpoints(run_dir: Path, config, seed: int = 0) -> Checkpoints:
    keras.utils.set_random_seed(seed)
    model = build_model(config["model"], config["data"])
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    optimizer.build(model.trainable_variables)
    return Checkpoints(run_dir, model, optimizer, World(rank=0, size=1, local_rank=0))


def weights(ckpts: Checkpoints) -> list[np.ndarray]:
    return [np.array(v) for v in ckpts.model.weights]


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory, config):
    """A run directory with ckpt-1..3, each with other weights; returns (dir, weights per epoch)."""
    run_dir = tmp_path_factory.mktemp("run")
    ckpts = checkpoints(run_dir, config)
    saved = {}
    for epoch in (1, 2, 3):
        for variable in ckpts.model.trainable_variables:
            variable.assign(variable + 0.1 * epoch)
        ckpts.save(epoch)
        saved[epoch] = weights(ckpts)
    return run_dir, saved


@pytest.fixture
def run_copy(tmp_path, three_epochs):
    """A fresh copy of the three-epoch run to damage."""
    source, saved = three_epochs
    subprocess.run(["cp", "-a", str(source), str(tmp_path / "run")], check=True)
    return tmp_path / "run", saved


def data_file(run_dir: Path, number: int) -> Path:
    return next((run_dir / "checkpoints").glob(f"ckpt-{number}.data-*"))


def test_an_intact_run_resumes_from_its_newest_checkpoint_quietly(run_copy, config):
    run_dir, saved = run_copy
    assert find_checkpoints(run_dir / "checkpoints") == [3, 2, 1]
    ckpts = checkpoints(run_dir, config, seed=7)
    resumed = ckpts.restore_latest()
    assert (resumed.epoch, resumed.path, resumed.notes) == (3, str(run_dir / "checkpoints" / "ckpt-3"), [])
    for got, want in zip(weights(ckpts), saved[3]):
        np.testing.assert_array_equal(got, want)


def test_a_missing_state_file_does_not_restart_the_run(run_copy, config):
    """The issue's case: without checkpoints/checkpoint the run used to start
    from scratch and overwrite ckpt-1.. with exit 0."""
    run_dir, saved = run_copy
    (run_dir / "checkpoints" / "checkpoint").unlink()
    ckpts = checkpoints(run_dir, config, seed=7)
    resumed = ckpts.restore_latest()
    assert resumed.epoch == 3 and "state file is missing" in resumed.notes[0]
    np.testing.assert_array_equal(weights(ckpts)[0], saved[3][0])
    assert tf.train.latest_checkpoint(str(run_dir / "checkpoints")) == resumed.path  # rewritten for the manager
    ckpts.save(4)
    assert find_checkpoints(run_dir / "checkpoints") == [4, 3, 2]  # kept 3, the oldest swept as usual


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "Read less bytes than requested"),
    ("garble", "Checksum does not match"),
    ("no_index", "index file ckpt-3.index is missing"),
    ("garbled_index", "Unable to read file"),
])
def test_a_damaged_newest_checkpoint_falls_back_and_is_kept(run_copy, config, damage, reason):
    run_dir, saved = run_copy
    directory = run_dir / "checkpoints"
    data = data_file(run_dir, 3)
    raw = data.read_bytes()
    if damage == "truncate":
        data.write_bytes(raw[: len(raw) // 2])
    elif damage == "garble":
        data.write_bytes(raw[:64] + bytes(255 - b for b in raw[64:128]) + raw[128:])
    elif damage == "no_index":
        (directory / "ckpt-3.index").unlink()
    else:
        index = (directory / "ckpt-3.index").read_bytes()
        (directory / "ckpt-3.index").write_bytes(index[:16] + b"\xff" * 16 + index[32:])
    damaged = {p.name: p.read_bytes() for p in directory.glob("ckpt-3*")}

    assert reason in checkpoint_problem(str(directory / "ckpt-3"))
    assert choose_checkpoint(directory).number == 2
    ckpts = checkpoints(run_dir, config, seed=7)
    resumed = ckpts.restore_latest()
    assert resumed.epoch == 2 and resumed.path == str(directory / "ckpt-2")
    text = " | ".join(resumed.notes)
    assert "skipped damaged checkpoint(s): ckpt-3: " in text and reason in text and "set-aside-" in text
    for got, want in zip(weights(ckpts), saved[2]):
        np.testing.assert_array_equal(got, want)

    # Training on writes a new ckpt-3; the damaged one is kept, byte for byte, elsewhere.
    ckpts.save(3)
    (aside,) = directory.glob("set-aside-*")
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == damaged
    assert checkpoint_problem(str(directory / "ckpt-3")) is None


def test_a_garbled_state_file_is_one_line_and_set_aside(run_copy, config):
    run_dir, _ = run_copy
    state = run_dir / "checkpoints" / "checkpoint"
    state.write_bytes(b"\xff\xfe\x00 not a checkpoint state \x81")
    assert "UnicodeDecodeError" in state_file_problem(run_dir / "checkpoints")
    resumed = checkpoints(run_dir, config).restore_latest()
    assert resumed.epoch == 3 and "state file is unreadable" in resumed.notes[0]
    (aside,) = (run_dir / "checkpoints").glob("set-aside-*")
    assert (aside / "checkpoint").read_bytes().startswith(b"\xff\xfe")


def test_nothing_restorable_is_an_error_and_nothing_changes(run_copy, config):
    run_dir, _ = run_copy
    for number in (1, 2, 3):
        data = data_file(run_dir, number)
        data.write_bytes(data.read_bytes()[:100])
    before = sorted(os.listdir(run_dir / "checkpoints"))
    with pytest.raises(ResumeError) as info:
        checkpoints(run_dir, config).restore_latest()
    message = str(info.value)
    assert "\n" not in message and "none of the checkpoints" in message
    assert all(f"ckpt-{n}: it does not read back" in message for n in (1, 2, 3))
    assert sorted(os.listdir(run_dir / "checkpoints")) == before


def test_a_checkpoint_of_another_model_is_one_line(run_copy, config):
    run_dir, _ = run_copy
    keras.utils.set_random_seed(0)
    model = build_model({**config["model"], "width": 8}, config["data"])
    optimizer = keras.optimizers.SGD(0.01)
    optimizer.build(model.trainable_variables)
    (run_dir / "checkpoints" / "checkpoint").unlink()
    before = sorted(os.listdir(run_dir / "checkpoints"))
    with pytest.raises(ResumeError, match="cannot restore a checkpoint from") as info:
        Checkpoints(run_dir, model, optimizer, World(0, 1, 0)).restore_latest()
    assert "\n" not in str(info.value) and "nothing was changed" in str(info.value)
    assert sorted(os.listdir(run_dir / "checkpoints")) == before


# --- a full disk -------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs at tmp_path/disk (root only); unmounted afterwards."""
    with small_tmpfs(tmp_path / "disk", "256k") as mount_point:
        yield mount_point


def fill(disk: Path) -> None:
    """Write a filler file until the disk is full (ENOSPC)."""
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 1024)
        except OSError as err:
            assert err.errno == 28, err  # ENOSPC


def test_a_save_on_a_full_disk_keeps_the_previous_checkpoint(small_disk, config):
    ckpts = checkpoints(small_disk / "run", config)
    first = ckpts.save(1)
    fill(small_disk)
    with pytest.raises(CheckpointError) as info:
        ckpts.save(2)
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message
    assert f"the previous checkpoint {first} is kept" in message
    names = sorted(os.listdir(small_disk / "run" / "checkpoints"))
    assert names == ["checkpoint", "ckpt-1.data-00000-of-00001", "ckpt-1.index"]  # no ckpt-2*, no *_temp
    assert tf.train.latest_checkpoint(str(small_disk / "run" / "checkpoints")) == first
    assert checkpoint_problem(first) is None

    (small_disk / "filler").unlink()  # space again: the run resumes from ckpt-1
    assert checkpoints(small_disk / "run", config, seed=3).restore_latest().epoch == 1


@pytest.mark.parametrize("what", ["tensorboard", "train.log", "metrics.json"])
def test_a_full_disk_under_the_reporter_is_one_line(small_disk, config, what):
    """train.log and metrics.json (Reporter) and TensorBoard (Keras's, in RunTensorBoard)."""
    reporter = Reporter(small_disk, active=True)
    reporter.say("first line")
    reporter.metrics({"epoch": 1})
    board = RunTensorBoard(small_disk)
    model = build_model(config["model"], config["data"])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    board.set_model(model)
    board.on_train_begin()
    fill(small_disk)
    with pytest.raises(ReportError) as info:
        for step in range(10000):  # buffered writers fail once their buffer has to reach the disk
            if what == "tensorboard":
                board.on_epoch_end(step, {"loss": 1.0, "val_loss": 1.0})
            elif what == "train.log":
                reporter.say("x" * 200)
            else:
                reporter.metrics({"epoch": step, "pad": "x" * 4096})
    reporter.close()
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"cannot write {small_disk}/")
    assert message.endswith("No space left on device"), message
    assert not list(small_disk.glob("*.tmp"))
    assert (small_disk / "metrics.json").read_text().strip() == '{\n  "epoch": 1\n}'
