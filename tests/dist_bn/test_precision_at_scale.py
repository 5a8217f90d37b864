"""Exactness inside one rank at the sizes video networks produce.

Real tensors, one per size class: a first-stage activation (8 clips x 16 x
56 x 56 = 401,408 values per channel) with |mean|/std = 1e3, 1.6M values with
mean 0.1, and 3.2M values with |mean|/std = 1e4, against float64 NumPy on the
same float32 values. A float32 reduction over that many values drifts (Keras's
layer is off by several std there; the last test shows it), so these hold
the blocked float64 sums of dist_bn.moments to their goal.
"""
import keras
import numpy as np
import pytest
import tensorflow as tf

import dist_bn
from dist_bn import SyncBatchNormalization, moments, ops, reference

EPS = 1e-3
SIZES = {
    "401k_offset_1e3": ((8, 16, 56, 56, 2), 1e3, -1),
    "1.6M_mean_0.1": ((32, 16, 56, 56, 2), 0.1, -1),
    "3.2M_offset_1e4": ((64, 16, 56, 56, 2), 1e4, -1),
    "401k_ncdhw_offset_1e3": ((8, 2, 16, 56, 56), 1e3, 1),
}


def clips(shape, offset, axis):
    """float32 clips whose channel c has mean offset * (1 + c) and std 1."""
    rng = np.random.default_rng(len(shape) + int(offset))
    x = rng.standard_normal(shape, dtype=np.float32)
    x += reference.per_channel(offset * (1.0 + np.arange(shape[axis])), len(shape), axis).astype(np.float32)
    return x


def scaled(actual, expected):
    return np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected))


@pytest.fixture(scope="module", params=sorted(SIZES))
def case(request):
    shape, offset, axis = SIZES[request.param]
    x = clips(shape, offset, axis)
    dy = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    return request.param, x, dy, axis, reference.moments(x, axis)


def test_statistics_within_1e6(case):
    _, x, _, axis, (count, mean, var) = case
    axes = moments.reduction_axes(x.ndim, axis)
    n, mean64, var64 = ops.global_moments(tf.constant(x), axes, "scale", None)
    assert n.numpy() == count
    assert np.max(np.abs(mean64.numpy() - mean) / np.sqrt(var)) < 1e-6
    assert np.max(np.abs(var64.numpy() / var - 1)) < 1e-6


def test_sync_moments_as_exact_as_float32_allows(case):
    _, x, _, axis, (_, mean, var) = case
    got_mean, got_var = dist_bn.sync_moments(tf.constant(x), moments.reduction_axes(x.ndim, axis))
    # The float32 results are the float64 truth rounded: within one ulp.
    np.testing.assert_allclose(got_mean, mean, rtol=1.2e-7, atol=0)
    np.testing.assert_allclose(got_var, var, rtol=1e-6, atol=0)


def test_layer_outputs_gradients_and_moving_statistics(case):
    _, x, dy, axis, (_, mean, var) = case
    layer = SyncBatchNormalization(axis=axis, momentum=0.0, epsilon=EPS)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt, training=True)
        loss = tf.reduce_sum(y * dy)
    dx, dgamma, dbeta = tape.gradient(loss, [xt, layer.gamma, layer.beta])
    ones = np.ones(x.shape[axis])
    ref_dx, ref_dgamma, ref_dbeta = reference.backward(x, dy, axis, ones, EPS)
    assert scaled(y, reference.forward(x, axis, ones, 0 * ones, EPS)) < 2e-4
    assert scaled(dx, ref_dx) < 1e-5
    # gamma's and beta's gradients are TF's fused float32 sums over all values.
    assert scaled(dgamma, ref_dgamma) < 5e-4 and scaled(dbeta, ref_dbeta) < 5e-4
    np.testing.assert_allclose(layer.moving_mean, mean, rtol=1.2e-7, atol=0)
    np.testing.assert_allclose(layer.moving_variance, var, rtol=1e-6, atol=0)


def test_keras_float32_layer_is_far_off_at_401k_values_and_offset_1e3():
    """The failure this guards against, shown on Keras's own layer."""
    shape, offset, axis = SIZES["401k_offset_1e3"]
    x = clips(shape, offset, axis)
    _, mean, var = reference.moments(x, axis)
    layer = keras.layers.BatchNormalization(momentum=0.0)
    layer(x, training=True)
    assert np.max(np.abs(layer.moving_mean.numpy() - mean) / np.sqrt(var)) > 1e-2
