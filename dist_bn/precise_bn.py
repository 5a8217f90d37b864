"""Precise BN: moving statistics replaced by the exact population statistics.

With small per-device batches the moving averages of batch norm are a noisy
estimate of what the layers see. Precise BN (fvcore's `update_bn_stats`,
SlowFast's `BN.USE_PRECISE_STATS`, detectron2's `PreciseBN`) runs the model
forward in training mode over many batches and sets each BN layer's moving
mean and variance from what it saw. Here it is exact and distributed:

- each BN layer's inputs are reduced, per batch, to the packed float64
  vector [n, n*m, M2 + n*m^2] of `dist_bn.moments` (computed in float64),
  summed over batches, then summed over all ranks with one all-reduce: the
  population count, mean and variance of everything the layer saw, weighted
  by counts. fvcore instead averages the per-batch variances, which drops
  the spread of the batch means; this is the true population variance
  (unbiased, N/(N-1), for a layer with `unbiased_moving_variance`);
- every rank receives the same summed vector, so the new statistics are
  bitwise identical on every rank;
- layers see what they see in training: a SyncBatchNormalization normalizes
  with the global batch's statistics, a plain Keras BN with its rank's, so
  a second BN's inputs depend on the first's batch statistics, as in
  training;
- the inputs are read by a temporary wrapper around each layer's `call`
  (nothing in the layer changes), and every non-trainable variable is
  restored afterwards (the training-mode forward moves the moving averages
  and random-number states); only the moving statistics change, and only
  for layers that saw at least one value. Frozen layers (trainable=False,
  which Keras runs in inference mode) are left alone;
- a mask reaching a layer restricts its statistics to the unmasked
  positions, as Keras's BatchNormalization does in training.

`PreciseBN` is the Keras callback; the training job's key is
`train.precise_bn_batches`.
"""
import logging

import keras
import tensorflow as tf

from dist_bn import collectives
from dist_bn import convert
from dist_bn import moments
from dist_bn.layer import SyncBatchNormalization

logger = logging.getLogger("dist_bn")

_NO_BATCH = object()


def _batch_inputs(batch):
    """The model inputs of a dataset element: x of (x, y[, w]), or the element."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def _tap(layer, accumulator, original):
    """A stand-in for `layer.call` that adds its inputs' packed moments to `accumulator`."""

    def call(inputs, *args, **kwargs):
        x = tf.cast(inputs, tf.float64)
        if isinstance(layer, SyncBatchNormalization):
            # An empty shard from oneDNN's Conv3D may carry its input's channel count.
            x = layer._with_layer_channels(x)
        axes = moments.reduction_axes(x.shape.rank, layer.axis)
        mask = kwargs.get("mask")
        if mask is not None and (layer.axis % x.shape.rank != x.shape.rank - 1
                                 or mask.shape.rank != x.shape.rank - 1):
            raise ValueError(
                f"precise_bn: {layer.name} got a mask of shape {tuple(mask.shape)} for inputs of shape "
                f"{tuple(x.shape)} on axis {layer.axis}; masks need channels last and one dimension "
                "less than the inputs, as keras.layers.BatchNormalization requires")
        weights = None if mask is None else moments.mask_weights(mask, x, layer.axis)
        count, mean, m2 = moments.local_moments(x, axes, weights)
        accumulator.assign_add(moments.pack_moments(count, mean, m2))
        return original(inputs, *args, **kwargs)

    return call


def _check_ready(layers):
    unbuilt = [path for path, layer in layers if not layer.built]
    if unbuilt:
        raise ValueError(f"precise_bn: BN layers {', '.join(unbuilt)} are not built; call the model "
                         "once (or build it) before computing precise statistics")


def precise_bn(model, dataset, num_batches, name="precise_bn"):
    """Set every BN layer's moving statistics to exact population statistics.

    Runs `model(x, training=True)` on `num_batches` batches of `dataset`
    (this rank's shard: an iterable of x or (x, y[, w]) batches, e.g. a
    tf.data.Dataset); on every rank, together, with the same `num_batches`
    (checked). Each trainable BatchNormalization or SyncBatchNormalization,
    at any nesting depth, gets the mean and variance of every value it saw
    over all batches and all ranks (see the module docstring). A dataset
    that runs out early on any rank is an error on every rank, not a hang.

    Returns {layer path: number of values per channel it saw over all ranks}.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"precise_bn: num_batches must be an int >= 1, got {num_batches!r}")
    process_set = collectives.resolve_process_set(None)
    layers = [(path, layer) for path, layer in convert.walk(model)
              if isinstance(layer, keras.layers.BatchNormalization)]
    frozen = [path for path, layer in layers if not layer.trainable]
    layers = [(path, layer) for path, layer in layers if layer.trainable]
    collectives.check_same_on_all_ranks([num_batches, len(layers)],
                                        "precise_bn: (num_batches, trainable BN layers)",
                                        f"{name}/check", process_set)
    if frozen:
        logger.info("precise_bn: left %d frozen BN layer(s) alone: %s", len(frozen), ", ".join(frozen))
    if not layers:
        logger.warning("precise_bn: %r has no trainable BatchNormalization layer; nothing to do", model.name)
        return {}
    _check_ready(layers)

    accumulators = [tf.Variable(tf.zeros([2 * layer.moving_mean.shape[0] + 1], tf.float64),
                                trainable=False) for _, layer in layers]
    saved = [(variable, tf.identity(variable.value)) for variable in model.non_trainable_variables]
    forward = tf.function(lambda x: model(x, training=True), reduce_retracing=True)
    for (_, layer), accumulator in zip(layers, accumulators):
        object.__setattr__(layer, "call", _tap(layer, accumulator, layer.call))
    try:
        iterator = iter(dataset)
        for index in range(num_batches):
            batch = next(iterator, _NO_BATCH)
            have = collectives.allreduce_sum(
                tf.constant([0.0 if batch is _NO_BATCH else 1.0], tf.float64), f"{name}/has_batch",
                process_set)
            ranks = collectives.group_size(process_set)
            if int(have[0]) < ranks:
                raise ValueError(
                    f"precise_bn: the dataset ran out after {index} of {num_batches} batches on "
                    f"{ranks - int(have[0])} of {ranks} rank(s); give every rank at least "
                    f"num_batches={num_batches} batches (e.g. dataset.repeat()) or lower num_batches")
            forward(_batch_inputs(batch))
    finally:
        for _, layer in layers:
            object.__delattr__(layer, "call")
        for variable, value in saved:
            variable.assign(value)

    summed = collectives.allreduce_sum(tf.concat([a.value() for a in accumulators], 0),
                                       f"{name}/moments", process_set)
    counts, offset = {}, 0
    for (path, layer), accumulator in zip(layers, accumulators):
        size = accumulator.shape[0]
        count, mean, variance = moments.unpack_moments(summed[offset:offset + size])
        offset += size
        if getattr(layer, "unbiased_moving_variance", False):
            variance = moments.unbiased_variance(variance, count)
        counts[path] = int(count.numpy())
        if counts[path] > 0:
            layer.moving_mean.assign(tf.cast(mean, layer.moving_mean.dtype))
            layer.moving_variance.assign(tf.cast(variance, layer.moving_variance.dtype))
    unseen = [path for path, count in counts.items() if count == 0]
    if unseen:
        logger.warning("precise_bn: %d BN layer(s) saw no values and keep their statistics: %s",
                       len(unseen), ", ".join(unseen))
    logger.info("precise_bn: %d BN layer(s) over %d batches", len(counts) - len(unseen), num_batches)
    return counts


class PreciseBN(keras.callbacks.Callback):
    """Keras callback: precise BN statistics before each evaluation and at the end.

    Runs `precise_bn(model, dataset, num_batches)` when an evaluation starts
    (the validation of `fit`, or `evaluate(callbacks=[...])`) and when
    training ends, unless the model has not trained since the last run; so
    validation metrics, and checkpoints written after them, use the precise
    statistics. `dataset` is iterated anew each time (a tf.data.Dataset
    restarts; give it `.repeat()` or `.shuffle()` as you like).
    """

    def __init__(self, dataset, num_batches, name="precise_bn"):
        super().__init__()
        self.dataset = dataset
        self.num_batches = num_batches
        self.name = name
        self.last_counts = None
        self._fresh = False

    def _update(self):
        if not self._fresh:
            self.last_counts = precise_bn(self.model, self.dataset, self.num_batches, name=self.name)
            self._fresh = True

    def on_train_batch_end(self, batch, logs=None):
        self._fresh = False

    def on_test_begin(self, logs=None):
        self._update()

    def on_train_end(self, logs=None):
        self._update()
