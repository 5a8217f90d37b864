"""dist_bn.kernels: the fused and the plain-ops paths against the float64 reference."""
import numpy as np
import pytest
import tensorflow as tf

from dist_bn import reference
from dist_bn import kernels

EPS = 1e-3
LAYOUTS = {
    "channels_last_5d": ((3, 2, 4, 5, 6), -1, tf.float32),
    "channels_last_2d": ((7, 6), -1, tf.float32),
    "channels_first_5d": ((3, 6, 2, 4, 5), 1, tf.float32),
    "channels_last_float64": ((3, 4, 6), -1, tf.float64),
    "empty_channels_last": ((0, 4, 6), -1, tf.float32),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_forward_and_backward_parts_match_reference(name):
    shape, axis, dtype = LAYOUTS[name]
    rng = np.random.RandomState(0)
    x = (2.0 + rng.randn(*shape)).astype(dtype.as_numpy_dtype)
    dy = rng.randn(*shape).astype(dtype.as_numpy_dtype)
    channels = shape[axis]
    gamma = (1 + 0.1 * np.arange(channels)).astype(x.dtype)
    beta = (0.2 * np.arange(channels) - 0.3).astype(x.dtype)
    full = (2.0 + rng.randn(5, *shape[1:])).astype(x.dtype) if shape[0] == 0 else x
    _, mean, var = reference.moments(full, axis)
    mean, var = mean.astype(x.dtype), var.astype(x.dtype)
    assert kernels.uses_fused_kernel(tf.constant(x), axis) == (axis == -1 and dtype == tf.float32)

    y = kernels.scale_shift(tf.constant(x), mean, var, gamma, beta, EPS, axis)
    xhat = (x - reference.per_channel(mean, x.ndim, axis)) / np.sqrt(reference.per_channel(var, x.ndim, axis) + EPS)
    expected_y = reference.per_channel(gamma, x.ndim, axis) * xhat + reference.per_channel(beta, x.ndim, axis)
    np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-5)

    dx_fixed, sum_dy_xhat, sum_dy = kernels.grad_parts(tf.constant(dy), tf.constant(x), mean, var, gamma, EPS, axis)
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    np.testing.assert_allclose(dx_fixed, dy * reference.per_channel(gamma / np.sqrt(var + EPS), x.ndim, axis),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sum_dy, dy.astype(np.float64).sum(axes), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(sum_dy_xhat, (dy * xhat).sum(axes), rtol=1e-5, atol=1e-4)


def test_fused_forward_keeps_precision_when_mean_dwarfs_std():
    rng = np.random.RandomState(1)
    x = (3e3 + rng.randn(8, 5, 5, 4)).astype(np.float32)
    _, mean, var = reference.moments(x, -1)
    y = kernels.scale_shift(tf.constant(x), mean.astype(np.float32), var.astype(np.float32),
                            np.ones(4, np.float32), np.zeros(4, np.float32), EPS, -1)
    expected = reference.forward(x, -1, np.ones(4), np.zeros(4), EPS)
    # The float32 rounding of the mean (an ulp of 3e3 is 2.4e-4) bounds what is possible.
    assert np.max(np.abs(y - expected)) < 3e-4
