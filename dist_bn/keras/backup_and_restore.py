"""`BackupAndRestore`: Keras's fault-tolerance callback across Horovod ranks, mid-epoch too.

Keras 3.8's `keras.callbacks.BackupAndRestore` backs the model and optimizer
up into `backup_dir` every epoch or every `save_freq` batches and restores
them when `fit` starts again. Across ranks it needs three things it does
not do:

- one writer: `root_rank` writes (the others need not see its disk) and
  reads; at `on_train_begin` every rank receives `root_rank`'s variables
  and the epoch to continue, so all ranks restart from the same state;
- mid-epoch resume: Keras restarts the interrupted epoch from its first
  batch, training again on the batches seen before the backup. Here those
  batches are skipped instead: for the first `batches_done` steps of the
  restored epoch `fit`'s step function only draws the batch from the
  iterator, so every later step sees the data, weights and optimizer state
  of the uninterrupted run. (The restored epoch's logs then cover only
  the batches after the backup; metric states are not backed up.)
- the epoch of a mid-epoch backup made after a resume (Keras counts epochs
  from 0 at each `fit` and writes the wrong one until the first epoch ends).

Needs `steps_per_execution=1` (the default) and a data order that does not
depend on the run (a fixed `tf.data` pipeline, or `shuffle=False`).
"""
import json
import os

import horovod.tensorflow as hvd
import keras

from dist_bn.keras.variables import broadcast_global_variables


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` written by `root_rank`, restored on every rank, mid-epoch exact.

    Arguments are Keras's (`backup_dir`, `save_freq`: "epoch" or a number of
    batches, `double_checkpoint`, `delete_checkpoint`) and Horovod's
    `root_rank`. `backup_dir` is read and written on `root_rank` only.
    """

    def __init__(self, backup_dir, save_freq="epoch", double_checkpoint=False, delete_checkpoint=True,
                 root_rank=0, process_set=hvd.global_process_set):
        super().__init__(backup_dir, save_freq=save_freq, double_checkpoint=double_checkpoint,
                         delete_checkpoint=delete_checkpoint)
        self.root_rank = root_rank
        self.process_set = process_set
        self._batches_done = 0  # in the current epoch
        self._skip = 0  # batches of the restored epoch to draw without training
        self._train_function = None

    def _is_root(self):
        return not hvd.is_initialized() or hvd.rank() == self.root_rank

    def _metadata(self):
        if not os.path.exists(self._training_metadata_path):
            return {"epoch": 0, "batches_done": 0}
        with open(self._training_metadata_path, encoding="utf-8") as f:
            return json.load(f)

    def on_train_begin(self, logs=None):
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)  # the same variables on every rank
        state = None
        if self._is_root():
            super().on_train_begin(logs)  # loads the backup (or the previous one), sets _initial_epoch
            state = self._metadata()
        if hvd.is_initialized() and self.process_set.size() > 1:
            state = hvd.broadcast_object(state, root_rank=self.root_rank, process_set=self.process_set,
                                         name="dist_bn.keras.backup_and_restore")
            broadcast_global_variables(self.model, self.root_rank, self.process_set)
        self.model._initial_epoch = state["epoch"] or None
        self._skip = int(state.get("batches_done", 0))

    def on_epoch_begin(self, epoch, logs=None):
        self._current_epoch = epoch
        self._batches_done = 0
        self._last_batch_seen = -1

    def on_train_batch_begin(self, batch, logs=None):
        if batch < self._skip:
            if self._train_function is None:
                self._train_function = self.model.train_function
                self.model.train_function = _draw_only
        elif self._train_function is not None:
            self.model.train_function, self._train_function = self._train_function, None

    def on_train_batch_end(self, batch, logs=None):
        self._batches_done = batch + 1
        if batch + 1 == self._skip:
            self._skip = 0
            self.model.train_function, self._train_function = self._train_function, None
        super().on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._skip, self._batches_done = 0, 0  # a backup now is at the next epoch's start
        super().on_epoch_end(epoch, logs)

    def _save_model(self):
        if not self._is_root():
            return
        super()._save_model()
        with open(self._training_metadata_path, "w", encoding="utf-8") as f:
            json.dump({"epoch": self._current_epoch, "batch": self._last_batch_seen,
                       "batches_done": self._batches_done}, f)

    def on_train_end(self, logs=None):
        if self._train_function is not None:
            self.model.train_function, self._train_function = self._train_function, None
        if self._is_root():
            super().on_train_end(logs)


def _draw_only(iterator):
    """A step that takes its batch from the iterator and trains nothing."""
    next(iterator)
    return {}
