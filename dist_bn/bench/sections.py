"""The measurements behind dist-bn-bench (the command line is dist_bn/bench/cli.py).

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
from dist_bn import collectives, moments, open_mpi_waits

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
    """Forward+backward of one BN layer per implementation, per shape, timed in turns."""
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
        times = median_ms_interleaved(variants, args.steps, args.warmup, f"layer/{shape}")
        base = times["tf fused kernel (local)"]
        rows += [{"shape": shape, "variant": name, "ms": ms, "vs_fused": ms / base}
                 for name, ms in times.items()]
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
    comm = MPI.COMM_WORLD.Dup()  # apart from Horovod's own traffic
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
    from dist_bn.training.schema import load_config

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


def median_ms_interleaved(fns, steps, warmup, name):
    """median_ms for several functions, run in turns so that load changes hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            _block(fn())
    times = {key: [] for key in fns}
    for i in range(steps):
        for key, fn in fns.items():
            hvd.allreduce(tf.zeros([1]), name=f"bench/barrier/{name}")
            start = time.perf_counter()
            _block(fn())
            times[key].append(time.perf_counter() - start)
    result = {}
    for key, values in times.items():
        slowest = hvd.allreduce(tf.constant(values, tf.float64), op=hvd.Max, name=f"bench/times/{name}/{key}")
        result[key] = 1e3 * statistics.median(slowest.numpy().tolist())
    return result


def deep_network(api, bn, blocks, channels, clip_shape):
    """The X3D-like net of the deep section: a stem Conv3D, then `blocks` of a
    depthwise 3x3x3 and a 1x1x1 Conv3D, each conv followed by bn() and ReLU,
    then global average pooling and 10 logits. `api` is keras (Keras 3) or
    tf.keras (tf-keras, for Horovod's layer)."""
    layers = api.layers
    inputs = api.Input(shape=clip_shape)
    x = inputs
    convs = [dict(filters=channels, kernel_size=3)]
    convs += [dict(filters=channels, kernel_size=k, groups=g) for _ in range(blocks)
              for k, g in ((3, channels), (1, 1))]
    for conv in convs:
        x = layers.Conv3D(padding="same", use_bias=False, **conv)(x)
        x = layers.ReLU()(bn()(x))
    x = layers.GlobalAveragePooling3D()(x)
    return api.Model(inputs, layers.Dense(10)(x))


def _deep_step(model, clips, labels, variables):
    """A plain user's training step: forward, hvd.DistributedGradientTape, SGD."""
    @tf.function
    def step():
        with tf.GradientTape() as tape:
            logits = model(clips, training=True)
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
                labels, logits, from_logits=True))
        grads = hvd.DistributedGradientTape(tape).gradient(loss, variables)
        for variable, grad in zip(variables, grads):
            variable.assign_sub(0.01 * grad)
        return loss
    return step


def _collective_chain(collective, payload, length):
    """A tf.function of `length` collectives each on the previous one's result,
    as a deep net's BN layers issue them (one cannot start before the last ends)."""
    @tf.function
    def chain():
        x = payload
        for i in range(length):
            x = collective(x, i) * 0.5
        return x
    return chain


def _transports_besides_default():
    """The transports that can run here other than the default one (for comparison)."""
    default = collectives.transport_name()
    usable = ["horovod"]
    if default in ("mpi", "mpi4py"):
        usable.insert(0, "mpi4py")
    return [t for t in usable if t != default]


def deep_section(args):
    """Step time of a deep thin 3D net, local BN vs ours vs Horovod's, and the
    per-collective latency of each transport, all in one run."""
    rng = np.random.RandomState(hvd.rank())
    clip_shape = tuple(args.deep_shape[1:]) + (3,)
    clips = tf.constant(rng.randn(args.deep_shape[0], *clip_shape), tf.float32)
    labels = tf.constant(rng.randint(0, 10, args.deep_shape[0]), tf.int32)
    steps, bn_layers = {}, 2 * args.deep_blocks + 1
    names = iter(range(10**9))

    def keras3(bn, transport="auto"):
        model = deep_network(keras, bn, args.deep_blocks, args.deep_channels, clip_shape)
        variables = [w.value for w in model.trainable_weights]
        step = _deep_step(model, clips, labels, variables)
        with collectives.use_transport(transport):
            step.get_concrete_function()  # the transport is chosen when tracing
        return step

    steps["keras BatchNormalization (local)"] = keras3(lambda: keras.layers.BatchNormalization(epsilon=EPSILON))
    steps["dist_bn SyncBatchNormalization"] = keras3(lambda: dist_bn.SyncBatchNormalization(epsilon=EPSILON))
    for transport in _transports_besides_default():
        steps[f"dist_bn SyncBatchNormalization, {transport} transport"] = keras3(
            lambda: dist_bn.SyncBatchNormalization(epsilon=EPSILON), transport)
    skipped = {}
    try:
        for key, bn in (("tf-keras BatchNormalization (local)", tf.keras.layers.BatchNormalization),
                        ("horovod SyncBatchNormalization (tf-keras)", hvd.SyncBatchNormalization)):
            # tf-keras needs unique layer names; Horovod's layer uses them as collective names.
            model = deep_network(tf.keras, lambda bn=bn: bn(epsilon=EPSILON, name=f"bn{next(names)}"),
                                 args.deep_blocks,
                                 args.deep_channels, clip_shape)
            steps[key] = _deep_step(model, clips, labels, model.trainable_variables)
    except Exception as error:  # Keras 3 without tf-keras: Horovod's layer cannot be built
        skipped["horovod SyncBatchNormalization (tf-keras)"] = f"{type(error).__name__}: {str(error)[:80]}"
    step_ms = median_ms_interleaved(steps, args.steps, args.warmup, "deep/steps")

    process_set = collectives.resolve_process_set(None)
    payload = tf.zeros([2 * args.deep_channels + 1], tf.float64)
    chains = {}
    for transport in [collectives.transport_name(), *_transports_besides_default()]:
        chains[f"dist_bn allreduce_sum ({transport} transport)"] = _collective_chain(
            lambda x, i: collectives.allreduce_sum(x, f"bench/deep/{transport}/{i}", process_set),
            payload, bn_layers)
        with collectives.use_transport(transport):
            chains[f"dist_bn allreduce_sum ({transport} transport)"].get_concrete_function()
    chains["bare hvd.allreduce"] = _collective_chain(
        lambda x, i: hvd.allreduce(x, op=hvd.Sum, name=f"bench/deep/bare/{i}"), payload, bn_layers)
    chain_ms = median_ms_interleaved(chains, args.steps, args.warmup, "deep/chains")
    latency_us = {key: 1e3 * ms / bn_layers for key, ms in chain_ms.items()}
    latency_us["raw mpi4py Allreduce"] = (None if not hvd.mpi_enabled()
                                          else 1e3 * _mpi4py_ms(args.deep_channels, args))
    local = {"dist_bn": step_ms["keras BatchNormalization (local)"],
             "horovod": step_ms.get("tf-keras BatchNormalization (local)")}
    rows = [{"variant": key, "ms": ms,
             "vs_local": ms / (local["horovod"] if "tf-keras" in key else local["dist_bn"])}
            for key, ms in step_ms.items()]
    rows += [{"variant": key, "skipped": why} for key, why in skipped.items()]
    return {"blocks": args.deep_blocks, "channels": args.deep_channels, "bn_layers": bn_layers,
            "clips_per_rank": list(args.deep_shape), "transport": collectives.transport_name(),
            "steps": rows, "collective_latency_us": latency_us}


SECTIONS = {"layer": layer_section, "collective": collective_section,
            "model": model_section, "memory": memory_section, "deep": deep_section}


def run(args):
    devices = tf.config.list_logical_devices("GPU")
    results = {
        "world_size": hvd.size(),
        "controller": "mpi" if hvd.mpi_enabled() else "gloo",
        "device": devices[0].name if devices else "CPU",
        "tf_threads": {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                       "inter_op": tf.config.threading.get_inter_op_parallelism_threads()},
        "horovod_knobs": {k: os.environ.get(k) for k in HOROVOD_KNOBS},
        "open_mpi_yield_when_idle": os.environ.get(open_mpi_waits.VARIABLE),
        "steps": args.steps, "warmup": args.warmup,
    }
    for section in args.sections:
        results[section] = SECTIONS[section](args)
    return results


def render(results):
    """The results as a short plain-text report."""
    lines = [f"dist-bn-bench: {results['world_size']} ranks, controller {results['controller']}, "
             f"device {results['device']}, Horovod knobs {results['horovod_knobs']}, "
             f"{open_mpi_waits.VARIABLE}={results['open_mpi_yield_when_idle']}, "
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
    if "deep" in results:
        d = results["deep"]
        lines.append(f"  deep net: {d['bn_layers']} BN layers of {d['channels']} channels, clips/rank "
                     f"{'x'.join(map(str, d['clips_per_rank']))}, dist_bn transport {d['transport']}")
        for row in d["steps"]:
            if "skipped" in row:
                lines.append(f"    step {row['variant']:<50} skipped: {row['skipped']}")
            else:
                lines.append(f"    step {row['variant']:<50} {row['ms']:8.1f} ms  {row['vs_local']:5.2f}x local BN")
        for key, us in d["collective_latency_us"].items():
            lines.append(f"    per collective {key:<40} " + (f"{us:8.1f} us" if us is not None else "n/a (no MPI)"))
    if "model" in results:
        m = results["model"]
        lines.append(f"  model step ({m['batch_per_rank']} clips/rank): local {m['local_ms']:.1f} ms, "
                     f"sync {m['sync_ms']:.1f} ms, sync/local {m['sync_vs_local']:.3f}")
    if "memory" in results:
        m = results["memory"]
        lines.append(f"  peak memory of a step on {m['device']}: local {m['local_peak_bytes'] / 2**20:.1f} MiB, "
                     f"sync {m['sync_peak_bytes'] / 2**20:.1f} MiB, sync/local {m['sync_vs_local']:.3f}")
    return "\n".join(lines)
