"""Float64 NumPy batch norm on a whole (concatenated) batch: the reference.

Nothing here knows about ranks or TensorFlow, so it cannot share a mistake
with the code under test.
"""
import numpy as np


def _axes(ndim, axis):
    return tuple(i for i in range(ndim) if i != axis % ndim)


def _per_channel(v, ndim, axis):
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return np.reshape(v, shape)


def moments(x, axis):
    """Count, mean and biased variance per channel, float64 two-pass."""
    x = np.asarray(x, np.float64)
    axes = _axes(x.ndim, axis)
    count = int(np.prod([x.shape[a] for a in axes]))
    if count == 0:
        channels = x.shape[axis]
        return 0, np.zeros(channels), np.zeros(channels)
    mean = x.mean(axis=axes)
    var = ((x - _per_channel(mean, x.ndim, axis)) ** 2).mean(axis=axes)
    return count, mean, var


def forward(x, axis, gamma, beta, epsilon):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta with the batch's statistics."""
    x = np.asarray(x, np.float64)
    _, mean, var = moments(x, axis)
    xhat = (x - _per_channel(mean, x.ndim, axis)) / np.sqrt(_per_channel(var, x.ndim, axis) + epsilon)
    return _per_channel(gamma, x.ndim, axis) * xhat + _per_channel(beta, x.ndim, axis)


def backward(x, dy, axis, gamma, epsilon):
    """(dx, dgamma, dbeta) of sum(dy * forward(x)) through the batch statistics."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    count, mean, var = moments(x, axis)
    axes = _axes(x.ndim, axis)
    inv_std = 1.0 / np.sqrt(var + epsilon)
    xhat = (x - _per_channel(mean, x.ndim, axis)) * _per_channel(inv_std, x.ndim, axis)
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * xhat).sum(axis=axes)
    if count == 0:
        return np.zeros_like(x), dgamma, dbeta
    dx = _per_channel(gamma * inv_std / count, x.ndim, axis) * (
        count * dy - _per_channel(dbeta, x.ndim, axis) - xhat * _per_channel(dgamma, x.ndim, axis)
    )
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
