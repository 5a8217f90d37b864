"""Synchronized moments and batch normalization as differentiable TF ops.

`sync_moments` is the `tf.nn.moments` of the distributed world and
`sync_batch_normalization` the training-mode batch norm that
`SyncBatchNormalization` runs. Each costs exactly one all-reduce forward and
one backward, O(C) values whatever the number of ranks, through custom
gradients (autodiff through the forward collective would add more).
"""
import tensorflow as tf

from dist_bn import collectives
from dist_bn import kernels
from dist_bn import moments


def compute_dtype(dtype):
    """The dtype statistics and normalization are computed in: float32 for
    float16/bfloat16 inputs (mixed precision), the input's own otherwise."""
    return tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype


def global_moments(x, axes, name, process_set, weights=None):
    """(count, mean, variance) over all ranks' `x`, float64, not differentiable.

    One all-reduce of 2C+1 float64 values (3C with per-channel mask counts)
    named `name/moments`. `weights` are 0/1 mask weights (moments.mask_weights).
    """
    count, mean, m2 = moments.local_moments(x, axes, weights)
    packed = moments.pack_moments(count, mean, m2)
    summed = collectives.allreduce_sum(packed, f"{name}/moments", process_set)
    return moments.unpack_moments(summed, mean.shape[0])


def sync_moments(x, axes, keepdims=False, process_set=None, name="sync_moments"):
    """Mean and (biased) variance of `x` over `axes` and over every rank.

    Differentiable: the gradient is that of the sum of every rank's loss,
    with one all-reduce of the 2C upstream values. Every rank must call it
    (an empty `x` is fine) with a `name` unique among collectives in flight.
    Statistics are float32 for float16/bfloat16 inputs and x's dtype otherwise.
    """
    x = tf.identity(x)  # see sync_batch_normalization
    if not x.dtype.is_floating:
        raise TypeError(f"sync_moments needs a floating-point tensor, got {x.dtype.name}.")
    process_set = collectives.resolve_process_set(process_set)
    ndim = x.shape.rank
    axes = sorted(a % ndim for a in axes)
    kept_shape = [1 if i in axes else -1 for i in range(ndim)]
    compute = compute_dtype(x.dtype)

    @tf.custom_gradient
    def _moments(x):
        xc = tf.cast(x, compute)
        count, mean64, var64 = global_moments(xc, axes, name, process_set)
        mean, variance = tf.cast(mean64, compute), tf.cast(var64, compute)

        def grad(d_mean, d_variance):
            d_mean = tf.zeros_like(mean) if d_mean is None else tf.reshape(d_mean, [-1])
            d_var = tf.zeros_like(variance) if d_variance is None else tf.reshape(d_variance, [-1])
            summed = collectives.allreduce_sum(
                tf.concat([d_mean, d_var], 0), f"{name}/grad", process_set
            )
            n = tf.cast(count, compute)
            g_mean = tf.math.divide_no_nan(summed[: mean.shape[0]], n)
            g_var = tf.math.divide_no_nan(2.0 * summed[mean.shape[0] :], n)
            dx = tf.reshape(g_mean, kept_shape) + (
                xc - tf.reshape(mean, kept_shape)
            ) * tf.reshape(g_var, kept_shape)
            return tf.cast(dx, x.dtype)

        if keepdims:
            return (tf.reshape(mean, kept_shape), tf.reshape(variance, kept_shape)), grad
        return (mean, variance), grad

    return _moments(x)


def sync_batch_normalization(
    x, gamma, beta, axis, epsilon, process_set=None, name="sync_batch_normalization",
    weights=None,
):
    """Training-mode batch norm of `x` with statistics over every rank.

    Returns (y, mean, variance, count): y in x's dtype, and the global float64
    mean, biased variance and count for the moving averages (not
    differentiable). Gradients flow to x, gamma and beta; gamma's and beta's are
    this rank's share (sum them over ranks, as a gradient all-reduce does).
    With mask `weights` (0/1, moments.mask_weights) the statistics cover the
    unmasked values only, and only those receive the statistics' gradient;
    every value is normalized, as in Keras.
    """
    # Own copies in the current graph: inside a tf.cond branch the gradient
    # closure below must not capture tensors of the enclosing graph.
    x, gamma, beta = tf.identity(x), tf.identity(gamma), tf.identity(beta)
    if weights is not None:
        weights = tf.identity(weights)
    axes = moments.reduction_axes(x.shape.rank, axis)
    count, mean64, var64 = global_moments(tf.stop_gradient(x), axes, name, process_set, weights)
    mean, variance = tf.cast(mean64, x.dtype), tf.cast(var64, x.dtype)
    inv_std = tf.math.rsqrt(variance + epsilon)
    # What rounding the mean to x's dtype dropped, in units of std: with it,
    # x_hat = (x - mean) * inv_std - shift_lo is as exact as float32 allows
    # even where |mean| >> std (the kernels subtract the rounded mean exactly).
    shift_lo = tf.cast(mean64 - tf.cast(mean, tf.float64), x.dtype) * inv_std

    @tf.custom_gradient
    def _normalize(x, gamma, beta):
        y = kernels.scale_shift(x, mean, variance, gamma, beta - gamma * shift_lo, epsilon, axis)

        def grad(dy):
            # dx = gamma*r*(dy - A/N - x_hat*B/N), A and B summed over ranks:
            # the fixed-statistics part, plus a per-channel affine map of x.
            dx_fixed, sum_dy_xhat, sum_dy = kernels.grad_parts(
                dy, x, mean, variance, gamma, epsilon, axis
            )
            sum_dy_xhat = sum_dy_xhat - shift_lo * sum_dy
            channels = sum_dy.shape[0]
            summed = collectives.allreduce_sum(
                tf.concat([sum_dy, sum_dy_xhat], 0), f"{name}/grad", process_set
            )
            n = tf.cast(count, x.dtype)
            scale = gamma * inv_std
            per_xhat = -scale * tf.math.divide_no_nan(summed[channels:], n)
            per_value = -scale * tf.math.divide_no_nan(summed[:channels], n)
            correction = kernels.scale_shift(
                x, mean, variance, per_xhat, per_value - per_xhat * shift_lo, epsilon, axis
            )
            if weights is not None:
                correction = weights * correction
            return dx_fixed + correction, sum_dy_xhat, sum_dy

        return y, grad

    return _normalize(x, gamma, beta), mean64, var64, count
