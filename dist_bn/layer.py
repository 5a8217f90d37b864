"""`SyncBatchNormalization`: Keras 3 batch norm with statistics over all ranks."""
import keras
import numpy as np
import tensorflow as tf

from dist_bn import collectives
from dist_bn import keras_backend
from dist_bn import kernels
from dist_bn import moments
from dist_bn import ops


@keras.saving.register_keras_serializable(package="dist_bn")
class SyncBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalization whose training statistics cover the global batch.

    A drop-in for `keras.layers.BatchNormalization` (same arguments, same
    weights `gamma`, `beta`, `moving_mean`, `moving_variance`) for data-parallel
    training with Horovod: in training mode each rank's per-channel count, mean
    and M2 are merged with one all-reduce, so every rank normalizes with the
    mean and variance of the batch concatenated over the process set, exactly,
    whatever the per-rank batch sizes (empty ones included). The backward pass
    costs one more all-reduce of 2C values. Moving statistics come from the
    global statistics and are identical on every rank. Inference uses them and
    communicates nothing. With one process, or Horovod not initialized, it
    computes what `BatchNormalization` computes.

    Args:
        axis, momentum, epsilon, center, scale, *_initializer, *_regularizer,
            *_constraint: as for `keras.layers.BatchNormalization`.
        process_set: ranks that share statistics: None for all ranks, a
            `hvd.ProcessSet`, or a list of ranks of a registered process set
            (e.g. the GPUs of one node).
        unbiased_moving_variance: if True, the moving variance accumulates
            the unbiased variance N/(N-1) * var with N the global count
            (PyTorch's convention); Keras's default is the biased one.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Masks follow Keras: in training the statistics cover the unmasked
    positions (counted per rank, exactly merged), in inference the mask is
    ignored. All ranks of the process set must call the layer in training
    mode together (a rank with an empty batch too), with the same channel
    count; an empty batch may even carry a wrong one (see
    `with_layer_channels`).
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        process_set=None,
        unbiased_moving_variance=False,
        **kwargs,
    ):
        keras_backend.require_tensorflow("SyncBatchNormalization")
        # A BatchNormalization config converted to this layer may carry it.
        kwargs.pop("synchronized", None)
        if isinstance(axis, (list, tuple)):
            raise ValueError(
                f"SyncBatchNormalization normalizes along one axis, got axis={axis}. "
                "Pass the channel axis as an int: -1 for channels-last, 1 for channels-first."
            )
        super().__init__(
            axis=axis,
            momentum=momentum,
            epsilon=epsilon,
            center=center,
            scale=scale,
            beta_initializer=beta_initializer,
            gamma_initializer=gamma_initializer,
            moving_mean_initializer=moving_mean_initializer,
            moving_variance_initializer=moving_variance_initializer,
            beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint,
            gamma_constraint=gamma_constraint,
            **kwargs,
        )
        self.process_set = process_set
        self.unbiased_moving_variance = bool(unbiased_moving_variance)
        # Horovod's collectives do not compile with XLA; keeps jit_compile="auto" off.
        self.supports_jit = False
        self._ranks_checked = False

    def build(self, input_shape):
        ndim = len(input_shape)
        if ndim < 2:
            raise ValueError(
                f"{self.name}: SyncBatchNormalization needs inputs of rank >= 2 "
                f"(batch, ..., channels), got shape {tuple(input_shape)}."
            )
        if not -ndim <= self.axis < ndim:
            raise ValueError(
                f"{self.name}: axis={self.axis} is out of range for inputs of rank "
                f"{ndim} (shape {tuple(input_shape)}); use an axis in [{-ndim}, {ndim - 1}]: "
                "-1 for channels-last, 1 for channels-first."
            )
        if input_shape[self.axis] is None:
            raise ValueError(
                f"{self.name}: the channel dimension (axis {self.axis}) of input shape "
                f"{tuple(input_shape)} is undefined; give the layer before it a fixed "
                "number of channels or declare it in keras.Input(shape=...)."
            )
        super().build(input_shape)
        # The channel count is checked in call(), where an empty batch with a
        # wrong one (see with_layer_channels) can be let through.
        self.input_spec = keras.InputSpec(ndim=ndim)

    def call(self, inputs, training=None, mask=None):
        if not inputs.dtype.is_floating:
            raise TypeError(
                f"{self.name}: inputs must be floating point, got {inputs.dtype.name}; "
                "cast them first, e.g. keras.ops.cast(x, 'float32')."
            )
        x = with_layer_channels(self, tf.cast(inputs, ops.compute_dtype(inputs.dtype)))
        weights = None if mask is None else moments.mask_weights(mask, x, self.axis)
        if not self.trainable or training is None:
            training = False
        if isinstance(training, (bool, np.bool_)):
            outputs = self._train(x, weights) if training else self._infer(x)
        else:
            outputs = tf.cond(
                tf.cast(training, tf.bool),
                lambda: self._train(x, weights),
                lambda: self._infer(x),
            )
        return tf.cast(outputs, self.compute_dtype)

    def _infer(self, x):
        """Normalize with the moving statistics: no collective, no update."""
        return kernels.scale_shift(
            x,
            tf.cast(self.moving_mean, x.dtype),
            tf.cast(self.moving_variance, x.dtype),
            self._gamma(x.dtype),
            self._beta(x.dtype),
            self.epsilon,
            self.axis,
        )

    def _train(self, x, weights=None):
        """Normalize with the global batch statistics and update the moving ones.

        With mask `weights`, the statistics cover the unmasked values only.
        """
        process_set = collectives.resolve_process_set(self.process_set)
        name = f"dist_bn/{self.path or self.name}"
        if not self._ranks_checked:
            collectives.check_same_on_all_ranks(
                [x.shape[self.axis], x.shape.rank, self.axis % x.shape.rank],
                f"{self.name}: input (channels, rank, channel axis)",
                f"{name}/check",
                process_set,
            )
            self._ranks_checked = True
        y, mean, variance, count = ops.sync_batch_normalization(
            x, self._gamma(x.dtype), self._beta(x.dtype), self.axis, self.epsilon,
            process_set=process_set, name=name, weights=weights,
        )
        if self.unbiased_moving_variance:
            variance = moments.unbiased_variance(variance, count)
        self._update_moving(self.moving_mean, tf.cast(mean, x.dtype), count)
        self._update_moving(self.moving_variance, tf.cast(variance, x.dtype), count)
        return y

    def _update_moving(self, variable, value, count):
        """Keras's moving average, skipped when the global batch is empty."""
        old = tf.cast(variable, value.dtype)
        new = moments.moving_average(old, value, self.momentum)
        variable.assign(tf.cast(tf.where(count > 0, new, old), variable.dtype))

    def _gamma(self, dtype):
        if self.scale:
            return tf.cast(self.gamma, dtype)
        return tf.ones([self.moving_mean.shape[0]], dtype)

    def _beta(self, dtype):
        if self.center:
            return tf.cast(self.beta, dtype)
        return tf.zeros([self.moving_mean.shape[0]], dtype)

    def get_config(self):
        config = super().get_config()
        config.pop("synchronized", None)
        config["process_set"] = collectives.process_set_ranks(self.process_set)
        config["unbiased_moving_variance"] = self.unbiased_moving_variance
        return config


def with_layer_channels(layer, x):
    """`x`, or for an empty batch an empty tensor with the BN layer's channel count.

    A rank with an empty batch can receive a tensor whose channel count is
    wrong: oneDNN's CPU Conv3D (TF 2.18) returns an empty batch shaped like
    its *input*, even where the graph's static shape says otherwise (so no
    shape-based fix survives Grappler). The weights say how many channels
    there are, so an empty shard still sends 2C+1 zeros and outputs C
    channels. Only emptiness is tested at run time: one scalar predicate.
    """
    channels = layer.moving_mean.shape[0]
    axis = layer.axis % x.shape.rank
    if x.shape[axis] not in (None, channels) and x.shape[0] != 0:
        raise ValueError(
            f"{layer.name}: expected axis {layer.axis} of the input to have {channels} "
            f"channels (the layer was built for them), got input shape {tuple(x.shape)}."
        )
    if x.shape[0] is not None and x.shape[0] > 0:
        return x
    dims = tf.unstack(tf.shape(x))
    empty_shape = [0] + [
        channels if i == axis else (d if d is not None else dims[i])
        for i, d in enumerate(x.shape) if i > 0
    ]

    def empty():
        # + sum(x) (= 0) keeps x connected, so its gradient is zeros, not None.
        return tf.zeros(empty_shape, x.dtype) + tf.reduce_sum(x)

    if x.shape[0] == 0:
        return empty()
    return tf.cond(tf.size(x) > 0, lambda: x, empty)
