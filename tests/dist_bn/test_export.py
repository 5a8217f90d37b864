"""dist-bn-export: a run's checkpoint served where dist_bn and Horovod cannot be imported.

The run directory is written by the training job's own code (config.yaml by
`rundir.save_config`, the checkpoint by `checkpoint.Checkpoints`) for a tiny
model with moving statistics away from their initial values. The exported
files are then loaded in a subprocess whose sitecustomize blocks importing
horovod and dist_bn, as on a serving machine that has only TensorFlow.
"""
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from dist_bn import export
from bn_weights import randomize_bn
from dist_bn.training.checkpoint import Checkpoints
from dist_bn.training.distributed import World
from dist_bn.training.model import build_model
from dist_bn.training.rundir import save_config
from dist_bn.training.schema import load_config

TINY = """\
model: {width: 4, depth: 2, bn: sync, momentum: 0.9}
data: {frames: 4, height: 16, width: 16, num_classes: 4, train_clips: 32, eval_clips: 16}
"""

BLOCKER = '''\
"""Stands for a serving machine: horovod and dist_bn cannot be imported."""
import sys

class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("horovod", "dist_bn"):
            raise ImportError(f"{name} is not installed here (blocked by the test)")
        return None

sys.meta_path.insert(0, _Blocked())
'''

SERVE = textwrap.dedent('''\
    import json, sys
    import numpy as np
    for name in ("horovod", "dist_bn"):
        try:
            __import__(name)
            sys.exit(f"{name} was importable")
        except ImportError:
            pass
    import keras, tensorflow as tf
    out, probe = sys.argv[1], np.load(sys.argv[2])
    keras_model = keras.saving.load_model(out + "/model.keras")
    served = tf.saved_model.load(out + "/saved_model")
    print(json.dumps({"keras": np.asarray(keras_model(probe)).tolist(),
                      "saved_model": served.serve(probe).numpy().tolist(),
                      "layers": [type(layer).__name__ for layer in keras_model.layers]}))
''')


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    (root / "tiny.yaml").write_text(TINY)
    config = load_config(root / "tiny.yaml")
    run = root / "run"
    run.mkdir()
    save_config(run, config)
    model = build_model(config["model"], config["data"])
    randomize_bn(model, np.random.RandomState(0), min_variance=0.2)
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    optimizer.build(model.trainable_variables)
    Checkpoints(run, model, optimizer, World(0, 1, 0)).save(1)
    return run, model


def serve_without_dist_bn(out, probe, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    np.save(tmp_path / "probe.npy", probe)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONPATH=str(blocker), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", SERVE, str(out), str(tmp_path / "probe.npy")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "bn_kept"])
def test_export_serves_without_horovod_or_dist_bn(run_dir, tmp_path, fold, capsys):
    run, model = run_dir
    out = tmp_path / "served"
    assert export.main([str(run), str(out)] + (["--tflite"] if fold else ["--no-fold"])) == 0
    files = "export.json, model.keras, " + ("model.tflite, saved_model" if fold else "saved_model")
    assert f"wrote {files}" in capsys.readouterr().out
    info = json.loads((out / "export.json").read_text())
    assert info["checkpoint"].endswith("ckpt-1") and info["folded"] is fold
    assert max(info["max_relative_difference_vs_run_model"].values()) < 1e-5
    if fold:  # MaxPool3D is no TFLite built-in: it runs as a TF Select (Flex) op
        assert info["tflite_needs_select_tf_ops"] is True
    assert not (tmp_path / "served.partial").exists()

    probe = np.random.RandomState(1).randn(3, 4, 16, 16, 1).astype(np.float32)
    want = np.asarray(model(probe, training=False))
    got = serve_without_dist_bn(out, probe, tmp_path)
    for name in ("keras", "saved_model"):
        error = np.max(np.abs(np.asarray(got[name]) - want)) / np.max(np.abs(want))
        assert error < 1e-5, (name, error)
    bn_layers = [name for name in got["layers"] if "BatchNormalization" in name]
    assert bn_layers == ([] if fold else ["BatchNormalization", "BatchNormalization"])


def test_export_refuses_to_overwrite_and_names_missing_runs(run_dir, tmp_path, capsys):
    run, _ = run_dir
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert export.main([str(run), str(taken)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (taken / "keep.txt").read_text() == "mine"
    assert export.main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert "has no config.yaml: it is not a run directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
