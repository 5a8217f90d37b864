"""Runs on every rank under mpirun/horovodrun: dist_bn.keras under model.fit.

Every rank builds the same global data from a seed and takes its part of
each global batch. Ranks start from different random weights, so only
BroadcastGlobalVariablesCallback makes them agree. Each case trains across
ranks with SyncBatchNormalization and DistributedOptimizer, then, on every
rank, trains the reference in one process with Keras's BatchNormalization on
the concatenated global batches from rank 0's initial weights, and records
the worst relative weight difference. REPORT_DIR/rank<R>.json holds the
results; tests/dist_bn/keras/test_keras_fit.py asserts.

Cases: fit (with validation, uneven per-rank validation shards, and one
rank without validation data), evaluate and
predict (uneven shards), train_on_batch and a custom loop with an Embedding
(sparse gradients), mixed-precision loss scaling, an interrupted fit
resumed by Keras's BackupAndRestore against an uninterrupted one, and one
interrupted mid-epoch resumed by dist_bn.keras's (rank 0 backs up alone).

Usage: python keras_fit_cases.py REPORT_DIR CASE[,CASE...]
"""
import functools
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import dist_bn.keras as hvd  # noqa: E402  (the one import a Horovod user changes)
from dist_bn import SyncBatchNormalization  # noqa: E402

CLIP = (4, 6, 6, 2)
CLASSES = 3
B = 4  # clips per rank per step
STEPS = 3


def conv_net(norm):
    return keras.Sequential([
        keras.Input(CLIP),
        keras.layers.Conv3D(4, 3, padding="same", use_bias=False), norm(), keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling3D(),
        keras.layers.Dense(8, use_bias=False), norm(), keras.layers.ReLU(),
        keras.layers.Dense(CLASSES),
    ])


def data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,) + CLIP).astype(np.float32) + 0.5
    y = rng.integers(0, CLASSES, n)
    return x, y


def own_part(array, batch):
    """This rank's part of every global batch of `size * batch` samples."""
    size, rank = hvd.size(), hvd.rank()
    steps = len(array) // (size * batch)
    blocks = array[: steps * size * batch].reshape((steps, size, batch) + array.shape[1:])
    return blocks[:, rank].reshape((steps * batch,) + array.shape[1:])


def uneven_shard(array):
    """Rank r gets a slice of length proportional to r + 1 (uneven on purpose)."""
    size, rank = hvd.size(), hvd.rank()
    edges = np.cumsum([0] + [r + 1 for r in range(size)]) * len(array) // (size * (size + 1) // 2)
    return array[edges[rank]: edges[rank + 1]]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1e-12, np.max(np.abs(b))))


def worst(weights, expected):
    return max(rel(a, b) for a, b in zip(weights, expected))


def rank0_weights(model):
    """The weights `model` has on rank 0 (gathered to every rank)."""
    return [hvd.broadcast(tf.constant(w), 0, name=f"rank0_weights/{i}").numpy()
            for i, w in enumerate(model.get_weights())]


def distributed(model, optimizer, **compile_kwargs):
    model.compile(hvd.DistributedOptimizer(optimizer), jit_compile=False, **compile_kwargs)
    return model


SPARSE_CCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def case_fit():
    """Two epochs of fit with validation, then evaluate and predict on uneven shards."""
    x, y = data(hvd.size() * B * STEPS, seed=1)
    vx, vy = data(23, seed=2)
    keras.utils.set_random_seed(100 + hvd.rank())
    model = distributed(conv_net(SyncBatchNormalization), keras.optimizers.SGD(0.2, momentum=0.9),
                        loss=SPARSE_CCE, metrics=["sparse_categorical_accuracy"])
    init = rank0_weights(model)
    cbs = [hvd.callbacks.BroadcastGlobalVariablesCallback(0), hvd.callbacks.MetricAverageCallback()]
    history = model.fit(own_part(x, B), own_part(y, B), batch_size=B, epochs=2, shuffle=False,
                        validation_data=(uneven_shard(vx), uneven_shard(vy)), validation_batch_size=2,
                        callbacks=cbs, verbose=hvd.callbacks.root_verbose(0))

    ref = conv_net(keras.layers.BatchNormalization)
    ref.set_weights(init)
    ref.compile(keras.optimizers.SGD(0.2, momentum=0.9), jit_compile=False,
                loss=SPARSE_CCE, metrics=["sparse_categorical_accuracy"])
    ref_history = ref.fit(x, y, batch_size=hvd.size() * B, epochs=2, shuffle=False,
                          validation_data=(vx, vy), verbose=0)
    result = {
        "weights": worst(model.get_weights(), ref.get_weights()),
        "per_weight": {w.path: rel(a, b) for w, a, b in
                       zip(model.weights, model.get_weights(), ref.get_weights())},
        "initial_weights_differed": worst(conv_net_weights_of_seed(100 + hvd.rank()), init) > 0.1,
        "logs": {k: [rel(a, b) for a, b in zip(history.history[k], ref_history.history[k])]
                 for k in ref_history.history},
    }

    # evaluate and predict on uneven shards, against one process on everything.
    ex, ey = data(31, seed=3)
    ref.set_weights(model.get_weights())
    averaged = hvd.evaluate(model, uneven_shard(ex), uneven_shard(ey), batch_size=3,
                            return_dict=True, verbose=0)
    local = model.evaluate(uneven_shard(ex), uneven_shard(ey), batch_size=3, return_dict=True,
                           verbose=0)
    expected = ref.evaluate(ex, ey, batch_size=5, return_dict=True, verbose=0)
    shard_prediction = model.predict(uneven_shard(ex), batch_size=4, verbose=0)
    prediction = hvd.allgather(tf.constant(shard_prediction), name="predictions").numpy()
    result.update({
        "evaluate": {k: rel(averaged[k], expected[k]) for k in expected},
        "evaluate_local": {k: rel(local[k], expected[k]) for k in expected},
        "predict": rel(prediction, ref.predict(ex, batch_size=31, verbose=0)),
        "predict_rows": int(prediction.shape[0]),
    })
    return result


def case_empty_validation():
    """fit's validation where the last rank holds no validation clip: every rank
    logs the global values (Keras logs no validation on an empty shard)."""
    x, y = data(hvd.size() * B * STEPS, seed=9)
    vx, vy = data(5, seed=10)
    keras.utils.set_random_seed(1000)
    model = distributed(conv_net(SyncBatchNormalization), keras.optimizers.SGD(0.1), loss=SPARSE_CCE,
                        metrics=["sparse_categorical_accuracy"])
    others, rank = hvd.size() - 1, hvd.rank()
    mine = slice(0, 0) if rank == others else slice(rank * 5 // others, (rank + 1) * 5 // others)
    validation = tf.data.Dataset.from_tensor_slices((vx[mine], vy[mine])).batch(2)
    history = model.fit(own_part(x, B), own_part(y, B), batch_size=B, epochs=1, shuffle=False,
                        validation_data=validation, verbose=0,
                        callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                                   hvd.callbacks.MetricAverageCallback()])
    expected = model.evaluate(vx, vy, batch_size=5, return_dict=True, verbose=0)  # same weights everywhere
    return {"keys": sorted(history.history),
            "val": {k: rel(history.history["val_" + k][-1], expected[k]) for k in expected
                    if "val_" + k in history.history}}


def conv_net_weights_of_seed(seed):
    keras.utils.set_random_seed(seed)
    return conv_net(SyncBatchNormalization).get_weights()


def embedding_net():
    return keras.Sequential([
        keras.Input((5,), dtype="int32"), keras.layers.Embedding(50, 4),
        keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(CLASSES),
    ])


def case_sparse():
    """train_on_batch and a custom loop on an Embedding net: sparse gradients."""
    rng = np.random.default_rng(4)
    x = rng.integers(0, 50, (hvd.size() * B * STEPS, 5)).astype(np.int32)
    y = rng.integers(0, CLASSES, len(x))
    result = {}
    for mode in ("train_on_batch", "custom_loop"):
        keras.utils.set_random_seed(200 + hvd.rank())
        model = embedding_net()
        optimizer = hvd.DistributedOptimizer(keras.optimizers.Adam(0.05))
        init = rank0_weights(model)
        model.set_weights(init)  # custom loops broadcast by hand (or by broadcast_variables)
        mx, my = own_part(x, B), own_part(y, B)
        if mode == "train_on_batch":
            model.compile(optimizer, loss=SPARSE_CCE, jit_compile=False)
            for s in range(STEPS):
                model.train_on_batch(mx[s * B:(s + 1) * B], my[s * B:(s + 1) * B])
        else:
            seen = []

            @tf.function
            def step(bx, by):
                with tf.GradientTape() as tape:
                    loss = SPARSE_CCE(by, model(bx, training=True))
                grads = tape.gradient(loss, model.trainable_variables)
                seen.append(type(grads[0]).__name__)
                optimizer.apply_gradients(zip(grads, model.trainable_variables))

            for s in range(STEPS):
                step(mx[s * B:(s + 1) * B], my[s * B:(s + 1) * B])
            result["embedding_gradient_type"] = seen[0]
        ref = embedding_net()
        ref.set_weights(init)
        ref.compile(keras.optimizers.Adam(0.05), loss=SPARSE_CCE, jit_compile=False)
        for s in range(STEPS):
            g = hvd.size() * B
            ref.train_on_batch(x[s * g:(s + 1) * g], y[s * g:(s + 1) * g])
        result[mode] = worst(model.get_weights(), ref.get_weights())
    return result


def case_loss_scale():
    """DistributedOptimizer(LossScaleOptimizer(SGD)) under fit against LossScaleOptimizer(SGD)."""
    x, y = data(hvd.size() * B * STEPS, seed=5)
    keras.utils.set_random_seed(300 + hvd.rank())
    model = distributed(conv_net(SyncBatchNormalization),
                        keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)), loss=SPARSE_CCE)
    init = rank0_weights(model)
    model.fit(own_part(x, B), own_part(y, B), batch_size=B, epochs=1, shuffle=False, verbose=0,
              callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])
    ref = conv_net(keras.layers.BatchNormalization)
    ref.set_weights(init)
    ref.compile(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)), loss=SPARSE_CCE,
                jit_compile=False)
    ref.fit(x, y, batch_size=hvd.size() * B, epochs=1, shuffle=False, verbose=0)
    return {"weights": worst(model.get_weights(), ref.get_weights()),
            "is_loss_scale_optimizer": isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer),
            "scale": float(model.optimizer.dynamic_scale.numpy())}


class Interrupt(keras.callbacks.Callback):
    """Raises at a given epoch and batch, as a crash would (on every rank)."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise RuntimeError("injected interruption")


def fit_three_epochs(x, y, seed, extra):
    """3 epochs of fit from per-rank initial weights (seed + rank), `extra` callbacks first:
    a BackupAndRestore restores in on_train_begin, the broadcast follows at batch 0."""
    keras.utils.set_random_seed(seed + hvd.rank())
    model = distributed(conv_net(SyncBatchNormalization), keras.optimizers.SGD(0.1, momentum=0.9),
                        loss=SPARSE_CCE)
    model.build((None,) + CLIP)
    model.fit(own_part(x, B), own_part(y, B), batch_size=B, epochs=3, shuffle=False, verbose=0,
              callbacks=extra + [hvd.callbacks.BroadcastGlobalVariablesCallback(0)])
    return model


def case_resume(report_dir):
    """A fit interrupted in epoch 2 of 3 and resumed by BackupAndRestore, against none."""
    x, y = data(hvd.size() * B * STEPS, seed=6)
    backup = os.path.join(report_dir, "backup", f"rank{hvd.rank()}")  # one directory per rank
    run = functools.partial(fit_three_epochs, x, y)

    keras.utils.set_random_seed(400)
    uninterrupted = run(400, [])
    interrupted = None
    try:
        run(400, [keras.callbacks.BackupAndRestore(backup), Interrupt(1, 2)])
    except RuntimeError as e:
        interrupted = str(e)
    had_backup = os.path.exists(os.path.join(backup, "latest.weights.h5"))
    resumed = run(500, [keras.callbacks.BackupAndRestore(backup)])  # other initial weights
    return {"interrupted": interrupted, "had_backup": had_backup,
            "weights": worst(resumed.get_weights(), uninterrupted.get_weights()),
            "iterations": [int(resumed.optimizer.iterations.numpy()),
                           int(uninterrupted.optimizer.iterations.numpy())]}


def case_resume_mid_epoch(report_dir):
    """A fit interrupted mid-epoch (epoch 2 of 3, after 2 of its 3 batches) and
    resumed by dist_bn.keras's BackupAndRestore, backed up every batch by rank 0
    alone, from other initial weights on every rank; against an uninterrupted fit."""
    x, y = data(hvd.size() * B * STEPS, seed=8)
    backup = os.path.join(report_dir, "backup-mid", f"rank{hvd.rank()}")  # only rank 0's is written
    run = functools.partial(fit_three_epochs, x, y)

    uninterrupted = run(800, [])
    interrupted = None
    try:
        run(800, [hvd.callbacks.BackupAndRestore(backup, save_freq=1), Interrupt(1, 2)])
    except RuntimeError as e:
        interrupted = str(e)
    metadata_path = os.path.join(backup, "training_metadata.json")
    metadata = json.load(open(metadata_path)) if os.path.exists(metadata_path) else None
    resumed = run(900, [hvd.callbacks.BackupAndRestore(backup, save_freq=1)])
    flat = np.concatenate([w.ravel() for w in resumed.get_weights()])
    gathered = hvd.allgather(tf.constant(flat[None]), name="resume_mid/weights").numpy()
    return {"interrupted": interrupted, "metadata": metadata,
            "weights": worst(resumed.get_weights(), uninterrupted.get_weights()),
            "ranks_agree": bool(all(np.array_equal(g, gathered[0]) for g in gathered)),
            "iterations": [int(resumed.optimizer.iterations.numpy()),
                           int(uninterrupted.optimizer.iterations.numpy())],
            "backup_left": os.path.exists(backup)}


class RecordLearningRate(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rates = []

    def on_train_batch_begin(self, batch, logs=None):
        self.rates.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))


def case_warmup():
    """LearningRateWarmupCallback's per-batch rates, and the rank-0-only helpers."""
    x, y = data(hvd.size() * B * STEPS, seed=7)
    keras.utils.set_random_seed(600)
    lr = hvd.scale_learning_rate(0.05)
    model = distributed(conv_net(SyncBatchNormalization), keras.optimizers.SGD(lr), loss=SPARSE_CCE)
    record = RecordLearningRate()
    model.fit(own_part(x, B), own_part(y, B), batch_size=B, epochs=3, shuffle=False, verbose=0,
              callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                         hvd.callbacks.LearningRateWarmupCallback(lr, warmup_epochs=2), record])
    # Dropout's random state stays per rank (independent masks); the weights are broadcast.
    keras.utils.set_random_seed(700 + hvd.rank())
    dropped = keras.Sequential([keras.Input((3,)), keras.layers.Dropout(0.5), keras.layers.Dense(2)])
    dropped.compile(hvd.DistributedOptimizer(keras.optimizers.SGD(0.1)), "mse", jit_compile=False)
    dropped.fit(np.ones((4, 3), "float32"), np.ones((4, 2), "float32"), batch_size=4, verbose=0,
                callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])
    gathered = [(hvd.is_random_state(v), hvd.allgather(tf.constant(v.numpy()[None]),
                                                       name=f"dropped/{i}").numpy())
                for i, v in enumerate(dropped.variables)]
    return {"seed_states_differ": all(np.any(g[0] != g[1]) for random, g in gathered if random),
            "weights_agree": all(np.array_equal(g[0], g[1]) for random, g in gathered if not random),
            "rates": record.rates, "scaled": lr,
            "final": float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)),
            "root_only": len(hvd.callbacks.root_only(keras.callbacks.History())),
            "root_verbose": hvd.callbacks.root_verbose(2)}


def main(report_dir, cases):
    hvd.init()
    report = {"size": hvd.size(), "cases": {}}
    for name in cases.split(","):
        fn = {"fit": case_fit, "sparse": case_sparse, "loss_scale": case_loss_scale,
              "warmup": case_warmup,
              "resume": lambda: case_resume(report_dir),
              "resume_mid_epoch": lambda: case_resume_mid_epoch(report_dir),
              "empty_validation": case_empty_validation}[name]
        report["cases"][name] = fn()
    with open(os.path.join(report_dir, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
