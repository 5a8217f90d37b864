"""Checkpoints in run.dir/checkpoints: model, optimizer and epoch counter.

A `tf.train.Checkpoint` of the Keras model (weights and BN moving
statistics), the optimizer (iteration count, which drives the learning-rate
schedule, and its slots: SGD momentum or Adam moments, loss scale under
mixed precision) and the number of completed epochs. Only rank 0 writes
(a `CheckpointManager` keeping the last MAX_TO_KEEP, `ckpt-EPOCH`). On resume
only rank 0 reads: it restores a checkpoint and tells the other ranks the
epoch; `dist_bn.keras`'s BroadcastGlobalVariablesCallback then gives them
rank 0's state at `fit`'s first step, so the other ranks need not see rank
0's disk (no shared filesystem needed on several nodes) and all ranks
provably start from identical state. Checkpoints hold nothing rank-specific:
with `bn: local` the ranks' moving statistics are made equal (rank 0's)
before each epoch's evaluation and checkpoint, see `callbacks`.

Keras's ModelCheckpoint and BackupAndRestore are not used: they write over
their file (or delete it at the end) and cannot tell a damaged file from a
good one, which this module does (below).

Which checkpoint a resumed run continues from is decided from the files
themselves, not from TensorFlow's `checkpoint` state file (which a crash,
a copy or a user can lose or garble): the newest `ckpt-N` whose every
tensor reads back (`tf.train.load_checkpoint`, CRC-checked) is used, and a
damaged newer one (missing index, truncated or garbled data) is skipped
with the reason said. Newer checkpoints that are skipped are moved into
`checkpoints/set-aside-<time>/` before training continues, so the resumed
run never writes over a checkpoint that is not in its own lineage; then the
state file is rewritten to list the checkpoints kept. A save that fails
(full disk) removes its partial files and keeps the previous checkpoint.
`find_checkpoints`, `checkpoint_problem` and `choose_checkpoint` are plain
functions of a directory, for any training loop.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import tensorflow as tf

from dist_bn.training import distributed
from dist_bn.training.report import error_reason

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "ckpt"
STATE_FILE = "checkpoint"  # tf.train.CheckpointManager's list of checkpoints
MAX_TO_KEEP = 3
# ckpt-N.index, ckpt-N.data-00000-of-00001, and a save's ckpt-N_temp/ directory.
_CHECKPOINT_ENTRY = re.compile(rf"{CHECKPOINT_PREFIX}-(\d+)(\.index|\.data-\d+-of-\d+|_temp.*)")


class ResumeError(Exception):
    """The checkpoints found cannot be restored into this model."""


class CheckpointError(Exception):
    """A checkpoint could not be written; the message says why and what was kept."""


def one_line(err: BaseException, limit: int = 300) -> str:
    """The gist of an exception in one line: TensorFlow's messages span many lines."""
    text = getattr(err, "message", None) or getattr(err, "strerror", None) or str(err) or type(err).__name__
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def find_checkpoints(directory: str | os.PathLike) -> list[int]:
    """Numbers N of every `ckpt-N` with any file in `directory`, newest first."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    numbers = {int(m.group(1)) for m in map(_CHECKPOINT_ENTRY.fullmatch, names) if m}
    return sorted(numbers, reverse=True)


def checkpoint_prefix(directory: str | os.PathLike, number: int) -> str:
    return os.path.join(os.fspath(directory), f"{CHECKPOINT_PREFIX}-{number}")


def checkpoint_problem(prefix: str) -> str | None:
    """Why the checkpoint at `prefix` cannot be read back whole, else None.

    Reads every tensor through `tf.train.load_checkpoint`, whose reader checks
    each one's CRC32C, so a missing index, a missing, truncated or garbled data
    file is found here rather than halfway through a restore."""
    if not os.path.isfile(prefix + ".index"):
        return f"its index file {os.path.basename(prefix)}.index is missing"
    try:
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except Exception as err:  # noqa: BLE001 - the reader raises OpError, IndexError ("Read less bytes"), ...
        return f"it does not read back ({type(err).__name__}: {one_line(err, 200)})"
    return None


def state_file_problem(directory: str | os.PathLike) -> str | None:
    """Why TensorFlow's `checkpoint` state file in `directory` is unreadable, else None."""
    try:
        tf.train.get_checkpoint_state(os.fspath(directory))
    except (UnicodeDecodeError, ValueError, tf.errors.OpError) as err:  # text_format.ParseError is a ValueError
        return f"{STATE_FILE} state file is unreadable ({type(err).__name__}: {one_line(err, 120)})"
    return None


@dataclass
class Choice:
    """What a resumed run continues from: `number` (None: nothing restorable),
    the newer checkpoints skipped with why, and all numbers found."""

    number: int | None
    skipped: list[tuple[int, str]] = field(default_factory=list)
    found: list[int] = field(default_factory=list)

    def describe_skipped(self) -> str:
        return "; ".join(f"{CHECKPOINT_PREFIX}-{n}: {why}" for n, why in self.skipped)


def choose_checkpoint(directory: str | os.PathLike) -> Choice:
    """The newest intact checkpoint in `directory` (read-only)."""
    found = find_checkpoints(directory)
    choice = Choice(None, found=found)
    for number in found:
        problem = checkpoint_problem(checkpoint_prefix(directory, number))
        if problem is None:
            choice.number = number
            break
        choice.skipped.append((number, problem))
    return choice


def set_aside(directory: Path, numbers: list[int], state_file: bool, now: float | None = None) -> Path | None:
    """Move every file of checkpoints `numbers` (and the state file, if asked)
    into a new `set-aside-<time>` directory; returns it (None if nothing moved)."""
    entries = [name for name in sorted(os.listdir(directory))
               if (m := _CHECKPOINT_ENTRY.fullmatch(name)) and int(m.group(1)) in numbers]
    if state_file and (directory / STATE_FILE).exists():
        entries.append(STATE_FILE)
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    target, n = directory / f"set-aside-{stamp}", 2
    while target.exists():
        target, n = directory / f"set-aside-{stamp}-{n}", n + 1
    target.mkdir()
    for name in entries:
        os.rename(directory / name, target / name)
    return target


def write_state_file(directory: Path, latest: str, kept: list[str]) -> None:
    """Rewrite the `checkpoint` state file that tf.train.CheckpointManager reads
    at start (and later sweeps by): `latest` and the `kept` checkpoints, with
    their index files' times so the manager keeps only the newest MAX_TO_KEEP."""
    times = [os.path.getmtime(prefix + ".index") for prefix in kept]
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")  # the v1 function is marked deprecated; there is no TF2 one for this
    try:
        tf.compat.v1.train.update_checkpoint_state(str(directory), latest, all_model_checkpoint_paths=kept,
                                                   all_model_checkpoint_timestamps=times,
                                                   last_preserved_timestamp=min(times) - 1)
    finally:
        logger.setLevel(level)


@dataclass
class Resumed:
    """What `Checkpoints.restore_latest` did: completed epochs, the checkpoint
    restored (None: none found) and notes for the log (skipped, set aside)."""

    epoch: int
    path: str | None
    notes: list[str] = field(default_factory=list)


class Checkpoints:
    """The run's checkpoint directory, shared API on every rank."""

    def __init__(self, run_dir: str | os.PathLike, model, optimizer, world: distributed.World):
        self.directory = Path(run_dir) / CHECKPOINT_DIR
        self.world = world
        self.model = model
        self.optimizer = optimizer
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=self.epoch)
        self._manager = None

    @property
    def manager(self) -> tf.train.CheckpointManager | None:
        """Rank 0's CheckpointManager, made on first use: after `restore_latest`
        has repaired the state file it reads."""
        if self._manager is None and self.world.is_chief:
            self._manager = tf.train.CheckpointManager(self.checkpoint, str(self.directory), MAX_TO_KEEP,
                                                       checkpoint_name=CHECKPOINT_PREFIX)
        return self._manager

    def save(self, epoch: int) -> str | None:
        """Record `epoch` as completed and write a checkpoint (rank 0); returns
        its path. If rank 0 cannot write it, its partial files are removed,
        the previous checkpoint stays the latest, and every rank raises
        CheckpointError."""
        self.epoch.assign(epoch)
        outcome: tuple[str | None, str | None] = (None, None)
        if self.world.is_chief:
            before = set(os.listdir(self.directory)) if self.directory.is_dir() else set()
            try:
                outcome = (self.manager.save(checkpoint_number=epoch), None)
            except (OSError, tf.errors.OpError) as err:
                self._remove_partial(epoch, before)
                self._manager = None  # it may count the failed save as done; re-read the state file next time
                kept = tf.train.latest_checkpoint(str(self.directory))
                outcome = (None, f"cannot write checkpoint {checkpoint_prefix(self.directory, epoch)}: "
                                 f"{error_reason(err)}; "
                                 + (f"the previous checkpoint {kept} is kept" if kept else "no checkpoint kept")
                                 + " (free space, then resume with run.resume=true)")
        if self.world.size > 1:
            outcome = distributed.broadcast_object(outcome, name=f"checkpoint/save/{epoch}")
        path, problem = outcome
        if problem:
            raise CheckpointError(problem)
        return path

    def _remove_partial(self, epoch: int, before: set[str]) -> None:
        """Delete what a failed save of `epoch` created: ckpt-EPOCH_temp/,
        ckpt-EPOCH.* and a half-written state file's temporary copy."""
        if not self.directory.is_dir():
            return
        for name in set(os.listdir(self.directory)) - before:
            match = _CHECKPOINT_ENTRY.fullmatch(name)
            if (match and int(match.group(1)) == epoch) or name.startswith(STATE_FILE + ".tmp"):
                path = self.directory / name
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    def _choose(self) -> tuple[Choice, str | None, list[str]]:
        """Rank 0, read-only: the checkpoint to resume from, the state file's
        problem (None if readable) and notes on what was found."""
        notes = []
        state_problem = state_file_problem(self.directory)
        choice = choose_checkpoint(self.directory)
        if choice.number is None:
            if not choice.found and state_problem:
                notes.append(f"{self.directory}: {state_problem}, and there are no {CHECKPOINT_PREFIX}-N files")
            return choice, state_problem, notes
        prefix = checkpoint_prefix(self.directory, choice.number)
        named = None if state_problem else tf.train.latest_checkpoint(str(self.directory))
        if state_problem:
            notes.append(f"{state_problem}; the checkpoints were found from their files")
        elif named is None:
            notes.append(f"the {STATE_FILE} state file is missing or names no existing checkpoint; "
                         "the checkpoints were found from their files")
        elif named != prefix:
            notes.append(f"the {STATE_FILE} state file names {named}, but the newest intact checkpoint is {prefix}")
        if choice.skipped:
            notes.append(f"skipped damaged checkpoint(s): {choice.describe_skipped()}")
        return choice, state_problem, notes

    def _repair(self, choice: Choice, state_problem: str | None, notes: list[str]) -> None:
        """Rank 0, after a successful restore: move the checkpoints newer than
        the one restored (and an unreadable state file) aside, so the continued
        run never writes over them, and make the state file list what is kept."""
        newer = [n for n in find_checkpoints(self.directory) if n > choice.number]  # incl. leftover _temp dirs
        moved = set_aside(self.directory, newer, state_file=state_problem is not None)
        if moved:
            what = [f"{CHECKPOINT_PREFIX}-{n}" for n in newer] + (["the unreadable state file"] if state_problem else [])
            notes.append(f"moved {', '.join(what)} to {moved} (kept, never overwritten)")
        if notes:  # the state file is missing, unreadable or stale: list what is kept, for the manager
            prefix = checkpoint_prefix(self.directory, choice.number)
            older = [checkpoint_prefix(self.directory, n) for n in reversed(choice.found)
                     if n < choice.number and os.path.isfile(checkpoint_prefix(self.directory, n) + ".index")]
            write_state_file(self.directory, prefix, [*older, prefix])

    def restore_latest(self) -> Resumed:
        """Restore the newest intact checkpoint on rank 0; every rank learns
        its epoch (the variables reach them by broadcast at `fit`'s first
        step). Returns Resumed(0, None) if there is none. Raises ResumeError
        on every rank if checkpoints exist but none can be restored into
        this model."""
        outcome: tuple[str | None, list[str], str | None] = (None, [], None)
        if self.world.is_chief:
            try:
                choice, state_problem, notes = self._choose()
                if choice.number is None and choice.found:
                    outcome = (None, notes, (
                        f"none of the checkpoints in {self.directory} can be restored "
                        f"({choice.describe_skipped()}); nothing was changed: restore them from a backup, "
                        "or move them away to start from scratch"))
                elif choice.number is not None:
                    path = checkpoint_prefix(self.directory, choice.number)
                    self.checkpoint.restore(path).assert_existing_objects_matched()
                    self._repair(choice, state_problem, notes)
                    outcome = (path, notes, None)
                else:
                    outcome = (None, notes, None)
            except (ValueError, AssertionError, tf.errors.OpError, OSError) as err:
                outcome = (None, [], f"cannot restore a checkpoint from {self.directory}: {one_line(err, 400)}; "
                                     "nothing was changed")
        if self.world.size > 1:
            outcome = distributed.broadcast_object(outcome, name="resume/outcome")
        path, notes, problem = outcome
        if problem:
            raise ResumeError(problem)
        if path is None:
            return Resumed(0, None, notes)
        if self.world.size > 1:
            self.epoch.assign(distributed.broadcast_object(int(self.epoch.numpy()), name="resume/epoch"))
        return Resumed(int(self.epoch.numpy()), path, notes)
