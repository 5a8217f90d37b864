"""Checkpoints in run.dir/checkpoints: model, optimizer and epoch counter.

A `tf.train.Checkpoint` of the Keras model (weights and BN moving
statistics), the optimizer (iteration count, which drives the learning-rate
schedule, and its slots: SGD momentum or Adam moments, loss scale under
mixed precision) and the number of completed epochs. Only rank 0 writes
(a `CheckpointManager` keeping the last MAX_TO_KEEP). On resume only rank 0
reads: it restores the latest checkpoint and every other rank receives the
values by broadcast, so the other ranks need not see rank 0's disk (no
shared filesystem needed on several nodes) and all ranks provably start
from identical state. Checkpoints hold nothing rank-specific: with
`bn: local` the ranks' moving statistics are made equal (rank 0's) before
each epoch's evaluation and checkpoint, see `loop`.
"""
from __future__ import annotations

import os
from pathlib import Path

import tensorflow as tf

from dist_bn.training import distributed

CHECKPOINT_DIR = "checkpoints"
MAX_TO_KEEP = 3


class ResumeError(Exception):
    """The checkpoint found cannot be restored into this model."""


class Checkpoints:
    """The run's checkpoint directory, shared API on every rank."""

    def __init__(self, run_dir: str | os.PathLike, model, optimizer, world: distributed.World):
        self.directory = Path(run_dir) / CHECKPOINT_DIR
        self.world = world
        self.model = model
        self.optimizer = optimizer
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=self.epoch)
        self.manager = None
        if world.is_chief:
            self.manager = tf.train.CheckpointManager(self.checkpoint, str(self.directory), MAX_TO_KEEP)

    def state_variables(self) -> list:
        """Everything a rank's training state consists of, in the same order on every rank."""
        return [*self.model.variables, *self.optimizer.variables, self.epoch]

    def save(self, epoch: int) -> str | None:
        """Record `epoch` as completed and write a checkpoint (rank 0); returns its path."""
        self.epoch.assign(epoch)
        if self.manager is None:
            return None
        return self.manager.save(checkpoint_number=epoch)

    def restore_latest(self) -> tuple[int, str | None]:
        """Restore the latest checkpoint on rank 0 and broadcast the state to all
        ranks. Returns (completed epochs, checkpoint path), (0, None) if there
        is none. Raises ResumeError on every rank if rank 0 cannot restore it."""
        outcome = (None, None)
        if self.manager is not None and self.manager.latest_checkpoint:
            path = self.manager.latest_checkpoint
            try:
                self.checkpoint.restore(path).assert_existing_objects_matched()
                outcome = (path, None)
            except (ValueError, AssertionError, tf.errors.OpError) as err:
                problem = " ".join(str(err).split())
                outcome = (path, f"cannot restore {path}: {problem[:500]}")
        path, problem = distributed.broadcast_object(outcome, name="resume/outcome")
        if problem:
            raise ResumeError(problem)
        if path is None:
            return 0, None
        distributed.broadcast_variables(self.state_variables(), prefix="resume")
        return int(self.epoch.numpy()), path
