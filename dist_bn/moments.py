"""Per-channel batch statistics that merge exactly across ranks.

Each rank reduces its own values to a count, a mean and M2 = sum((x - mean)^2)
with a two-pass algorithm in the compute dtype, then packs them into one
float64 vector whose element-wise *sum* over ranks carries everything the
global statistics need: [n, n*m (C values), M2 + n*m^2 (C values)]. Summing is
what an all-reduce does, so one collective of 2C+1 values serves any number of
ranks, any per-rank batch sizes (empty ones included), and the float64 unpack
keeps E[x^2] - E[x]^2 exact for float32 data even when |mean|/std is 1e3 or
more.

These are pure TensorFlow functions with no Horovod in them, so they can be
tested alone; `dist_bn.ops` wires them to the collectives, and
`dist_bn.kernels` applies the statistics.
"""
import tensorflow as tf


def reduction_axes(ndim, axis):
    """The axes a per-channel statistic reduces over: all but `axis`."""
    axis = axis % ndim
    return [i for i in range(ndim) if i != axis]


def broadcast_shape(ndim, axis):
    """Shape that makes a [C] vector broadcast along `axis` of an ndim tensor."""
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return shape


def local_count(x, axes):
    """Number of values per channel, from the shape alone (never ones_like)."""
    shape = tf.shape(x, out_type=tf.int64)
    return tf.reduce_prod(tf.gather(shape, axes))


def local_moments(x, axes):
    """Two-pass (count, mean, M2) per channel of `x` over `axes`.

    count is an int64 scalar; mean and M2 are [C] in x's dtype. An empty `x`
    gives count 0, mean 0 and M2 0 (no NaN).
    """
    count = local_count(x, axes)
    total = tf.reduce_sum(x, axes, keepdims=True)
    mean = tf.math.divide_no_nan(total, tf.cast(count, x.dtype))
    m2 = tf.reduce_sum(tf.math.squared_difference(x, mean), axes)
    return count, tf.reshape(mean, [-1]), m2


def pack_moments(count, mean, m2):
    """The float64 vector [n, n*m, M2 + n*m^2] whose sum over ranks is mergeable."""
    n = tf.cast(count, tf.float64)
    mean = tf.cast(mean, tf.float64)
    m2 = tf.cast(m2, tf.float64)
    return tf.concat([n[tf.newaxis], n * mean, m2 + n * tf.square(mean)], axis=0)


def unpack_moments(packed):
    """Global (count, mean, variance) in float64 from a summed packed vector.

    variance is the biased (population) variance, clipped at 0. With a global
    count of 0 the mean and variance are 0. The channel count must be static.
    """
    channels = (packed.shape[0] - 1) // 2
    count = packed[0]
    mean = tf.math.divide_no_nan(packed[1 : 1 + channels], count)
    mean_square = tf.math.divide_no_nan(packed[1 + channels :], count)
    variance = tf.maximum(mean_square - tf.square(mean), 0.0)
    return count, mean, variance


def unbiased_variance(variance, count):
    """variance * N / (N - 1), or variance itself when N <= 1."""
    count = tf.cast(count, variance.dtype)
    factor = tf.where(count > 1.0, count / tf.maximum(count - 1.0, 1.0), 1.0)
    return variance * factor


def moving_average(moving, value, momentum):
    """Keras's update rule: moving * momentum + value * (1 - momentum)."""
    return moving * momentum + value * (1.0 - momentum)
