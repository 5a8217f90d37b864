"""The measurements behind dist-bn-bench (see dist_bn/bench.py for the CLI).

Each section returns plain dicts of milliseconds or bytes; `render` turns
them into the table rank 0 prints.
"""
import os
import statistics
import time

import horovod.tensorflow as hvd
import keras
import numpy as np
import tensorflow as tf

import dist_bn
from dist_bn import collectives, moments

EPSILON = 1e-3
HOROVOD_KNOBS = ("HOROVOD_CYCLE_TIME", "HOROVOD_FUSION_THRESHOLD", "HOROVOD_CACHE_CAPACITY",
                 "HOROVOD_AUTOTUNE")


def _block(outputs):
    """Wait for every output (GPU work is asynchronous)."""
    for t in tf.nest.flatten(outputs):
        t.numpy()


def median_ms(fn, steps, warmup, name):
    """Median over steps of the slowest rank's time for fn(), in ms; ranks start together."""
    for _ in range(warmup):
        _block(fn())
    times = []
    for i in range(steps):
        hvd.allreduce(tf.zeros([1]), name=f"bench/barrier/{name}")
        start = time.perf_counter()
        _block(fn())
        times.append(time.perf_counter() - start)
    slowest = hvd.allreduce(tf.constant(times, tf.float64), op=hvd.Max, name=f"bench/times/{name}")
    return 1e3 * statistics.median(slowest.numpy().tolist())


def _grad_step(forward, x, dy, variables):
    """A tf.function: forward(x) and the gradients for x and `variables` given dy."""
    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = forward(x)
        return tape.gradient(y, [x] + variables, output_gradients=dy)
    return step


def layer_section(args):
    """Forward+backward of one BN layer per implementation, per shape."""
    rows = []
    for shape in args.shapes:
        channels = shape[-1]
        rng = np.random.RandomState(hvd.rank())
        x = tf.constant(rng.randn(*shape), tf.float32)
        dy = tf.constant(rng.randn(*shape), tf.float32)
        gamma, beta = tf.Variable(tf.ones([channels])), tf.Variable(tf.zeros([channels]))

        def fused(x):
            return tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, epsilon=EPSILON, is_training=True, data_format="NDHWC")[0]

        variants = {"tf fused kernel (local)": _grad_step(fused, x, dy, [gamma, beta])}
        layers = {"keras BatchNormalization (local)": keras.layers.BatchNormalization(epsilon=EPSILON),
                  "dist_bn SyncBatchNormalization": dist_bn.SyncBatchNormalization(epsilon=EPSILON)}
        try:
            layers["horovod SyncBatchNormalization"] = hvd.SyncBatchNormalization(epsilon=EPSILON)
        except Exception as error:  # Keras 3 without tf-keras: it cannot construct
            rows.append({"shape": shape, "variant": "horovod SyncBatchNormalization",
                         "skipped": f"{type(error).__name__}: {str(error)[:80]}"})
        for name, layer in layers.items():
            layer.build(shape)
            variables = [w.value if isinstance(w, keras.Variable) else w for w in layer.trainable_weights]
            variants[name] = _grad_step(lambda x, layer=layer: layer(x, training=True), x, dy, variables)
        base = None
        for name, step in variants.items():
            ms = median_ms(step, args.steps, args.warmup, f"layer/{name}/{shape}")
            base = base or ms
            rows.append({"shape": shape, "variant": name, "ms": ms, "vs_fused": ms / base})
    return rows


def collective_section(args):
    """One SyncBN forward collective vs a bare hvd.allreduce vs mpi4py, same payload."""
    rows = []
    for channels in sorted({s[-1] for s in args.shapes}):
        count = tf.constant(1000, tf.int64)
        mean, m2 = tf.random.normal([channels]), tf.random.uniform([channels])
        name = f"bench/collective/{channels}"
        process_set = collectives.resolve_process_set(None)

        @tf.function
        def as_layer():
            packed = moments.pack_moments(count, mean, m2)
            return moments.unpack_moments(collectives.allreduce_sum(packed, name + "/layer", process_set))

        payload = tf.zeros([2 * channels + 1], tf.float64)
        bare = tf.function(lambda: hvd.allreduce(payload, op=hvd.Sum, name=name + "/bare"))
        row = {"channels": channels, "bytes": 8 * (2 * channels + 1),
               "syncbn_forward_ms": median_ms(as_layer, args.steps * 5, args.warmup, name + "/a"),
               "bare_hvd_allreduce_ms": median_ms(bare, args.steps * 5, args.warmup, name + "/b")}
        row["mpi4py_Allreduce_ms"] = _mpi4py_ms(channels, args)
        rows.append(row)
    return rows


def _mpi4py_ms(channels, args):
    """mpi4py Allreduce of 2C+1 float64 on COMM_WORLD, or None when MPI is not the controller."""
    if not hvd.mpi_enabled():
        return None
    from mpi4py import MPI

    send, recv = np.zeros(2 * channels + 1), np.zeros(2 * channels + 1)
    comm = MPI.COMM_WORLD
    for _ in range(args.warmup):
        comm.Allreduce(send, recv)
    times = []
    for _ in range(args.steps * 5):
        comm.Barrier()
        start = time.perf_counter()
        comm.Allreduce(send, recv)
        times.append(time.perf_counter() - start)
    slowest = np.empty(len(times))
    comm.Allreduce(np.array(times), slowest, op=MPI.MAX)
    return 1e3 * statistics.median(slowest.tolist())


def _trainers(args):
    """A training-step Trainer of the project's model per bn kind, same config otherwise."""
    from dist_bn.training import distributed
    from dist_bn.training.loop import Trainer
    from launch.config import load_config

    world = distributed.World(hvd.rank(), hvd.size(), hvd.local_rank())
    trainers = {}
    for bn in ("local", "sync"):
        config = load_config(args.config, [*args.overrides, f"model.bn={bn}"])
        trainers[bn] = Trainer(config, world)
    return trainers, config


def _batch(config):
    data, batch = config["data"], config["train"]["batch_size"]
    clips = tf.random.normal([batch, data["frames"], data["height"], data["width"], 1])
    labels = tf.zeros([batch], tf.int32)
    return clips, labels


def model_section(args):
    """Training-step time of the project's model, bn local vs sync."""
    trainers, config = _trainers(args)
    clips, labels = _batch(config)
    rows = {bn: median_ms(lambda t=t: t.train_step(clips, labels), args.steps, args.warmup, f"model/{bn}")
            for bn, t in trainers.items()}
    return {"batch_per_rank": config["train"]["batch_size"], "model": dict(config["model"], bn=None),
            "local_ms": rows["local"], "sync_ms": rows["sync"], "sync_vs_local": rows["sync"] / rows["local"]}


def memory_section(args):
    """Peak allocator bytes of a training step, bn local vs sync (TF's memory stats)."""
    device = "GPU:0" if tf.config.list_logical_devices("GPU") else "CPU:0"
    trainers, config = _trainers(args)
    clips, labels = _batch(config)
    peaks = {}
    for bn, trainer in trainers.items():
        _block(trainer.train_step(clips, labels))  # traced and allocated once
        tf.config.experimental.reset_memory_stats(device)
        base = tf.config.experimental.get_memory_info(device)["current"]
        for _ in range(3):
            _block(trainer.train_step(clips, labels))
        peaks[bn] = tf.config.experimental.get_memory_info(device)["peak"] - base
    return {"device": device, "local_peak_bytes": peaks["local"], "sync_peak_bytes": peaks["sync"],
            "sync_vs_local": peaks["sync"] / peaks["local"]}


SECTIONS = {"layer": layer_section, "collective": collective_section,
            "model": model_section, "memory": memory_section}


def run(args):
    devices = tf.config.list_logical_devices("GPU")
    results = {
        "world_size": hvd.size(),
        "controller": "mpi" if hvd.mpi_enabled() else "gloo",
        "device": devices[0].name if devices else "CPU",
        "tf_threads": {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                       "inter_op": tf.config.threading.get_inter_op_parallelism_threads()},
        "horovod_knobs": {k: os.environ.get(k) for k in HOROVOD_KNOBS},
        "steps": args.steps, "warmup": args.warmup,
    }
    for section in args.sections:
        results[section] = SECTIONS[section](args)
    return results


def render(results):
    """The results as a short plain-text report."""
    lines = [f"dist-bn-bench: {results['world_size']} ranks, controller {results['controller']}, "
             f"device {results['device']}, Horovod knobs {results['horovod_knobs']}, "
             f"median of {results['steps']} steps after {results['warmup']} warm-up"]
    for row in results.get("layer", []):
        shape = "x".join(map(str, row["shape"]))
        if "skipped" in row:
            lines.append(f"  layer {shape:<16} {row['variant']:<34} skipped: {row['skipped']}")
        else:
            lines.append(f"  layer {shape:<16} {row['variant']:<34} {row['ms']:8.2f} ms  "
                         f"{row['vs_fused']:5.2f}x fused")
    for row in results.get("collective", []):
        mpi = row["mpi4py_Allreduce_ms"]
        lines.append(f"  collective C={row['channels']:<4} ({row['bytes']} B): syncbn forward "
                     f"{row['syncbn_forward_ms']:.3f} ms, bare hvd.allreduce {row['bare_hvd_allreduce_ms']:.3f} ms "
                     f"({row['syncbn_forward_ms'] / row['bare_hvd_allreduce_ms']:.2f}x), mpi4py "
                     + (f"{mpi:.3f} ms" if mpi is not None else "n/a (Gloo controller)"))
    if "model" in results:
        m = results["model"]
        lines.append(f"  model step ({m['batch_per_rank']} clips/rank): local {m['local_ms']:.1f} ms, "
                     f"sync {m['sync_ms']:.1f} ms, sync/local {m['sync_vs_local']:.3f}")
    if "memory" in results:
        m = results["memory"]
        lines.append(f"  peak memory of a step on {m['device']}: local {m['local_peak_bytes'] / 2**20:.1f} MiB, "
                     f"sync {m['sync_peak_bytes'] / 2**20:.1f} MiB, sync/local {m['sync_vs_local']:.3f}")
    return "\n".join(lines)
