"""Float64 NumPy batch norm on a whole (concatenated) batch: the reference.

Nothing here knows about ranks, Horovod or TensorFlow, so it cannot share a
mistake with the code it checks. `dist_bn.verify` and the tests measure
`SyncBatchNormalization` against it: every rank computes what one process
would get on the global batch, and compares its own slice.
"""
import numpy as np


def reduction_axes(ndim, axis):
    """Every axis but the channel axis."""
    return tuple(i for i in range(ndim) if i != axis % ndim)


def per_channel(v, ndim, axis):
    """Reshape a per-channel vector to broadcast against an `ndim` array."""
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return np.reshape(v, shape)


def mask_weights(mask, x):
    """0/1 float64 weights broadcast to x from a Keras mask (one axis fewer, expanded last)."""
    if mask is None:
        return np.ones(np.shape(x))
    return np.broadcast_to(np.asarray(mask, bool)[..., np.newaxis], np.shape(x)).astype(np.float64)


def moments(x, axis, mask=None):
    """Count, mean and biased variance per channel, float64 two-pass.

    With a mask, over the unmasked values only; count is then per channel.
    A channel with no values has mean 0 and variance 0.
    """
    x = np.asarray(x, np.float64)
    axes = reduction_axes(x.ndim, axis)
    w = mask_weights(mask, x)
    counts = w.sum(axis=axes)
    safe = np.maximum(counts, 1)
    mean = (w * x).sum(axis=axes) / safe
    var = (w * (x - per_channel(mean, x.ndim, axis)) ** 2).sum(axis=axes) / safe
    count = int(np.prod([x.shape[a] for a in axes])) if mask is None else counts
    return count, mean, var


def normalize(x, axis, mean, var, gamma, beta, epsilon):
    """gamma * (x - mean) / sqrt(var + eps) + beta with the given statistics."""
    x = np.asarray(x, np.float64)
    n = x.ndim
    xhat = (x - per_channel(mean, n, axis)) / np.sqrt(per_channel(var, n, axis) + epsilon)
    return per_channel(gamma, n, axis) * xhat + per_channel(beta, n, axis)


def forward(x, axis, gamma, beta, epsilon, mask=None):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta with the batch's statistics.

    With a mask the statistics cover the unmasked values, and every value is
    normalized (Keras's definition).
    """
    _, mean, var = moments(x, axis, mask)
    return normalize(x, axis, mean, var, gamma, beta, epsilon)


def backward(x, dy, axis, gamma, epsilon, mask=None):
    """(dx, dgamma, dbeta) of sum(dy * forward(x, mask)) through the batch statistics.

    The statistics' part of dx reaches unmasked values only.
    """
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    _, mean, var = moments(x, axis, mask)
    w = mask_weights(mask, x)
    axes = reduction_axes(x.ndim, axis)
    counts = w.sum(axis=axes)
    inv_std = 1.0 / np.sqrt(var + epsilon)
    xhat = (x - per_channel(mean, x.ndim, axis)) * per_channel(inv_std, x.ndim, axis)
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * xhat).sum(axis=axes)
    scale = per_channel(gamma * inv_std, x.ndim, axis)
    per_value = per_channel(np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0), x.ndim, axis)
    dx = scale * (dy - w * per_value * (per_channel(dbeta, x.ndim, axis)
                                        + xhat * per_channel(dgamma, x.ndim, axis)))
    return dx, dgamma, dbeta


def moving_statistics(batches, axis, momentum, mean0, var0, unbiased=False):
    """Moving mean and variance after training steps on `batches`, Keras's rule."""
    mean_m, var_m = np.array(mean0, np.float64), np.array(var0, np.float64)
    for x in batches:
        count, mean, var = moments(x, axis)
        if count == 0:
            continue
        if unbiased and count > 1:
            var = var * count / (count - 1)
        mean_m = momentum * mean_m + (1 - momentum) * mean
        var_m = momentum * var_m + (1 - momentum) * var
    return mean_m, var_m
