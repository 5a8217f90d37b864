"""dist_bn.keras in one process: wrapping, serialization, state, and every refusal.

The multi-rank behaviour is in test_keras_fit.py; here there is one process
(Horovod not initialized, or initialized by another test with one rank),
where everything in dist_bn.keras is the identity.
"""
import horovod.tensorflow as hvd
import keras
import numpy as np
import pytest

import dist_bn
import dist_bn.keras as dk


def net():
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, use_bias=False),
                             dist_bn.SyncBatchNormalization(), keras.layers.Dense(2)])


def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((16, 4)).astype("float32"), rng.standard_normal((16, 2)).astype("float32")


def test_the_wrapper_is_the_optimizers_own_class_in_name_and_module():
    base = keras.optimizers.Adam(0.01, beta_1=0.8)
    opt = dk.DistributedOptimizer(base)
    assert isinstance(opt, keras.optimizers.Adam) and dk.is_distributed(opt)
    assert not dk.is_distributed(base)
    assert type(opt).__name__ == "Adam" and type(opt).__module__ == type(base).__module__
    assert opt.get_config() == base.get_config()
    assert dk.DistributedOptimizer(base, name="renamed").name == "renamed"


def test_a_saved_model_loads_with_the_base_optimizer(tmp_path):
    model = net()
    model.compile(dk.DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9)), "mse")
    x, y = data()
    model.fit(x, y, batch_size=8, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded.optimizer) is keras.optimizers.SGD
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_load_model_wraps_the_saved_optimizer_with_its_state(tmp_path):
    model = net()
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
    x, y = data()
    model.fit(x, y, batch_size=8, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = dk.load_model(tmp_path / "m.keras", op=hvd.Sum)
    assert dk.is_distributed(loaded.optimizer) and int(loaded.optimizer.iterations.numpy()) == 2
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    loaded.fit(x, y, batch_size=8, verbose=0)
    assert int(loaded.optimizer.iterations.numpy()) == 4
    assert getattr(dk.load_model(tmp_path / "m.keras", compile=False), "optimizer", None) is None


def test_a_built_optimizers_state_is_carried_over():
    model = net()
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
    x, y = data()
    model.fit(x, y, batch_size=8, verbose=0)
    opt = dk.DistributedOptimizer(model.optimizer)
    assert int(opt.iterations.numpy()) == 2
    for a, b in zip(opt.variables, model.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_without_horovod_fit_equals_the_plain_optimizer():
    assert not hvd.is_initialized() or hvd.size() == 1
    x, y = data()
    weights = []
    for wrap in (lambda o: o, dk.DistributedOptimizer):
        model = net()
        model.compile(wrap(keras.optimizers.SGD(0.1, momentum=0.9)), "mse")
        model.fit(x, y, batch_size=4, verbose=0, shuffle=False,
                  callbacks=[dk.callbacks.BroadcastGlobalVariablesCallback(0),
                             dk.callbacks.MetricAverageCallback()])
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)
    assert dk.evaluate(model, x, y, verbose=0) == pytest.approx(model.evaluate(x, y, verbose=0))
    assert dk.scale_learning_rate(0.1) == 0.1


def test_sparse_and_none_gradients_pass_through_allreduce_gradients():
    import tensorflow as tf
    sparse = tf.IndexedSlices(tf.ones((1, 2)), tf.constant([1]), tf.constant([3, 2]))
    out = dk.allreduce_gradients([None, sparse, tf.ones(2)])
    assert out[0] is None and out[1] is sparse


@pytest.mark.parametrize("bad,error", [
    (lambda: dk.DistributedOptimizer("sgd"), "wraps a keras.optimizers.Optimizer"),
    (lambda: dk.DistributedOptimizer(dk.DistributedOptimizer(keras.optimizers.SGD())),
     "already a DistributedOptimizer"),
    (lambda: dk.DistributedOptimizer(keras.optimizers.SGD(), op=hvd.Adasum), "hvd.Average or hvd.Sum"),
    (lambda: dk.callbacks.LearningRateWarmupCallback(0.1, warmup_epochs=0), "warmup_epochs"),
])
def test_refusals_name_the_problem(bad, error):
    with pytest.raises((TypeError, ValueError), match=error):
        bad()


def test_a_loss_scale_optimizer_around_a_distributed_one_is_refused():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = net()
        # compile wraps it in a LossScaleOptimizer: finiteness would be checked per rank.
        model.compile(dk.DistributedOptimizer(keras.optimizers.SGD(0.1)), "mse")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    x, y = data()
    with pytest.raises(ValueError, match=r"DistributedOptimizer\(keras.optimizers.LossScaleOptimizer"):
        model.fit(x, y, verbose=0, callbacks=[dk.callbacks.BroadcastGlobalVariablesCallback(0)])


def test_warmup_needs_a_known_epoch_length():
    import tensorflow as tf
    x, y = data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: True).batch(4)
    model = net()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    with pytest.raises(ValueError, match="steps_per_epoch"):
        model.fit(ds, verbose=0, callbacks=[dk.callbacks.LearningRateWarmupCallback(0.1, 1)])


def test_random_states_are_told_apart_from_weights():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dropout(0.5), keras.layers.Dense(2)])
    random = [v.path for v in model.variables if dk.is_random_state(v)]
    assert random == ["seed_generator/seed_generator_state"]
    assert sum(not dk.is_random_state(v) for v in model.variables) == 2
