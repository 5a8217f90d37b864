"""dist_bn.training.model: layer types per model.bn, shapes, mixed precision,
and the memory estimate that refuses configs too big for the machine."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from dist_bn import SyncBatchNormalization
from dist_bn.training.loop import GIB, memory_problem
from dist_bn.training.model import build_model, training_step_bytes
from dist_bn.training.schema import load_config
from paths import REPO

MODEL = {"width": 4, "depth": 3, "bn": "sync", "momentum": 0.8}
DATA = {"frames": 4, "height": 16, "width": 12, "num_classes": 5}


def layers_of(model, cls):
    return [layer for layer in model.layers if type(layer) is cls]


@pytest.mark.parametrize("bn,cls", [("sync", SyncBatchNormalization),
                                    ("local", keras.layers.BatchNormalization)])
def test_batch_norm_variants(bn, cls):
    model = build_model({**MODEL, "bn": bn}, DATA)
    norms = layers_of(model, cls)
    assert len(norms) == MODEL["depth"]
    assert all(layer.momentum == pytest.approx(0.8) for layer in norms)
    other = keras.layers.BatchNormalization if cls is SyncBatchNormalization else SyncBatchNormalization
    assert not layers_of(model, other)
    convs = layers_of(model, keras.layers.Conv3D)
    assert [c.filters for c in convs] == [4, 8, 16]
    assert not any(c.use_bias for c in convs)  # BN's beta is the bias


def test_no_batch_norm():
    model = build_model({**MODEL, "bn": "none"}, DATA)
    assert not [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert all(c.use_bias for c in layers_of(model, keras.layers.Conv3D))


@pytest.mark.parametrize("bn", ["sync", "local", "none"])
def test_output_shape(bn):
    model = build_model({**MODEL, "bn": bn}, DATA)
    assert model.input_shape == (None, 4, 16, 12, 1)
    x = np.random.default_rng(0).normal(size=(3, 4, 16, 12, 1)).astype("float32")
    assert model(x, training=True).shape == (3, 5)
    assert model(x, training=False).shape == (3, 5)


def test_sync_equals_keras_batch_norm_in_one_process():
    """With one process (no Horovod world) the sync model is the local one."""
    sync, local = build_model(MODEL, DATA), build_model({**MODEL, "bn": "local"}, DATA)
    local.set_weights(sync.get_weights())
    x = np.random.default_rng(1).normal(size=(2, 4, 16, 12, 1)).astype("float32")
    np.testing.assert_allclose(sync(x, training=True), local(x, training=True), rtol=1e-5, atol=1e-5)
    for a, b in zip(sync.get_weights(), local.get_weights()):  # moving statistics too
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_mixed_precision_keeps_float32_logits():
    """Built symbolically: TensorFlow has no float16 MaxPool3D kernel on CPU
    (the training job refuses mixed precision without a GPU)."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model(MODEL, DATA)
        assert all(c.compute_dtype == "float16" for c in layers_of(model, keras.layers.Conv3D))
        assert all(layer.variable_dtype == "float32" for layer in model.layers)
        assert model.layers[-1].compute_dtype == "float32"
        assert model.output.dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_memory_estimate_refuses_what_cannot_fit_and_passes_the_demo():
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert memory_problem(demo, ranks_here=2, available=4 * GIB) is None
    assert memory_problem(demo, ranks_here=2, available=None) is None  # unknown: not refused
    # The data.height=1e9 is now out of range; the largest allowed frame is refused here.
    big = load_config(REPO / "configs" / "demo.yaml",
                      ["data.height=65536", "data.width=65536"])
    problem = memory_problem(big, ranks_here=2, available=24 * GIB)
    assert problem.startswith("data/model/train sizes: a rank would need about ") and "24.0 GiB is available" in problem
    # Doubling the batch doubles the step's estimate.
    assert training_step_bytes(demo["model"], demo["data"], 8) == 2 * training_step_bytes(demo["model"], demo["data"], 4)
