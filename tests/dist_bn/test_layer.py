"""SyncBatchNormalization in one process (Horovod not initialized).

There it must compute what keras.layers.BatchNormalization computes, so
single-GPU code needs no change; plus config, saving and its errors.
"""
import numpy as np
import pytest
import keras
import tensorflow as tf

import dist_bn
from dist_bn import SyncBatchNormalization

SHAPES = {
    "2d": ((6, 5), -1),
    "3d_channels_first": ((4, 5, 7), 1),
    "4d_nhwc": ((3, 4, 5, 6), -1),
    "5d_ndhwc": ((2, 3, 4, 5, 6), -1),
    "5d_ncdhw": ((2, 6, 3, 4, 5), 1),
}


def paired_layers(shape, axis, **kwargs):
    """A Keras BN and a SyncBN with the same, non-trivial weights."""
    keras_bn = keras.layers.BatchNormalization(axis=axis, momentum=0.8, **kwargs)
    sync_bn = SyncBatchNormalization(axis=axis, momentum=0.8, **kwargs)
    for layer in (keras_bn, sync_bn):
        layer.build(shape)
    rng = np.random.RandomState(0)
    weights = [w.numpy() + 0.3 * rng.rand(*w.shape) for w in keras_bn.weights]
    keras_bn.set_weights(weights)
    sync_bn.set_weights(weights)
    return keras_bn, sync_bn


def step(layer, x, dy, training=True):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * dy)
    grads = tape.gradient(loss, [x] + layer.trainable_weights)
    return [y] + grads


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("center,scale", [(True, True), (False, True), (True, False)])
def test_same_as_keras_batch_normalization(name, center, scale):
    shape, axis = SHAPES[name]
    keras_bn, sync_bn = paired_layers(shape, axis, center=center, scale=scale)
    rng = np.random.RandomState(1)
    for _ in range(3):
        x = tf.constant(2.0 + 3.0 * rng.randn(*shape), tf.float32)
        dy = tf.constant(rng.randn(*shape), tf.float32)
        for ours, theirs in zip(step(sync_bn, x, dy), step(keras_bn, x, dy)):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(sync_bn.weights, keras_bn.weights):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sync_bn(x, training=False), keras_bn(x, training=False), atol=1e-6)


@pytest.mark.parametrize("policy,dtype,atol", [("mixed_float16", tf.float16, 2e-3),
                                               ("mixed_bfloat16", tf.bfloat16, 2e-2)])
def test_mixed_precision_keeps_input_dtype_and_matches_keras(policy, dtype, atol):
    shape = (2, 3, 4, 5, 6)
    keras_bn, sync_bn = paired_layers(shape, -1, dtype=policy)
    x = tf.constant(np.random.RandomState(2).randn(*shape), dtype)
    y_sync, y_keras = sync_bn(x, training=True), keras_bn(x, training=True)
    assert y_sync.dtype == dtype
    assert sync_bn.moving_mean.dtype == "float32"
    np.testing.assert_allclose(tf.cast(y_sync, tf.float32), tf.cast(y_keras, tf.float32), atol=atol)
    np.testing.assert_allclose(sync_bn.moving_variance.numpy(), keras_bn.moving_variance.numpy(), atol=1e-6)


def test_training_flag_may_be_a_tensor_inside_tf_function():
    shape = (4, 3, 5)
    keras_bn, sync_bn = paired_layers(shape, -1)
    call = tf.function(lambda x, training: sync_bn(x, training=training))
    x = tf.constant(np.random.RandomState(3).randn(*shape), tf.float32)
    before = [w.numpy() for w in sync_bn.non_trainable_weights]
    np.testing.assert_allclose(call(x, tf.constant(False)), keras_bn(x, training=False), atol=1e-6)
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(before, sync_bn.non_trainable_weights))
    np.testing.assert_allclose(call(x, tf.constant(True)), keras_bn(x, training=True), atol=1e-5)
    np.testing.assert_allclose(sync_bn.moving_mean, keras_bn.moving_mean, atol=1e-6)


def test_frozen_layer_runs_in_inference_mode():
    keras_bn, sync_bn = paired_layers((4, 3), -1)
    sync_bn.trainable = False
    before = sync_bn.moving_mean.numpy()
    x = tf.constant(np.random.RandomState(4).randn(4, 3), tf.float32)
    np.testing.assert_allclose(sync_bn(x, training=True), keras_bn(x, training=False), atol=1e-6)
    np.testing.assert_array_equal(sync_bn.moving_mean.numpy(), before)


def test_unbiased_moving_variance_uses_n_over_n_minus_1():
    layer = SyncBatchNormalization(momentum=0.0, unbiased_moving_variance=True)
    x = np.random.RandomState(5).randn(5, 2, 3).astype(np.float32)
    layer(x, training=True)
    np.testing.assert_allclose(layer.moving_variance, x.reshape(-1, 3).var(0, ddof=1), rtol=1e-5)


def test_empty_batch_leaves_moving_statistics_alone():
    layer = SyncBatchNormalization()
    y = layer(tf.zeros([0, 4, 3]), training=True)
    assert y.shape == (0, 4, 3)
    np.testing.assert_array_equal(layer.moving_mean, np.zeros(3))
    np.testing.assert_array_equal(layer.moving_variance, np.ones(3))


def test_fit_trains_a_model_and_keeps_xla_off():
    model = keras.Sequential([keras.Input((4, 4, 4, 2)), keras.layers.Conv3D(3, 3, padding="same"),
                              SyncBatchNormalization(), keras.layers.GlobalAveragePooling3D(),
                              keras.layers.Dense(2)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.RandomState(6)
    history = model.fit(rng.randn(8, 4, 4, 4, 2), rng.randint(0, 2, 8), batch_size=4, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert not model.layers[1].supports_jit


def test_config_round_trip():
    layer = SyncBatchNormalization(axis=1, momentum=0.7, epsilon=1e-4, center=False,
                                   gamma_regularizer="l2", process_set=[0, 1],
                                   unbiased_moving_variance=True, name="bn")
    config = layer.get_config()
    assert config["process_set"] == [0, 1] and config["unbiased_moving_variance"] is True
    assert "synchronized" not in config
    clone = SyncBatchNormalization.from_config(config)
    assert clone.get_config() == config


def test_saves_and_loads_keras_format(tmp_path):
    model = keras.Sequential([keras.Input((5, 3)), SyncBatchNormalization(momentum=0.5)])
    x = np.random.RandomState(7).randn(4, 5, 3).astype(np.float32)
    model(x, training=True)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.layers[0], SyncBatchNormalization)
    np.testing.assert_array_equal(loaded(x, training=False), model(x, training=False))


def test_tf_train_checkpoint_round_trip(tmp_path):
    layer = SyncBatchNormalization()
    layer(np.random.RandomState(8).randn(4, 3).astype(np.float32), training=True)
    path = tf.train.Checkpoint(layer=layer).save(str(tmp_path / "ckpt"))
    restored = SyncBatchNormalization()
    restored.build((None, 3))
    tf.train.Checkpoint(layer=restored).restore(path).assert_consumed()
    for a, b in zip(layer.weights, restored.weights):
        np.testing.assert_array_equal(a, b)


def test_sync_moments_equals_tf_nn_moments_with_gradient():
    x = tf.constant(np.random.RandomState(9).randn(4, 5, 3), tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ours = dist_bn.sync_moments(x, axes=[0, 1])
        theirs = tf.nn.moments(x, axes=[0, 1])
        loss_ours = tf.reduce_sum(ours[0] * [1.0, 2.0, 3.0]) + tf.reduce_sum(ours[1])
        loss_theirs = tf.reduce_sum(theirs[0] * [1.0, 2.0, 3.0]) + tf.reduce_sum(theirs[1])
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(tape.gradient(loss_ours, x), tape.gradient(loss_theirs, x), atol=1e-6)
    keep = dist_bn.sync_moments(x, axes=[0, 1], keepdims=True)
    assert keep[0].shape == (1, 1, 3)


def functional_model_with_bn():
    inputs = keras.Input((4, 4, 4, 2))
    h = keras.layers.Conv3D(3, 3, padding="same", use_bias=False)(inputs)
    h = keras.layers.BatchNormalization(momentum=0.5)(h)
    inner = keras.Sequential([keras.Input((4, 4, 4, 3)), keras.layers.Conv3D(3, 1),
                              keras.layers.BatchNormalization(axis=-1)], name="inner")
    h = inner(keras.layers.ReLU()(h))
    return keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling3D()(h)))


def test_convert_sync_batchnorm_swaps_layers_and_keeps_weights():
    model = functional_model_with_bn()
    x = np.random.RandomState(10).randn(3, 4, 4, 4, 2).astype(np.float32)
    model(x, training=True)  # moving statistics away from their initial values
    converted = dist_bn.convert_sync_batchnorm(model, unbiased_moving_variance=True)

    def bn_layers(m):
        found = []
        for layer in m.layers:
            found += bn_layers(layer) if isinstance(layer, keras.Model) else [layer]
        return [l for l in found if isinstance(l, keras.layers.BatchNormalization)]

    new_bns = bn_layers(converted)
    assert len(new_bns) == 2 and all(isinstance(l, SyncBatchNormalization) for l in new_bns)
    assert all(l.unbiased_moving_variance for l in new_bns)
    assert not any(isinstance(l, SyncBatchNormalization) for l in bn_layers(model))
    for a, b in zip(converted.weights, model.weights):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(converted(x, training=False), model(x, training=False), atol=1e-6)
    np.testing.assert_allclose(converted(x, training=True), model(x, training=True), atol=1e-5)


@pytest.mark.parametrize("make,call,message", [
    (lambda: SyncBatchNormalization(axis=3), lambda l: l.build((None, 4, 5)), "axis=3 is out of range"),
    (lambda: SyncBatchNormalization(axis=-4), lambda l: l.build((None, 4, 5)), "use an axis in [-3, 2]"),
    (lambda: SyncBatchNormalization(), lambda l: l.build((None, 4, None)), "channel dimension (axis -1)"),
    (lambda: SyncBatchNormalization(), lambda l: l.build((None,)), "rank >= 2"),
    (lambda: SyncBatchNormalization(axis=[1, 2]), None, "one axis"),
    (lambda: SyncBatchNormalization(), lambda l: l(tf.ones([2, 3], tf.int32), training=True),
     "must be floating point, got int32"),
    (lambda: SyncBatchNormalization(), lambda l: l(tf.ones([2, 3, 4]), mask=tf.ones([2], tf.bool)),
     "one dimension less than the inputs"),
])
def test_bad_input_gets_a_clear_error(make, call, message):
    with pytest.raises((ValueError, TypeError)) as error:
        layer = make()
        call(layer)
    assert message in str(error.value)


def test_sync_moments_rejects_integers():
    with pytest.raises(TypeError, match="floating-point"):
        dist_bn.sync_moments(tf.ones([2, 3], tf.int32), axes=[0])


def test_another_keras_backend_fails_at_construction_in_one_line(monkeypatch):
    """Keras on JAX (only TensorFlow's backend is installed here, so Keras is
    told it runs on JAX): the layer and DistributedOptimizer refuse to be built."""
    import dist_bn.keras
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    for what, make in (("SyncBatchNormalization", dist_bn.SyncBatchNormalization),
                       ("DistributedOptimizer", lambda: dist_bn.keras.DistributedOptimizer(keras.optimizers.SGD()))):
        with pytest.raises(RuntimeError) as info:
            make()
        assert str(info.value) == (f"{what} needs Keras's TensorFlow backend, but Keras runs on 'jax'; "
                                   "set KERAS_BACKEND=tensorflow before Keras is imported.")
