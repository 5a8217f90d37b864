"""Keras callbacks for training across Horovod ranks, under Horovod's names.

- `BroadcastGlobalVariablesCallback(root_rank)`: the model's and the
  optimizer's variables from `root_rank` to every rank, at the first training
  batch: after every `on_train_begin`, so also after a restore by Keras's
  `BackupAndRestore` whatever the callbacks' order.
- `MetricAverageCallback()`: logs exact over ranks. It sums every metric's
  state variables (totals and counts; every built-in Keras metric's state is
  a sum) over ranks and reads the results, so ranks with different sample
  counts are weighted by them. Training results are read before `fit`'s
  validation reuses the metric objects. It replaces `fit`'s epoch logs (the
  History and the callbacks after it see exact values: put it before
  ModelCheckpoint, TensorBoard, EarlyStopping). Keras hands callbacks a copy
  of `evaluate`'s logs, so for `evaluate` use `dist_bn.keras.evaluate`.
- `LearningRateWarmupCallback(initial_lr, warmup_epochs)`: the learning rate
  rises per batch from `initial_lr / size` to `initial_lr` (Goyal et al.,
  2017), as Horovod's. Keras 3's SGD keeps `lr * gradient` out of its
  momentum, so no momentum correction is needed.
- `BackupAndRestore(backup_dir, save_freq)`: Keras's, written by rank 0,
  restored on every rank, and exact mid-epoch (`dist_bn.keras.backup_and_restore`).
- `root_only(*callbacks)` and `root_verbose(verbose)`: checkpoints,
  TensorBoard and progress bars on one rank only.
"""
import horovod.tensorflow as hvd
import keras
import tensorflow as tf

from dist_bn.keras import optimizer as _optimizer
from dist_bn.keras.backup_and_restore import BackupAndRestore  # noqa: F401
from dist_bn.keras.variables import broadcast_variables, is_random_state


def _metric_variables(model):
    return [v for metric in model.metrics for v in metric.variables]


def global_metric_results(model, process_set=hvd.global_process_set):
    """`model.get_metrics_result()` over all ranks: state variables summed, then read.

    Collective: every rank of the set must call it. The local states are left
    as they were.
    """
    variables = _metric_variables(model)
    if not hvd.is_initialized() or process_set.size() == 1 or not variables:
        return model.get_metrics_result()
    local = [tf.identity(v.value) for v in variables]
    summed = hvd.grouped_allreduce(local, op=hvd.Sum, process_set=process_set,
                                   name="dist_bn.keras.metric_states")
    try:
        for v, s in zip(variables, summed):
            v.assign(s)
        return model.get_metrics_result()
    finally:
        for v, value in zip(variables, local):
            v.assign(value)


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """Broadcasts model and optimizer variables from `root_rank` before the first step.

    The optimizer is built first if it is not, so its slots and iteration
    count are broadcast too. Random-number states (Dropout's SeedGenerator)
    are left per rank, so ranks draw independent masks for their samples, as
    in one process. Once per `fit` (each `fit` call broadcasts again,
    which covers a restore between calls).
    """

    def __init__(self, root_rank=0, process_set=hvd.global_process_set):
        super().__init__()
        self.root_rank = root_rank
        self.process_set = process_set
        self._done = False

    def on_train_begin(self, logs=None):
        self._done = False
        opt = self.model.optimizer
        if (isinstance(opt, keras.optimizers.LossScaleOptimizer)
                and _optimizer.is_distributed(opt.inner_optimizer)):
            raise ValueError(
                "The LossScaleOptimizer wraps a DistributedOptimizer, so ranks check "
                "finiteness apart and can hang. Wrap the other way round: "
                "DistributedOptimizer(keras.optimizers.LossScaleOptimizer(opt)).")

    def on_train_batch_begin(self, batch, logs=None):
        if self._done:
            return
        opt = self.model.optimizer
        if opt is not None and not opt.built:
            opt.build(self.model.trainable_variables)
        variables = [v for v in self.model.variables if not is_random_state(v)]
        variables += [] if opt is None else list(opt.variables)
        broadcast_variables(variables, self.root_rank, self.process_set)
        self._done = True


class MetricAverageCallback(keras.callbacks.Callback):
    """Replaces `fit`'s epoch logs (training and validation) by their exact values over ranks."""

    def __init__(self, process_set=hvd.global_process_set):
        super().__init__()
        self.process_set = process_set
        self._in_epoch = False
        self._train_results = None

    def on_epoch_begin(self, epoch, logs=None):
        self._in_epoch = True
        self._train_results = None

    def on_test_begin(self, logs=None):
        if self._in_epoch and self._train_results is None:
            # fit's validation is about to reset the metrics the epoch filled.
            self._train_results = global_metric_results(self.model, self.process_set)

    def on_epoch_end(self, epoch, logs=None):
        current = global_metric_results(self.model, self.process_set)
        if self._train_results is None:
            train, validation = current, {}
        else:  # the metrics now hold the validation run's states
            train, validation = self._train_results, {f"val_{k}": v for k, v in current.items()}
        if logs is not None:
            # Validation keys also where this rank's validation shard was empty
            # (Keras then logs none): every rank holds the same logs.
            logs.update({**{k: v for k, v in train.items() if k in logs}, **validation})
        self._in_epoch = False
        self._train_results = None


class LearningRateWarmupCallback(keras.callbacks.Callback):
    """Linear warm-up from `initial_lr / size` to `initial_lr` over `warmup_epochs`.

    `initial_lr` is the scaled rate (see `scale_learning_rate`). The rate is
    set at every batch of the first `warmup_epochs` epochs, from the
    fractional epoch; `steps_per_epoch` defaults to what `fit` reports.
    """

    def __init__(self, initial_lr, warmup_epochs=5, steps_per_epoch=None, verbose=0,
                 process_set=hvd.global_process_set):
        super().__init__()
        if warmup_epochs <= 0:
            raise ValueError(f"warmup_epochs must be positive; got {warmup_epochs}.")
        self.initial_lr = float(initial_lr)
        self.warmup_epochs = warmup_epochs
        self.steps_per_epoch = steps_per_epoch
        self.verbose = verbose
        self.process_set = process_set
        self._epoch = 0

    def _size(self):
        return self.process_set.size() if hvd.is_initialized() else 1

    def learning_rate_at(self, epoch):
        """The rate at a fractional epoch: Horovod's multiplier times `initial_lr`."""
        size = self._size()
        epoch = min(epoch, self.warmup_epochs)
        return self.initial_lr / size * (epoch * (size - 1) / self.warmup_epochs + 1)

    def on_train_begin(self, logs=None):
        if self.steps_per_epoch is None:
            self.steps_per_epoch = self.params.get("steps")
        if not self.steps_per_epoch:
            raise ValueError("LearningRateWarmupCallback needs steps_per_epoch: pass it, "
                             "or give fit a dataset of known length or steps_per_epoch.")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if self._epoch >= self.warmup_epochs:
            return
        self.model.optimizer.learning_rate = self.learning_rate_at(
            self._epoch + batch / self.steps_per_epoch)

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.warmup_epochs - 1:
            self.model.optimizer.learning_rate = self.initial_lr
            if self.verbose and (not hvd.is_initialized() or hvd.rank() == 0):
                print(f"\nEpoch {epoch + 1}: finished gradual learning rate warmup to "
                      f"{self.initial_lr:g}.")


def scale_learning_rate(learning_rate, process_set=hvd.global_process_set):
    """`learning_rate` times the number of ranks: the linear scaling rule."""
    return learning_rate * (process_set.size() if hvd.is_initialized() else 1)


def is_root(root_rank=0):
    """True on `root_rank`, and in a single process without Horovod."""
    return not hvd.is_initialized() or hvd.rank() == root_rank


def root_only(*callbacks, root_rank=0):
    """`callbacks` as a list on `root_rank`, an empty list elsewhere.

    For ModelCheckpoint, TensorBoard, CSVLogger and other writers:
    `callbacks=[BroadcastGlobalVariablesCallback(0), MetricAverageCallback(),
    *root_only(ModelCheckpoint(...))]`.
    """
    return list(callbacks) if is_root(root_rank) else []


def root_verbose(verbose="auto", root_rank=0):
    """The `verbose` for `fit`/`evaluate`/`predict`: as given on `root_rank`, 0 elsewhere."""
    return verbose if is_root(root_rank) else 0
