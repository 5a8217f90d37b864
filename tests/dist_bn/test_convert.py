"""convert_sync_batchnorm / revert_sync_batchnorm at any nesting depth (one process)."""
import logging

import keras
import numpy as np
import pytest

import dist_bn
from dist_bn import SyncBatchNormalization
from dist_bn.convert import batchnorm_paths, walk
from bn_weights import randomize_bn

RNG = np.random.RandomState(3)


def sequential_in_functional():
    """functional > Sequential > Sequential > BN: three levels below the top."""
    deepest = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Conv2D(5, 3, padding="same"),
                                keras.layers.BatchNormalization(name="bn_deepest")], name="deepest")
    middle = keras.Sequential([keras.Input((4, 4, 3)), deepest, keras.layers.ReLU(),
                               keras.layers.BatchNormalization(name="bn_middle")], name="middle")
    x = keras.Input((4, 4, 3))
    h = keras.layers.BatchNormalization(name="bn_top")(middle(x))
    return keras.Model(x, keras.layers.Dense(2)(keras.layers.Flatten()(h)), name="top")


def functional_in_functional():
    """Three nested functional models, each with a BN."""
    x = keras.Input((6,))
    m3 = keras.Model(x, keras.layers.BatchNormalization(name="bn3")(keras.layers.Dense(5)(x)), name="m3")
    x = keras.Input((6,))
    m2 = keras.Model(x, keras.layers.BatchNormalization(name="bn2")(m3(x)), name="m2")
    x = keras.Input((6,))
    return keras.Model(x, keras.layers.Dense(3)(keras.layers.BatchNormalization(name="bn1")(m2(x))), name="m1")


BUILDERS = {"sequential_in_functional": (sequential_in_functional, (4, 4, 3),
                                         ["top/middle/deepest/bn_deepest", "top/middle/bn_middle", "top/bn_top"]),
            "functional_in_functional": (functional_in_functional, (6,),
                                         ["m1/m2/m3/bn3", "m1/m2/bn2", "m1/bn1"])}


def randomize_statistics(model):
    randomize_bn(model, RNG)


def weights_by_path(model):
    return {f"{path}/{w.name}": w.numpy() for path, layer in walk(model) if not isinstance(layer, keras.Model)
            for w in layer.weights}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_convert_and_revert_at_depth_3_keep_weights(kind, caplog):
    build, shape, paths = BUILDERS[kind]
    model = build()
    randomize_statistics(model)
    x = RNG.randn(4, *shape).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="dist_bn"):
        converted = dist_bn.convert_sync_batchnorm(model, unbiased_moving_variance=True)
    assert sorted(batchnorm_paths(converted)) == sorted(paths)
    bns = [layer for path, layer in walk(converted) if path in paths]
    assert all(type(layer) is SyncBatchNormalization and layer.unbiased_moving_variance for layer in bns)
    assert f"3 layer(s): {', '.join(paths)}" in caplog.text
    # The original is untouched; every weight of every layer is carried over.
    assert not any(isinstance(layer, SyncBatchNormalization) for _, layer in walk(model))
    original = weights_by_path(model)
    assert weights_by_path(converted).keys() == original.keys()
    for key, value in weights_by_path(converted).items():
        np.testing.assert_array_equal(value, original[key], err_msg=key)
    np.testing.assert_allclose(converted(x, training=False), model(x, training=False), rtol=1e-5, atol=1e-6)

    with caplog.at_level(logging.INFO, logger="dist_bn"):
        reverted = dist_bn.revert_sync_batchnorm(converted)
    assert "revert_sync_batchnorm: reverted to BatchNormalization: 3 layer(s)" in caplog.text
    reverted_bns = [type(layer) for path, layer in walk(reverted) if path in paths]
    assert reverted_bns == [keras.layers.BatchNormalization] * 3
    for key, value in weights_by_path(reverted).items():
        np.testing.assert_array_equal(value, original[key], err_msg=key)
    np.testing.assert_array_equal(reverted(x, training=False), model(x, training=False))
    assert "dist_bn" not in str(reverted.get_config())


def test_a_shared_layer_stays_shared():
    bn = keras.layers.BatchNormalization(name="shared_bn")
    inner = keras.Sequential([keras.Input((3,)), bn], name="inner")
    x = keras.Input((3,))
    model = keras.Model(x, keras.layers.Add()([inner(x), bn(x)]), name="outer")
    converted = dist_bn.convert_sync_batchnorm(model)
    found = [layer for _, layer in walk(converted) if isinstance(layer, SyncBatchNormalization)]
    assert len(found) == 1 and converted.get_layer("inner").layers[0] is found[0]


class Block(keras.layers.Layer):
    """A custom layer holding a BN: cloning from config cannot reach it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = keras.layers.BatchNormalization(name="hidden_bn")

    def call(self, x, training=None):
        return self.norm(x, training=training)


def test_a_bn_it_cannot_reach_is_an_error_naming_it():
    x = keras.Input((3,))
    model = keras.Model(x, Block(name="block")(keras.layers.BatchNormalization()(x)), name="outer")
    with pytest.raises(ValueError, match=r"1 layer\(s\) cannot be reached.*outer/block/hidden_bn "
                                         r"\(inside Block outer/block\)"):
        dist_bn.convert_sync_batchnorm(model)


def test_a_model_without_bn_warns():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)], name="plain")
    with pytest.warns(UserWarning, match="'plain' has no layer to convert"):
        dist_bn.convert_sync_batchnorm(model)


def test_subclassed_model_is_refused():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.norm = keras.layers.BatchNormalization()

        def call(self, x):
            return self.norm(x)

    with pytest.raises(ValueError, match="cannot be reached"):
        dist_bn.convert_sync_batchnorm(Net())


def test_a_bn_inside_time_distributed_is_converted_and_reverted():
    x = keras.Input((4, 5, 5, 3))
    h = keras.layers.TimeDistributed(keras.layers.Conv2D(6, 3, padding="same"))(x)
    h = keras.layers.TimeDistributed(keras.layers.BatchNormalization(name="frame_bn"), name="per_frame")(h)
    model = keras.Model(x, h, name="net")
    randomize_statistics(model)
    converted = dist_bn.convert_sync_batchnorm(model)
    assert type(converted.get_layer("per_frame").layer) is SyncBatchNormalization
    reverted = dist_bn.revert_sync_batchnorm(converted)
    assert type(reverted.get_layer("per_frame").layer) is keras.layers.BatchNormalization
    clips = RNG.randn(2, 4, 5, 5, 3).astype(np.float32)
    np.testing.assert_allclose(converted(clips), model(clips), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(reverted(clips), model(clips))
