#!/usr/bin/env python
"""How much faster is inference with batch norm folded into the convolutions?

Builds the demo model (configs/demo.yaml's model and data sizes) with
SyncBatchNormalization, gives its BN layers non-trivial statistics, and
times inference (`model(x, training=False)` in a `tf.function`) of three
versions of it side by side in one process:

  sync      the trained model as it is (SyncBatchNormalization, inference mode)
  reverted  `revert_sync_batchnorm`: plain keras BatchNormalization
  folded    `fold_batchnorm`: no BN layer; each Conv3D gets the BN's scale and shift

Each version's time per call is the median (and the minimum, the
estimate least disturbed by other processes) over --repeats rounds of
--steps calls, the versions interleaved round by round so that load from
other processes affects them alike; printed as times and as ratios to
`folded`, with the folded model's largest relative output difference.

    .venv/bin/python scripts/fold_benchmark.py [--batch 16] [--config configs/demo.yaml]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--batch", type=int, default=16, help="clips per inference call")
    parser.add_argument("--steps", type=int, default=5, help="calls per timed round")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds (median and minimum)")
    args = parser.parse_args(argv)

    import keras
    import numpy as np
    import tensorflow as tf

    import dist_bn
    from dist_bn.convert import walk
    from dist_bn.training.model import build_model
    from dist_bn.training.schema import load_config

    config = load_config(args.config, ["model.bn=sync"])
    data = config["data"]
    model = build_model(config["model"], data)
    rng = np.random.RandomState(0)
    for _, layer in walk(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.randn(c))
            layer.moving_variance.assign(rng.rand(c) + 0.5)
            layer.gamma.assign(rng.rand(c) + 0.5)
            layer.beta.assign(rng.randn(c))
    versions = {"sync": model, "reverted": dist_bn.revert_sync_batchnorm(model)}
    versions["folded"] = dist_bn.fold_batchnorm(versions["reverted"])
    x = tf.constant(rng.randn(args.batch, data["frames"], data["height"], data["width"], 1), tf.float32)
    calls = {name: tf.function(lambda clips, m=m: m(clips, training=False)) for name, m in versions.items()}
    want = calls["sync"](x).numpy()
    error = float(np.max(np.abs(calls["folded"](x).numpy() - want)) / np.max(np.abs(want)))
    for call in calls.values():  # warm up
        for _ in range(3):
            call(x).numpy()
    rounds = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                out = call(x)
            out.numpy()
            rounds[name].append((time.perf_counter() - start) / args.steps)
    median = {name: float(np.median(times)) for name, times in rounds.items()}
    best = {name: float(np.min(times)) for name, times in rounds.items()}
    print(f"demo model ({config['model']['depth']} x Conv3D-BN-ReLU, width {config['model']['width']}), "
          f"{args.batch} clips of {data['frames']}x{data['height']}x{data['width']}, "
          f"median of {args.repeats} rounds x {args.steps} calls; "
          f"{os.environ.get('TF_NUM_INTRAOP_THREADS', 'default')} intra-op threads")
    for name, seconds in median.items():
        print(f"  {name:9s} median {seconds * 1e3:8.2f} ms/call ({seconds / median['folded']:.2f}x folded), "
              f"min {best[name] * 1e3:8.2f} ms/call ({best[name] / best['folded']:.2f}x folded)")
    print(f"folded vs sync: max relative output difference {error:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
