"""Masks in one process: statistics over unmasked values, exactly as Keras defines them.

Keras's BatchNormalization takes the mask of the layer before (one axis fewer
than the inputs, broadcast along the last): in training the statistics cover
the unmasked positions, and only those receive the statistics' part of the
gradient; in inference the mask is ignored. The multi-rank side is in
tests/mpirun/masked_cases.py.
"""
import keras
import numpy as np
import pytest
import tensorflow as tf

from dist_bn import SyncBatchNormalization, reference

EPS = 1e-3


def masked_step(layer, x, mask, dy, training=True):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training, mask=mask)
        loss = tf.reduce_sum(y * dy)
    return [y] + tape.gradient(loss, [x] + layer.trainable_weights)


CASES = {
    # (input shape, axis, mask shape): the mask of a Masking layer on sequences,
    # a per-voxel mask of a 5-D clip, a mask broadcast along an axis, and a
    # channels-first input whose mask varies along the channel axis.
    "sequence_btc": ((6, 5, 3), -1, (6, 5)),
    "clip_ndhwc": ((3, 2, 4, 4, 5), -1, (3, 2, 4, 4)),
    "broadcast_nhwc": ((2, 3, 4, 5), -1, (2, 3, 1)),
    "channels_first_bct": ((5, 2, 3), 1, (5, 2)),
}
# Keras 3.8 counts a mask before broadcasting it, so where the mask is
# broadcast along an axis its statistics are off; only float64 judges these.
KERAS_MISCOUNTS = {"broadcast_nhwc", "channels_first_bct"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_masked_training_matches_keras_and_float64(name):
    shape, axis, mask_shape = CASES[name]
    rng = np.random.RandomState(3)
    x = (4.0 + 2.0 * rng.randn(*shape)).astype(np.float32)
    dy = rng.randn(*shape).astype(np.float32)
    mask = rng.rand(*mask_shape) > 0.4
    ours = SyncBatchNormalization(axis=axis, momentum=0.5, epsilon=EPS)
    theirs = keras.layers.BatchNormalization(axis=axis, momentum=0.5, epsilon=EPS)
    results = [masked_step(layer, tf.constant(x), tf.constant(mask), tf.constant(dy))
               for layer in (ours, theirs)]
    if name not in KERAS_MISCOUNTS:
        for a, b in zip(*results):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ours.moving_mean, theirs.moving_mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(ours.moving_variance, theirs.moving_variance, rtol=1e-5, atol=1e-6)

    gamma = np.ones(ours.moving_mean.shape[0])
    y, dx, dgamma, dbeta = (t.numpy() for t in results[0])
    ref_mean, ref_var = reference.moments(x, axis, mask)[1:]
    np.testing.assert_allclose(ours.moving_mean, 0.5 * ref_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours.moving_variance, 0.5 + 0.5 * ref_var, rtol=1e-6, atol=1e-6)
    ref_dx, ref_dgamma, ref_dbeta = reference.backward(x, dy, axis, gamma, EPS, mask)
    np.testing.assert_allclose(y, reference.forward(x, axis, gamma, 0 * gamma, EPS, mask),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dgamma, ref_dgamma, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dbeta, ref_dbeta, rtol=1e-5, atol=1e-4)


def test_a_mask_broadcast_along_an_axis_counts_every_position_it_covers():
    """A (1, 2, 1) mask on (1, 2, 3, 4) inputs covers all 6 positions (fixed in later Keras)."""
    layer = SyncBatchNormalization(momentum=0.0)
    y = layer(tf.ones([1, 2, 3, 4]), training=True, mask=tf.ones([1, 2, 1]))
    np.testing.assert_allclose(y, np.zeros([1, 2, 3, 4]), atol=1e-6)
    np.testing.assert_allclose(layer.moving_mean, np.ones(4), atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance, np.zeros(4), atol=1e-6)


def test_masked_values_change_nothing_but_their_own_output():
    """Whatever a masked position holds, the statistics and other outputs stay the same."""
    rng = np.random.RandomState(4)
    x = rng.randn(4, 6, 3).astype(np.float32)
    mask = np.ones((4, 6), bool)
    mask[:, 4:] = False
    layer = SyncBatchNormalization(momentum=0.0)
    y1 = layer(x, training=True, mask=mask).numpy()
    stats1 = [layer.moving_mean.numpy(), layer.moving_variance.numpy()]
    x[:, 4:] = 1e6 * rng.randn(4, 2, 3)
    y2 = layer(x, training=True, mask=mask).numpy()
    np.testing.assert_array_equal(y1[:, :4], y2[:, :4])
    np.testing.assert_array_equal(stats1[0], layer.moving_mean.numpy())
    np.testing.assert_array_equal(stats1[1], layer.moving_variance.numpy())


def test_inference_ignores_the_mask():
    layer = SyncBatchNormalization()
    x = np.random.RandomState(5).randn(4, 6, 3).astype(np.float32)
    layer(x, training=True)
    mask = np.zeros((4, 6), bool)
    np.testing.assert_array_equal(layer(x, training=False, mask=mask), layer(x, training=False))


def test_fully_masked_batch_behaves_like_an_empty_one():
    layer = SyncBatchNormalization(center=False, scale=False, epsilon=EPS)
    x = np.random.RandomState(6).randn(4, 5).astype(np.float32)
    y = layer(x, training=True, mask=np.zeros((4,), np.float32))
    # No statistics: mean 0, variance 0, as in Keras; the moving ones untouched.
    np.testing.assert_allclose(y, x / np.sqrt(EPS), rtol=1e-6)
    np.testing.assert_array_equal(layer.moving_mean, np.zeros(5))
    np.testing.assert_array_equal(layer.moving_variance, np.ones(5))


@pytest.mark.parametrize("run_eagerly", [True, False])
def test_fit_behind_masking_learns_statistics_of_unmasked_steps(run_eagerly):
    """Padded sequences under model.fit: padding never reaches the statistics."""
    data = np.array([[[1, 5], [2, 5], [0.1, 0.1], [0.1, 0.1]]] * 10, np.float32)
    inputs = keras.Input((None, 2))
    normed = SyncBatchNormalization(momentum=0.0)(keras.layers.Masking(mask_value=0.1)(inputs))
    model = keras.Model(inputs, normed)
    model.compile("rmsprop", loss="mse", run_eagerly=run_eagerly)
    model.fit(data, data, batch_size=10, epochs=2, verbose=0)
    bn = model.layers[2]
    np.testing.assert_allclose(bn.moving_mean, [1.5, 5.0], atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance, [0.25, 0.0], atol=1e-6)


def test_a_model_with_masking_upstream_evaluates():
    inputs = keras.Input((None, 3))
    outputs = SyncBatchNormalization()(keras.layers.Masking()(inputs))
    model = keras.Model(inputs, outputs)
    x = np.random.RandomState(7).randn(2, 4, 3).astype(np.float32)
    np.testing.assert_allclose(model.predict(x, verbose=0), x / np.sqrt(1 + 1e-3), rtol=1e-5)
