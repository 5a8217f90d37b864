"""dist-bn-export RUN_DIR OUT: a training run's model, ready to serve anywhere.

Takes the run directory of `dist_bn.training` (its config.yaml says which
model to build; its checkpoints/ hold the weights, the latest one unless
--checkpoint picks another) and writes, into the new directory OUT:

  model.keras    the Keras model (`keras.saving.load_model`)
  saved_model/   a TF SavedModel with a `serve` endpoint (`tf.saved_model.load`,
                 TF Serving)
  model.tflite   with --tflite: a TensorFlow Lite flatbuffer
  export.json    what was exported: run, checkpoint, folded layers, and the
                 largest difference between each file's outputs and the
                 run's model in inference mode on a random batch

Both main files need only TensorFlow and Keras, not Horovod and not
dist_bn: SyncBatchNormalization is reverted to Keras's BatchNormalization
(`revert_sync_batchnorm`), and by default every BN is then folded into the
Conv3D before it (`fold_batchnorm`; --no-fold keeps the BN layers). OUT must
not exist or be empty; files are written to OUT.partial and renamed at the
end, so a failed export leaves nothing half-written under OUT.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

PROG = "dist-bn-export"


class ExportError(Exception):
    """The export cannot be done as asked; the message says why and what to do."""


def load_run_model(run_dir, checkpoint=None):
    """(model, checkpoint path, config) of a training run: the run's model in
    float32, with the weights and moving statistics of `checkpoint` (default:
    the run's latest)."""
    import tensorflow as tf

    from dist_bn.training.checkpoint import CHECKPOINT_DIR
    from dist_bn.training.model import build_model
    from dist_bn.training.rundir import CONFIG_FILE, load_saved_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a directory; give the run.dir of a training run")
    config = load_saved_config(run_dir)
    if config is None:
        raise ExportError(f"{run_dir} has no {CONFIG_FILE}: it is not a run directory of dist_bn.training")
    if checkpoint is None:
        checkpoint = tf.train.latest_checkpoint(str(run_dir / CHECKPOINT_DIR))
        if checkpoint is None:
            raise ExportError(f"{run_dir / CHECKPOINT_DIR} holds no checkpoint; train the run for at least "
                              "one epoch (checkpoints are written every train.checkpoint_every epochs)")
    model = build_model(config["model"], config["data"])
    try:
        tf.train.Checkpoint(model=model).restore(str(checkpoint)).expect_partial() \
            .assert_existing_objects_matched()
    except (ValueError, AssertionError, tf.errors.OpError) as err:
        problem = " ".join(str(err).split())[:400]
        raise ExportError(f"cannot restore {checkpoint} into the model of {run_dir / CONFIG_FILE}: {problem}")
    return model, str(checkpoint), config


def serving_model(model, fold=True, keep_unfoldable=False):
    """`model` as plain Keras layers: SyncBN reverted, BN folded (if `fold`)."""
    from dist_bn import SyncBatchNormalization
    from dist_bn.convert import revert_sync_batchnorm, walk
    from dist_bn.folding import fold_batchnorm

    if any(isinstance(layer, SyncBatchNormalization) for _, layer in walk(model)):
        model = revert_sync_batchnorm(model)
    if fold:
        model = fold_batchnorm(model, keep_unfoldable=keep_unfoldable)
    return model


def tflite_bytes(saved_model_dir):
    """(TFLite flatbuffer of the SavedModel, whether it needs TF Select ops).

    TFLite's built-in ops have Conv3D but no 3-D pooling, so the demo model
    converts only with `SELECT_TF_OPS` (MaxPool3D then runs as a Flex op:
    `tf.lite.Interpreter` of the full TensorFlow package runs it; a phone
    needs the Flex delegate library). Models without such ops get pure
    built-ins.
    """
    import tensorflow as tf

    def convert(ops):
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir))
        converter.target_spec.supported_ops = ops
        return converter.convert()

    builtins = [tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
        return convert(builtins), False
    except Exception:  # ConverterError; its MLIR dump says which ops are missing
        return convert(builtins + [tf.lite.OpsSet.SELECT_TF_OPS]), True


def _relative_error(got, want):
    import numpy as np
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def export_run(run_dir, out, checkpoint=None, fold=True, keep_unfoldable=False, tflite=False, seed=0):
    """Write OUT (see the module docstring); returns export.json's dict."""
    import keras
    import numpy as np
    import tensorflow as tf

    from dist_bn.convert import walk

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty; pick a new OUT (nothing is overwritten)")
    model, checkpoint, config = load_run_model(run_dir, checkpoint)
    served = serving_model(model, fold=fold, keep_unfoldable=keep_unfoldable)
    data = config["data"]
    probe = np.random.RandomState(seed).randn(4, data["frames"], data["height"], data["width"], 1) \
        .astype(np.float32)
    want = model(probe, training=False)

    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        served.save(partial / "model.keras")
        with contextlib.redirect_stdout(io.StringIO()):  # Keras 3.8 prints the endpoints regardless
            served.export(str(partial / "saved_model"), format="tf_saved_model", verbose=False)
        loaded = tf.saved_model.load(str(partial / "saved_model"))  # keep a reference while serving
        errors = {
            "model.keras": _relative_error(keras.saving.load_model(partial / "model.keras")(probe), want),
            "saved_model": _relative_error(loaded.serve(probe), want),
        }
        if tflite:
            flatbuffer, select_ops = tflite_bytes(partial / "saved_model")
            (partial / "model.tflite").write_bytes(flatbuffer)
            interpreter = tf.lite.Interpreter(model_path=str(partial / "model.tflite"))
            runner = interpreter.get_signature_runner("serving_default")
            (name,) = runner.get_input_details()
            (outputs,) = runner(**{name: probe}).values()
            errors["model.tflite"] = _relative_error(outputs, want)
        bn_left = [path for path, layer in walk(served) if isinstance(layer, keras.layers.BatchNormalization)]
        info = {"run_dir": str(Path(run_dir).absolute()), "checkpoint": checkpoint, "folded": fold,
                "batch_norm_layers_left": bn_left, "input_shape": list(probe.shape[1:]),
                "max_relative_difference_vs_run_model": errors,
                **({"tflite_needs_select_tf_ops": select_ops} if tflite else {}),
                "files": sorted([p.name for p in partial.iterdir()] + ["export.json"])}
        (partial / "export.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty (checked above)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                     epilog="Load them with keras.saving.load_model(OUT/model.keras) or "
                                            "tf.saved_model.load(OUT/saved_model).serve(clips).")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run.dir of a dist_bn.training run")
    parser.add_argument("out", metavar="OUT", help="new directory to write (must not exist or be empty)")
    parser.add_argument("--checkpoint", help="checkpoint prefix to export (default: the run's latest), "
                                             "e.g. RUN_DIR/checkpoints/ckpt-3")
    parser.add_argument("--no-fold", dest="fold", action="store_false",
                        help="keep the BatchNormalization layers instead of folding them into the convolutions")
    parser.add_argument("--keep-unfoldable", action="store_true",
                        help="keep BN layers that cannot be folded instead of failing")
    parser.add_argument("--tflite", action="store_true", help="also write OUT/model.tflite")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        info = export_run(args.run_dir, args.out, checkpoint=args.checkpoint, fold=args.fold,
                          keep_unfoldable=args.keep_unfoldable, tflite=args.tflite)
    except (ExportError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    differences = info["max_relative_difference_vs_run_model"]
    errors = ", ".join(f"{name} {value:.1e}" for name, value in differences.items())
    print(f"{PROG}: wrote {', '.join(info['files'])} to {args.out} from {info['checkpoint']}"
          f" ({'BN folded' if info['folded'] else 'BN kept'}; max relative difference vs the run's model: "
          f"{errors})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
