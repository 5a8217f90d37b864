"""Per-channel batch statistics that merge exactly across ranks.

Each rank reduces its own values to a count, a mean and M2 = sum((x - mean)^2)
and packs them into one float64 vector whose element-wise *sum* over ranks
carries everything the global statistics need: [n, n*m (C values), M2 + n*m^2
(C values)]. Summing is what an all-reduce does, so one collective of 2C+1
values serves any number of ranks, any per-rank batch sizes (empty ones
included), and the float64 unpack keeps E[x^2] - E[x]^2 exact for float32 data
even when |mean|/std is 1e4.

Inside a rank the sums are accurate too: a float32 reduction over hundreds of
thousands of values accumulates sequentially and drifts (at 400k values per
channel and |mean|/std = 1e3 the mean is off by several std). So values are
first shifted by a per-channel pivot, summed in float32 only over blocks of at
most `BLOCK_SIZE` values (trailing axes of static size), and the block sums are
added in float64. A mask makes the count per position (or per channel and
position); the packed vector then carries per-channel counts, [n (C values),
n*m, M2 + n*m^2], when the mask varies along the channel axis.

These are pure TensorFlow functions with no Horovod in them, so they can be
tested alone; `dist_bn.ops` wires them to the collectives, and
`dist_bn.kernels` applies the statistics.
"""
import tensorflow as tf

# Most values one float32 partial sum adds up. Measured on TF 2.18's CPU
# reductions (64 x 16 x 56 x 56 values per channel, |mean|/std = 1e4): blocks of
# one 56-wide row give a variance within 3e-7, blocks of 56 x 56 within 3.5e-6,
# at the same speed; so blocks stay small.
BLOCK_SIZE = 256


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


def channel_axis(ndim, axes):
    """The one axis of an ndim tensor that is not in `axes` (the channel axis)."""
    (axis,) = [i for i in range(ndim) if i not in axes]
    return axis


def block_axes(shape, axes, block_size=BLOCK_SIZE):
    """The innermost reduction axes whose static sizes multiply to <= block_size.

    Those axes are summed in float32, the others in float64. An axis of
    unknown size (the batch axis, usually) ends the block.
    """
    chosen, size = [], 1
    for a in sorted(axes, reverse=True):
        if shape[a] is None or size * shape[a] > block_size:
            break
        chosen.append(a)
        size *= shape[a]
    return sorted(chosen)


def blocked_sum(t, axes, blocks):
    """Sum of `t` over `axes` in float64: float32 partial sums over `blocks` first."""
    if blocks:
        t = tf.reduce_sum(t, blocks, keepdims=True)
    return tf.reduce_sum(tf.cast(t, tf.float64), axes)


def pivot(x, axes):
    """One value of each channel of `x` (its first along `axes`), or 0 when x is empty.

    Subtracting it before summing keeps partial sums near the data's spread
    rather than its offset, which is what float32 summation loses.
    """
    first = x[tuple(slice(0, 1) if i in axes else slice(None) for i in range(x.shape.rank))]
    return tf.reduce_sum(first, axes, keepdims=True)


def mask_weights(mask, x, axis):
    """A Keras mask (one axis fewer than x, broadcast along the last axis) as 0/1 weights.

    Returned in x's dtype, broadcast to x's shape except along the channel
    axis, where it keeps size 1 unless the mask varies there.
    """
    ndim = x.shape.rank
    if mask.shape.rank != ndim - 1:
        raise ValueError(
            f"The mask must have one dimension less than the inputs (Keras's convention); "
            f"got mask shape {tuple(mask.shape)} for inputs of shape {tuple(x.shape)}."
        )
    weights = tf.cast(tf.cast(mask, tf.bool), x.dtype)[..., tf.newaxis]
    axis = axis % ndim
    target = tf.tensor_scatter_nd_update(
        tf.shape(x), [[axis]], [1 if weights.shape[axis] == 1 else tf.shape(x)[axis]]
    )
    return tf.broadcast_to(weights, target)


def local_moments(x, axes, weights=None):
    """Accurate (count, mean, M2) per channel of `x` over `axes`, in float64.

    count is a float64 scalar, or [C] when `weights` (0/1, see mask_weights)
    vary along the channel axis; mean and M2 are [C]. Only unmasked values
    count. An empty or fully masked `x` gives count 0, mean 0 and M2 0.
    Two passes: a pivot-shifted blocked sum for the mean (with a mask, the
    shift is a first, rough masked mean, since the pivot may be a masked
    outlier), then a blocked sum of squared deviations from the
    float32-rounded mean, corrected in float64 for that rounding.
    """
    blocks = block_axes(x.shape, axes)
    shape = broadcast_shape(x.shape.rank, channel_axis(x.shape.rank, axes))
    if weights is None:
        count = tf.cast(local_count(x, axes), tf.float64)
        shift = pivot(x, axes)
        shifted_sum = blocked_sum(x - shift, axes, blocks)
    else:
        count = tf.reshape(blocked_sum(weights, axes, blocks), [-1])
        if count.shape[0] == 1:
            count = count[0]
        rough = tf.math.divide_no_nan(blocked_sum(weights * x, axes, blocks), count)
        shift = tf.reshape(tf.cast(rough, x.dtype), shape)
        shifted_sum = blocked_sum(weights * (x - shift), axes, blocks)
    mean = tf.reshape(tf.cast(shift, tf.float64), [-1]) + tf.math.divide_no_nan(shifted_sum, count)
    rounded = tf.cast(mean, x.dtype)
    squares = tf.math.squared_difference(x, tf.reshape(rounded, shape))
    if weights is not None:
        squares = weights * squares
    m2 = blocked_sum(squares, axes, blocks) - count * tf.square(mean - tf.cast(rounded, tf.float64))
    return count, mean, tf.maximum(m2, 0.0)


def pack_moments(count, mean, m2):
    """The float64 vector whose sum over ranks is mergeable.

    [n, n*m, M2 + n*m^2] (2C+1 values) for a scalar count, [n, n*m, M2 + n*m^2]
    with C counts (3C values) for per-channel counts.
    """
    n = tf.cast(count, tf.float64)
    mean = tf.cast(mean, tf.float64)
    m2 = tf.cast(m2, tf.float64)
    counts = n[tf.newaxis] if n.shape.rank == 0 else n
    return tf.concat([counts, n * mean, m2 + n * tf.square(mean)], axis=0)


def unpack_moments(packed, channels=None):
    """Global (count, mean, variance) in float64 from a summed packed vector.

    variance is the biased (population) variance, clipped at 0. Where the
    count is 0 the mean and variance are 0. A vector of 2C+1 values has one
    count (a scalar); one of 3C values has a count per channel. `channels`
    defaults to the first case; the packed length must be static.
    """
    length = packed.shape[0]
    if channels is None or length == 2 * channels + 1:
        channels = (length - 1) // 2
        count, rest = packed[0], packed[1:]
    else:
        count, rest = packed[:channels], packed[channels:]
    mean = tf.math.divide_no_nan(rest[:channels], count)
    mean_square = tf.math.divide_no_nan(rest[channels:], count)
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
