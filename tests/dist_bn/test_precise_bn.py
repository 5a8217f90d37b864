"""precise_bn and the PreciseBN callback: exact population statistics.

One mpirun launch (3 ranks, uneven batches, one empty slice) runs
tests/mpirun/precise_bn_cases.py against float64 NumPy; the single-process
tests cover what gets restored, what is left alone, and the errors.
"""
import json
import os
import shutil

import keras
import numpy as np
import pytest

import dist_bn
from mpirun_helpers import mpirun_argv, run_ranks
from paths import CASES

CASES_SCRIPT = str(CASES / "precise_bn_cases.py")
RNG = np.random.RandomState(11)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    if shutil.which("mpirun") is None:
        pytest.skip("needs mpirun (scripts/bootstrap.sh)")
    report_dir = tmp_path_factory.mktemp("precise_bn")
    result = run_ranks(mpirun_argv(3, CASES_SCRIPT, str(report_dir)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.load(open(report_dir / name)) for name in sorted(os.listdir(report_dir))]


CASES = ["sync_dense", "sync_conv3d", "keras_dense", "keras_conv3d"]


@pytest.mark.mpirun
@pytest.mark.parametrize("case", CASES)
def test_stacked_bn_matches_float64_numpy_on_every_rank(reports, case):
    assert len(reports) == 3
    first = reports[0]["cases"][case]
    sizes = first["batch_sizes"]
    assert any(len(set(s)) > 1 for s in sizes) and (0 in sum(sizes, [])) == case.startswith("sync")
    for rank, report in enumerate(reports):
        result = report["cases"][case]
        assert result["moving"] == first["moving"], f"rank {rank}: statistics differ from rank 0's"
        assert result["momentum_kept"] and result["other_weights_kept"]
        for layer, errors in result["errors"].items():
            assert errors["count"] == result["counts"][f"stacked/{layer}"] > 0
            assert errors["mean_over_std"] <= 1e-6, (rank, layer, errors)
            assert errors["variance_relative"] <= 2e-6, (rank, layer, errors)
            # fvcore's mean of per-batch variances is far off here: the test can tell them apart.
            assert result["fvcore_variance_error"][layer] > 1e-2


@pytest.mark.mpirun
def test_a_rank_running_out_of_data_fails_every_rank(reports):
    for report in reports:
        assert "ran out after 1 of 3 batches on 1 of 3 rank(s)" in report["ran_out"]


def small_model(bn=keras.layers.BatchNormalization):
    x = keras.Input((3,))
    h = bn(name="bn1", momentum=0.8)(x)
    h = keras.layers.Dropout(0.5, seed=1)(h)
    h = bn(name="bn2")(keras.layers.Dense(2, name="dense")(h))
    return keras.Model(x, h, name="small")


def test_restores_everything_else_and_leaves_frozen_layers_alone():
    model = small_model()
    model.get_layer("bn2").trainable = False
    model.get_layer("bn2").moving_mean.assign([3.0, 4.0])
    before = {v.path: v.numpy() for v in model.variables}
    batches = [(RNG.randn(4, 3).astype(np.float32) + 2, np.zeros(4)) for _ in range(3)]
    counts = dist_bn.precise_bn(model, batches, 3)
    assert counts == {"small/bn1": 12}
    changed = {v.path for v in model.variables if not np.array_equal(v.numpy(), before[v.path])}
    assert changed == {"bn1/moving_mean", "bn1/moving_variance"}
    values = np.concatenate([x for x, _ in batches]).astype(np.float64)
    np.testing.assert_allclose(model.get_layer("bn1").moving_mean.numpy(), values.mean(0), rtol=1e-6)
    np.testing.assert_allclose(model.get_layer("bn1").moving_variance.numpy(), values.var(0), rtol=1e-6)
    assert model.get_layer("bn1").momentum == 0.8


def test_unbiased_moving_variance_is_respected():
    model = small_model(lambda **kw: dist_bn.SyncBatchNormalization(unbiased_moving_variance=True, **kw))
    batches = [RNG.randn(n, 3).astype(np.float32) for n in (2, 5)]
    dist_bn.precise_bn(model, batches, 2)
    values = np.concatenate(batches).astype(np.float64)
    np.testing.assert_allclose(model.get_layer("bn1").moving_variance.numpy(), values.var(0, ddof=1),
                               rtol=1e-6)


@pytest.mark.parametrize("num_batches,message", [
    (0, "num_batches must be an int >= 1"), (2.0, "num_batches must be an int >= 1"),
    (4, "ran out after 3 of 4 batches on 1 of 1 rank"),
])
def test_bad_arguments(num_batches, message):
    model = small_model()
    before = model.get_layer("bn1").moving_mean.numpy()
    with pytest.raises(ValueError, match=message):
        dist_bn.precise_bn(model, [np.ones((2, 3), np.float32)] * 3, num_batches)
    np.testing.assert_array_equal(model.get_layer("bn1").moving_mean.numpy(), before)
    assert "call" not in vars(model.get_layer("bn1"))  # the tap is gone


def test_callback_runs_before_validation_and_at_the_end():
    model = small_model()
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")  # lr 0: weights stay put
    x, y = RNG.randn(16, 3).astype(np.float32), np.zeros((16, 2), np.float32)
    callback = dist_bn.PreciseBN([x[:8], x[8:]], 2)
    model.fit(x, y, batch_size=4, epochs=2, validation_data=(x, y), callbacks=[callback], verbose=0)
    assert callback.last_counts == {"small/bn1": 16, "small/bn2": 16}
    np.testing.assert_allclose(model.get_layer("bn1").moving_mean.numpy(), x.astype(np.float64).mean(0),
                               rtol=1e-6)


TINY_RUN = """\
model: {width: 4, depth: 2, bn: sync, momentum: 0.9}
data: {frames: 4, height: 16, width: 16, num_classes: 4, train_clips: 32, eval_clips: 16, seed: 0}
train: {batch_size: 8, epochs: 2, learning_rate: 0.05, warmup_epochs: 0.5, log_every: 2, precise_bn_batches: 6}
run: {dir: run, tensorboard: false}
"""


@pytest.mark.e2e
def test_training_job_checkpoints_precise_statistics(tmp_path):
    """train.precise_bn_batches: the checkpoint holds exactly what precise_bn
    computes from the final weights over that epoch's first batches (6 > the
    4 steps of an epoch, so the data repeats)."""
    import subprocess
    import sys

    import tensorflow as tf

    from dist_bn.training import data as data_lib
    from dist_bn.training.model import build_model
    from dist_bn.training.schema import load_config

    (tmp_path / "tiny.yaml").write_text(TINY_RUN)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOROVOD_", "OMPI_", "PMIX_"))}
    proc = subprocess.run([sys.executable, "-m", "dist_bn.training", "tiny.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("precise BN: 2 layer(s) over 6 global batches (48 clips)") == 2, proc.stdout

    config = load_config(tmp_path / "tiny.yaml")
    model = build_model(config["model"], config["data"])
    tf.train.Checkpoint(model=model).restore(str(tmp_path / "run" / "checkpoints" / "ckpt-2")).expect_partial()
    saved = {v.path: v.numpy() for v in model.non_trainable_variables}
    dist_bn.precise_bn(model, data_lib.train_dataset(config, 2, 0, 1).repeat(), 6)
    for variable in model.non_trainable_variables:
        np.testing.assert_allclose(variable.numpy(), saved[variable.path], rtol=1e-6, atol=1e-7,
                                   err_msg=variable.path)
    assert not np.allclose(saved["bn1/moving_variance"], 1.0)  # not the initial values


def test_masked_positions_are_left_out():
    """Masking -> BN -> Dense -> BN: statistics over unmasked time steps only,
    the second layer's inputs normalized with the first one's masked moments."""
    x = keras.Input((6, 3))
    h = keras.layers.BatchNormalization(name="bn1")(keras.layers.Masking(0.0)(x))
    h = keras.layers.BatchNormalization(name="bn2")(keras.layers.Dense(2, name="dense")(h))
    model = keras.Model(x, h, name="masked")
    batches = []
    for n in (3, 4):
        clips = (RNG.randn(n, 6, 3) * 2 + 4).astype(np.float32)
        clips[:, 4:] = 0.0  # padding: masked
        clips[0, 2:] = 0.0
        batches.append(clips)
    dist_bn.precise_bn(model, batches, 2)
    kernel, bias = (w.astype(np.float64) for w in model.get_layer("dense").get_weights())
    seen1, seen2 = [], []
    for clips in batches:
        rows = clips.reshape(-1, 3).astype(np.float64)
        rows = rows[np.any(rows != 0, axis=1)]
        seen1.append(rows)
        normalized = (rows - rows.mean(0)) / np.sqrt(rows.var(0) + 1e-3)
        seen2.append(normalized @ kernel + bias)
    for name, seen in (("bn1", seen1), ("bn2", seen2)):
        values = np.concatenate(seen)
        layer = model.get_layer(name)
        np.testing.assert_allclose(layer.moving_mean.numpy(), values.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(layer.moving_variance.numpy(), values.var(0), rtol=1e-5)
