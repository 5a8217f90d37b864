"""Runs on every rank under mpirun: precise_bn against float64 NumPy.

Every rank draws the same global batches from a seed and keeps its own,
uneven, slice (one rank's slice of one batch is empty for the synchronized
models). Each model stacks two BN layers, so the second one's inputs depend
on the first one's batch statistics: the global batch's for
SyncBatchNormalization, the rank's own for keras.layers.BatchNormalization.
The NumPy reference replays that in float64 on the concatenated batches and
takes the population mean and variance of every BN layer's inputs over all
batches. Each rank writes its errors, its new moving statistics (to compare
bitwise across ranks) and what fvcore's estimate (the mean of the per-batch
variances) would have been, to REPORT_DIR/rank<R>.json; tests/dist_bn/test_precise_bn.py
holds the tolerances.

Usage: python precise_bn_cases.py REPORT_DIR
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import dist_bn  # noqa: E402

EPS = 1e-3
BATCHES = 5
CHANNELS = 3


def batch_sizes(batch, world, with_empty):
    sizes = [(batch + 2 * rank) % 4 + 1 for rank in range(world)]
    if with_empty and batch == 2:
        sizes[1 % world] = 0
    return sizes


def build(sync, spatial):
    layer = dist_bn.SyncBatchNormalization if sync else keras.layers.BatchNormalization
    x = keras.Input(spatial + (CHANNELS,))
    h = layer(epsilon=EPS, momentum=0.9, name="bn1")(x)
    h = keras.layers.ReLU()(h)
    # A 1x1x1 Conv3D is a Dense on the channels: the same NumPy reference serves both.
    mixer = keras.layers.Conv3D(4, 1, name="mixer") if spatial else keras.layers.Dense(4, name="mixer")
    h = mixer(h)
    second = dict(unbiased_moving_variance=True) if sync else {}
    h = layer(epsilon=EPS, momentum=0.9, name="bn2", **second)(h)
    model = keras.Model(x, h, name="stacked")
    rng = np.random.RandomState(1)
    bn1 = model.get_layer("bn1")
    bn1.gamma.assign(rng.rand(CHANNELS) + 0.5)
    bn1.beta.assign(rng.randn(CHANNELS))
    model.get_layer("mixer").set_weights([rng.randn(*w.shape).astype(np.float32)
                                          for w in model.get_layer("mixer").get_weights()])
    return model


def reference(model, batches, slices, sync):
    """Population (mean, variance, fvcore's variance) of each BN layer's inputs, float64."""
    bn1 = model.get_layer("bn1")
    gamma, beta = bn1.gamma.numpy().astype(np.float64), bn1.beta.numpy().astype(np.float64)
    kernel, bias = (w.astype(np.float64) for w in model.get_layer("mixer").get_weights())
    kernel = kernel.reshape(-1, kernel.shape[-1])
    seen = {"bn1": [], "bn2": []}
    for x, parts in zip(batches, slices):
        x = x.astype(np.float64)
        flat = x.reshape(-1, CHANNELS)
        groups = [x] if sync else [x[a:b] for a, b in parts]
        y = []
        for group in groups:  # the values a BN1 call normalizes together
            g = group.reshape(-1, CHANNELS)
            if g.shape[0]:
                y.append(gamma * (g - g.mean(0)) / np.sqrt(g.var(0) + EPS) + beta)
        h2 = np.maximum(np.concatenate(y), 0) @ kernel + bias
        seen["bn1"].append(flat)
        seen["bn2"].append(h2)
    out = {}
    for name, parts in seen.items():
        values = np.concatenate(parts)
        fvcore = np.mean([p.var(0) for p in parts], axis=0)
        out[name] = (values.mean(0), values.var(0), values.var(0, ddof=1), values.shape[0], fvcore)
    return out


def run_case(name, sync, spatial, rank, world):
    rng = np.random.RandomState(7)
    batches, slices, mine = [], [], []
    for b in range(BATCHES):
        sizes = batch_sizes(b, world, with_empty=sync)
        x = (rng.randn(sum(sizes), *spatial, CHANNELS) * 2.0 + 5.0 + b).astype(np.float32)
        edges = np.concatenate([[0], np.cumsum(sizes)])
        parts = list(zip(edges[:-1], edges[1:]))
        batches.append(x)
        slices.append(parts)
        mine.append(x[parts[rank][0]:parts[rank][1]])
    model = build(sync, spatial)
    before = {v.path: v.numpy() for v in model.weights if "moving" not in v.path}
    momentum = [model.get_layer(n).momentum for n in ("bn1", "bn2")]
    counts = dist_bn.precise_bn(model, mine, BATCHES, name=f"precise_bn/{name}")
    expected = reference(model, batches, slices, sync)
    result = {"counts": counts, "errors": {}, "moving": {}, "fvcore_variance_error": {},
              "momentum_kept": momentum == [model.get_layer(n).momentum for n in ("bn1", "bn2")],
              "other_weights_kept": all(np.array_equal(v.numpy(), before[v.path])
                                        for v in model.weights if "moving" not in v.path),
              "batch_sizes": [batch_sizes(b, world, sync) for b in range(BATCHES)]}
    for layer_name, (mean, var, var_unbiased, count, fvcore) in expected.items():
        layer = model.get_layer(layer_name)
        want_var = var_unbiased if getattr(layer, "unbiased_moving_variance", False) else var
        got_mean, got_var = layer.moving_mean.numpy(), layer.moving_variance.numpy()
        std = np.sqrt(var)
        result["errors"][layer_name] = {
            "mean_over_std": float(np.max(np.abs(got_mean - mean) / std)),
            "variance_relative": float(np.max(np.abs(got_var - want_var) / want_var)),
            "count": int(count)}
        result["fvcore_variance_error"][layer_name] = float(np.max(np.abs(fvcore - var) / var))
        result["moving"][layer_name] = [got_mean.tolist(), got_var.tolist()]
    return result


def run_out_of_data(rank):
    model = build(True, ())
    batches = [np.ones((2, CHANNELS), np.float32)] * (1 if rank == 1 else 3)
    try:
        dist_bn.precise_bn(model, batches, 3, name="precise_bn/short")
    except ValueError as err:
        return str(err)
    return None


def main(report_dir):
    hvd.init()
    rank, world = hvd.rank(), hvd.size()
    report = {"world": world, "cases": {}}
    for name, sync, spatial in (("sync_dense", True, ()), ("sync_conv3d", True, (2, 3, 2)),
                                ("keras_dense", False, ()), ("keras_conv3d", False, (2, 3, 2))):
        report["cases"][name] = run_case(name, sync, spatial, rank, world)
    report["ran_out"] = run_out_of_data(rank)
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
