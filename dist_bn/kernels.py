"""Per-channel affine passes of batch norm, on TF's fused kernels where they are fast.

Given statistics (global ones, in dist_bn), batch norm needs two kinds of
full-tensor passes, and each has two implementations with one interface:

- `scale_shift`: (x - mean) * scale * rsqrt(variance + eps) + offset. The
  forward output is scale_shift with (gamma, beta); the backward's correction
  for the statistics is another scale_shift (see dist_bn.ops).
- `grad_parts`: gamma * rsqrt(variance + eps) * dy, sum(dy * x_hat), sum(dy).

Channels-last inputs of any rank are viewed as (P, 1, 1, C) NHWC, free of
copies, and when float32 (half inputs are upcast before) go through FusedBatchNormV3 / FusedBatchNormGradV3 in inference
mode (which take the statistics as given): one fused pass each. Other channel
axes use plain TF ops, because TF's CPU fused kernels transpose
channels-first tensors, which costs more than they save.
"""
import tensorflow as tf

from dist_bn import moments


def uses_fused_kernel(x, axis):
    """True for float32 inputs with channels last, the case the fused kernels serve."""
    ndim = x.shape.rank
    return x.dtype == tf.float32 and axis % ndim == ndim - 1


def _as_nhwc(x):
    return tf.reshape(x, [-1, 1, 1, x.shape[-1]])


def scale_shift(x, mean, variance, scale, offset, epsilon, axis):
    """(x - mean) * scale * rsqrt(variance + epsilon) + offset, per channel of `axis`.

    Subtracting the mean first keeps float32 results accurate when
    |mean| >> std (the folded x * a + b form cancels catastrophically there).
    """
    if uses_fused_kernel(x, axis):
        y = tf.raw_ops.FusedBatchNormV3(
            x=_as_nhwc(x), scale=scale, offset=offset, mean=mean, variance=variance,
            epsilon=epsilon, data_format="NHWC", is_training=False,
        )[0]
        return tf.reshape(y, tf.shape(x))
    shape = moments.broadcast_shape(x.shape.rank, axis)
    factor = tf.reshape(scale * tf.math.rsqrt(variance + epsilon), shape)
    return (x - tf.reshape(mean, shape)) * factor + tf.reshape(offset, shape)


def grad_parts(dy, x, mean, variance, gamma, epsilon, axis):
    """(gamma * r * dy, sum(dy * x_hat), sum(dy)) with r = rsqrt(variance + eps).

    The first is dx with the statistics held fixed; the sums are this rank's
    parts of the statistics' gradient (and gamma's and beta's gradients).
    """
    if uses_fused_kernel(x, axis):
        dx, sum_dy_xhat, sum_dy = tf.raw_ops.FusedBatchNormGradV3(
            y_backprop=_as_nhwc(dy), x=_as_nhwc(x), scale=gamma,
            reserve_space_1=mean, reserve_space_2=variance,
            reserve_space_3=tf.zeros([0], x.dtype),
            epsilon=epsilon, data_format="NHWC", is_training=False,
        )[:3]
        return tf.reshape(dx, tf.shape(x)), sum_dy_xhat, sum_dy
    axes = moments.reduction_axes(x.shape.rank, axis)
    shape = moments.broadcast_shape(x.shape.rank, axis)
    inv_std = tf.math.rsqrt(variance + epsilon)
    sum_dy = tf.reduce_sum(dy, axes)
    sum_dy_xhat = tf.reduce_sum(dy * (x - tf.reshape(mean, shape)), axes) * inv_std
    return dy * tf.reshape(gamma * inv_std, shape), sum_dy_xhat, sum_dy
