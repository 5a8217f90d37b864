"""The job's Keras callbacks: what `model.fit` does at each step and epoch
besides `dist_bn.keras`'s broadcast and exact metrics.

`callbacks(...)` lists them in the order they must run (every rank runs
the same ones, in the same order, since some are collectives):

  BroadcastGlobalVariablesCallback   rank 0's state (fresh or restored) to all
  MetricAverageCallback              epoch logs exact over ranks (sums)
  Progress                           every train.log_every steps: exact epoch
                                     metrics so far, learning rate, speed
  EpochPreciseBN                     before each validation: precise BN over
                                     that epoch's training order
  ShareModelState                    before each validation, bn: local only:
                                     rank 0's moving statistics on every rank
  SaveCheckpoints                    every train.checkpoint_every epochs, last
  RunTensorBoard (rank 0)            Keras's TensorBoard, epoch scalars
  EpochReport (job.report)           epoch line, history, metrics.json
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import keras

from dist_bn.keras import broadcast_variables, callbacks as dist_callbacks, global_metric_results
from dist_bn.precise_statistics import PreciseBN
from dist_bn.training import data as data_lib
from dist_bn.training.report import TENSORBOARD_DIR, epoch_line, progress_line, writing


class Progress(keras.callbacks.Callback):
    """Every train.log_every steps and at the epoch's last: one line (rank 0)
    with the epoch's loss and accuracy so far over all ranks. Collective."""

    def __init__(self, job):
        super().__init__()
        self.job = job
        self._start = 0.0
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._start, self._last = epoch + 1, time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        step, job = batch + 1, self.job
        if step % job.config["train"]["log_every"] and step != job.steps:
            return
        results = global_metric_results(self.model)
        now = time.perf_counter()
        speed = (step - self._last) * job.global_batch / max(now - self._start, 1e-9)
        self._start, self._last = now, step
        job.reporter.say(progress_line(self._epoch, job.config["train"]["epochs"], step, job.steps,
                                       float(results["loss"]), float(results["accuracy"]),
                                       job.learning_rate(), speed))


class EpochPreciseBN(PreciseBN):
    """dist_bn.PreciseBN over train.precise_bn_batches global batches of the
    current epoch's training order (repeated if it asks for more)."""

    def __init__(self, job):
        self.job = job
        super().__init__(None, job.config["train"]["precise_bn_batches"])

    def on_epoch_begin(self, epoch, logs=None):
        self.dataset = data_lib.train_dataset(self.job.config, epoch + 1, self.job.world.rank,
                                              self.job.world.size).repeat()

    def on_test_begin(self, logs=None):
        fresh, start = self._fresh, time.perf_counter()
        super().on_test_begin(logs)
        if not fresh:
            self.job.reporter.say(
                f"precise BN: {len(self.last_counts)} layer(s) over {self.num_batches} global batches "
                f"({self.num_batches * self.job.global_batch} clips) in {time.perf_counter() - start:.1f}s")


class ShareModelState(keras.callbacks.Callback):
    """Before each evaluation, every rank takes rank 0's non-trainable state
    (BN moving statistics). With sync BN (or none) it is identical on every
    rank already; with local BN each rank averaged its own batches, and
    evaluation and checkpoints then use rank 0's, the model it saves."""

    def on_test_begin(self, logs=None):
        broadcast_variables(self.model.non_trainable_variables)


class SaveCheckpoints(keras.callbacks.Callback):
    """`Checkpoints.save` every train.checkpoint_every epochs and after the last (collective)."""

    def __init__(self, job):
        super().__init__()
        self.job = job

    def on_epoch_end(self, epoch, logs=None):
        epoch, train = epoch + 1, self.job.config["train"]
        if epoch % train["checkpoint_every"] == 0 or epoch == train["epochs"]:
            path = self.job.checkpoints.save(epoch)
            if path:
                self.job.reporter.say(f"checkpoint {path}")


class RunTensorBoard(keras.callbacks.TensorBoard):
    """Keras's TensorBoard in run.dir/tensorboard (train/ and validation/),
    epoch scalars only: they are exact over ranks (MetricAverageCallback runs
    first), while Keras's batch and `evaluation_*_vs_iterations` scalars
    would be rank 0's alone. Written and flushed each epoch; a failed write
    is one ReportError line."""

    def __init__(self, run_dir):
        self.directory = run_dir / TENSORBOARD_DIR
        super().__init__(log_dir=str(self.directory), update_freq="epoch", write_graph=False,
                         profile_batch=0)

    def on_train_begin(self, logs=None):
        with writing(self.directory):
            super().on_train_begin(logs)

    def on_test_end(self, logs=None):
        pass

    def on_epoch_end(self, epoch, logs=None):
        with writing(self.directory):
            super().on_epoch_end(epoch, logs)
            for writer in self._writers.values():
                writer.flush()

    def on_train_end(self, logs=None):
        with writing(self.directory):
            super().on_train_end(logs)


class EpochReport(keras.callbacks.Callback):
    """The end-of-epoch line and history record, and metrics.json (rank 0 writes)."""

    def __init__(self, job):
        super().__init__()
        self.job = job
        self.train_time = 0.0
        self.trained_epochs = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = self._eval_start = time.perf_counter()

    def on_test_begin(self, logs=None):
        self._eval_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        job, now = self.job, time.perf_counter()
        train_time = self._eval_start - self._start
        self.train_time += train_time
        self.trained_epochs += 1
        record = {"epoch": epoch + 1, "train_loss": float(logs["loss"]), "train_accuracy": float(logs["accuracy"]),
                  **eval_record(logs, job.config), "learning_rate": job.learning_rate(),
                  "epoch_time_s": now - self._start, "clips_per_s": job.steps * job.global_batch / train_time}
        job.history.append(record)
        job.reporter.say(epoch_line(record, job.config["train"]["epochs"]))
        job.reporter.metrics(job.metrics(record, complete=False))


def eval_record(logs: Mapping[str, Any], config: Mapping[str, Any], prefix: str = "val_") -> dict[str, Any]:
    """eval_loss, eval_accuracy and eval_clips from Keras logs (exact over ranks)."""
    return {"eval_loss": float(logs[prefix + "loss"]), "eval_accuracy": float(logs[prefix + "accuracy"]),
            "eval_clips": config["data"]["eval_clips"]}


def callbacks(job) -> list[keras.callbacks.Callback]:
    """The job's callbacks for `model.fit`, in order (see the module docstring)."""
    config = job.config
    found = [dist_callbacks.BroadcastGlobalVariablesCallback(0), dist_callbacks.MetricAverageCallback(),
             Progress(job)]
    if config["train"]["precise_bn_batches"]:
        found.append(EpochPreciseBN(job))
    if config["model"]["bn"] == "local" and job.world.size > 1:
        found.append(ShareModelState())
    found.append(SaveCheckpoints(job))
    if config["run"]["tensorboard"]:
        found += dist_callbacks.root_only(RunTensorBoard(job.run_dir))
    return [*found, job.report]
