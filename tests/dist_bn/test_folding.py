"""fold_batchnorm: BN folded into Conv1D/2D/3D/Dense equals the original in inference."""
import keras
import numpy as np
import pytest

import dist_bn
from dist_bn.convert import batchnorm_paths
from bn_weights import randomize_bn
from dist_bn.folding import folded_weights
from dist_bn.training.model import build_model

RNG = np.random.RandomState(5)
DEMO = {"model": {"width": 8, "depth": 3, "bn": "sync", "momentum": 0.9},  # configs/demo.yaml's sizes
        "data": {"frames": 8, "height": 32, "width": 32, "num_classes": 4}}


@pytest.fixture(autouse=True)
def fresh_random_state():
    """Each test draws the same numbers whatever ran before it."""
    RNG.seed(5)


def randomize_statistics(model, offset=0.0):
    randomize_bn(model, RNG, mean_offset=offset, min_variance=0.05, variance_span=4.0, signed_gamma=True)


def relative_error(a, b):
    """max |a - b| relative to max |b| (absolute where b is all zeros, e.g. after a ReLU)."""
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / (np.max(np.abs(b)) or 1.0))


def test_demo_model_folds_completely_and_matches():
    model = build_model(DEMO["model"], DEMO["data"])
    randomize_statistics(model)
    folded = dist_bn.fold_batchnorm(model)
    assert batchnorm_paths(folded) == [] and len(batchnorm_paths(model)) == 3
    assert all(folded.get_layer(f"conv{i}").use_bias for i in (1, 2, 3))
    x = RNG.randn(4, 8, 32, 32, 1).astype(np.float32)
    assert relative_error(folded(x, training=False), model(x, training=False)) < 1e-5
    assert "dist_bn" not in str(folded.get_config())


@pytest.mark.parametrize("make,shape", [
    (lambda: keras.layers.Conv1D(6, 3, use_bias=True), (7, 4)),
    (lambda: keras.layers.Conv2D(6, 3, use_bias=False, padding="same"), (5, 5, 4)),
    (lambda: keras.layers.Conv3D(6, 2, use_bias=True), (3, 4, 4, 2)),
    (lambda: keras.layers.Conv3D(6, 2, groups=2), (3, 4, 4, 4)),
    (lambda: keras.layers.Dense(6), (4,)),
    (lambda: keras.layers.Dense(6, use_bias=False), (3, 4)),
], ids=["conv1d", "conv2d", "conv3d", "conv3d_groups", "dense", "dense_3d"])
@pytest.mark.parametrize("sync", [False, True], ids=["keras_bn", "sync_bn"])
def test_each_foldable_layer(make, shape, sync):
    layer = make()
    axis = 1 if getattr(layer, "data_format", None) == "channels_first" else -1
    bn = (dist_bn.SyncBatchNormalization if sync else keras.layers.BatchNormalization)(axis=axis, epsilon=1e-3)
    x = keras.Input(shape)
    model = keras.Model(x, keras.layers.ReLU()(bn(layer(x))))
    randomize_statistics(model, offset=3.0)
    if layer.use_bias:
        layer.bias.assign(RNG.randn(6))
    folded = dist_bn.fold_batchnorm(model)
    assert batchnorm_paths(folded) == []
    data = RNG.randn(3, *shape).astype(np.float32)
    assert relative_error(folded(data), model(data, training=False)) < 1e-5


def test_no_scale_no_center_and_a_sequential_nested_in_functional():
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5),
                              keras.layers.BatchNormalization(scale=False, center=False, name="bn_inner")],
                             name="inner")
    x = keras.Input((4,))
    model = keras.Model(x, inner(x), name="outer")
    randomize_statistics(model)
    folded = dist_bn.fold_batchnorm(model)
    assert batchnorm_paths(folded) == []
    data = RNG.randn(6, 4).astype(np.float32)
    assert relative_error(folded(data), model(data, training=False)) < 1e-5


def unfoldable_model():
    x = keras.Input((4, 4, 2))
    conv = keras.layers.Conv2D(3, 1, name="conv")(x)
    h = keras.layers.BatchNormalization(name="bn_ok")(conv)
    h = keras.layers.MaxPooling2D(name="pool")(h)
    h = keras.layers.BatchNormalization(name="bn_after_pool")(h)
    relu_conv = keras.layers.Conv2D(3, 1, activation="relu", name="relu_conv")(h)
    h = keras.layers.BatchNormalization(name="bn_after_activation")(relu_conv)
    branch = keras.layers.Conv2D(3, 1, name="branch")(h)
    h = keras.layers.Add()([keras.layers.BatchNormalization(name="bn_shared_output")(branch), branch])
    return keras.Model(x, h, name="net")


def test_unfoldable_bn_is_refused_with_the_reasons():
    with pytest.raises(ValueError) as error:
        dist_bn.fold_batchnorm(unfoldable_model())
    message = str(error.value)
    assert "3 BatchNormalization layer(s) cannot be folded" in message
    assert "net/bn_after_pool follows MaxPooling2D 'pool'" in message
    assert "net/bn_after_activation follows 'relu_conv' whose activation 'relu'" in message
    assert "net/bn_shared_output follows 'branch', whose output is also used elsewhere" in message
    assert "keep_unfoldable=True" in message and "bn_ok" not in message


def test_keep_unfoldable_keeps_them_and_matches():
    model = unfoldable_model()
    randomize_statistics(model)
    folded = dist_bn.fold_batchnorm(model, keep_unfoldable=True)
    assert sorted(batchnorm_paths(folded)) == ["net/bn_after_activation", "net/bn_after_pool",
                                               "net/bn_shared_output"]
    data = RNG.randn(2, 4, 4, 2).astype(np.float32)
    assert relative_error(folded(data), model(data, training=False)) < 1e-5


def test_channels_first_folds_along_axis_1():
    # TF's CPU convolutions run channels-last only, so this one is checked on the weights.
    x = keras.Input((4, 3, 5, 5))
    conv = keras.layers.Conv3D(6, 2, data_format="channels_first", use_bias=False, name="conv")
    bn = keras.layers.BatchNormalization(axis=1, name="bn")
    model = keras.Model(x, bn(conv(x)))
    randomize_statistics(model)
    folded = dist_bn.fold_batchnorm(model)
    expected = folded_weights(conv.kernel.numpy(), None, bn.gamma.numpy(), bn.beta.numpy(),
                              bn.moving_mean.numpy(), bn.moving_variance.numpy(), bn.epsilon)
    assert batchnorm_paths(folded) == []
    for value, want in zip(folded.get_layer("conv").get_weights(), expected):
        np.testing.assert_array_equal(value, want)


def test_axis_mismatch_is_refused():
    x = keras.Input((4, 4, 3))
    model = keras.Model(x, keras.layers.BatchNormalization(axis=1, name="bn")(keras.layers.Conv2D(3, 1)(x)))
    with pytest.raises(ValueError, match="bn normalizes axis 1 but 'conv2d.*' puts its channels on axis 3"):
        dist_bn.fold_batchnorm(model)


def test_folded_weights_formula():
    kernel = RNG.randn(3, 4).astype(np.float32)
    gamma, beta, mean, var = RNG.randn(4), RNG.randn(4), RNG.randn(4), RNG.rand(4) + 0.1
    x = RNG.randn(5, 3)
    expected = gamma * (x @ kernel.astype(np.float64) + 1.0 - mean) / np.sqrt(var + 1e-3) + beta
    k, b = folded_weights(kernel, np.ones(4, np.float32), gamma, beta, mean, var, 1e-3)
    assert k.dtype == np.float32 and b.dtype == np.float32
    np.testing.assert_allclose(x @ k + b, expected, rtol=1e-5, atol=1e-5)


def test_a_bn_inside_another_layer_is_named_not_skipped():
    x = keras.Input((3, 4, 4, 2))
    h = keras.layers.TimeDistributed(keras.layers.Conv2D(3, 1))(x)
    h = keras.layers.TimeDistributed(keras.layers.BatchNormalization(name="frame_bn"), name="per_frame")(h)
    model = keras.Model(x, h, name="net")
    with pytest.raises(ValueError, match="net/per_frame/frame_bn is inside TimeDistributed 'net/per_frame'"):
        dist_bn.fold_batchnorm(model)
    randomize_statistics(model)
    kept = dist_bn.fold_batchnorm(model, keep_unfoldable=True)
    assert batchnorm_paths(kept) == ["net/per_frame/frame_bn"]
    data = RNG.randn(2, 3, 4, 4, 2).astype(np.float32)
    np.testing.assert_array_equal(kept(data), model(data, training=False))
