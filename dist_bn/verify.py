"""`dist-bn-verify`: check SyncBatchNormalization on your own world.

Run it on every rank, the way you start training, e.g.

    horovodrun -np 16 -H node1:8,node2:8 dist-bn-verify
    mpirun -np 16 -H node1:8,node2:8 -bind-to none python -m dist_bn.verify --process-sets all node
    dist-bn-launch verify configs/multi-node.yaml            (the config's launcher settings)

Every rank draws the same global batches from fixed seeds, keeps its own
slice (uneven sizes, empty slices, large per-channel offsets), trains a
`SyncBatchNormalization` on it for a few steps, and compares what it got with
a float64 NumPy batch norm run on the whole global batch in one process
(`dist_bn.reference`): the synchronized statistics, the outputs, the input,
gamma and beta gradients, the moving statistics (which must also be bitwise
equal on every rank of a set) and inference with them. It does so for each
process-set layout (`all`; `node`, one set per node from Horovod's local
ranks; or an explicit partition such as `0-7:8-15`) and dtype (float32, and
float16 / bfloat16 through Keras mixed precision). Rank 0 prints one line per
case with the worst error over all ranks and metrics, its tolerance and
pass/fail; every rank exits 1 if anything failed anywhere, 2 on a usage error.

`run_case` and friends are also what the multi-rank test suite runs
(tests/mpirun/sync_bn_cases.py), so the command checks a user's cluster with
exactly the code that checks the project.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import socket
import sys
import zlib
from typing import Any, Sequence

PROG = "dist-bn-verify"
STEPS = 3
MOMENTUM = 0.9
EPSILON = 1e-3

# Environment variables launchers set, to know the world before Horovod starts.
_SIZE_VARIABLES = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_NTASKS")
_RANK_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")


# ---------------------------------------------------------------------------
# Cases and their data. Pure Python/NumPy: no Horovod, no TensorFlow.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One batch-norm configuration: the shape of one sample (channels
    included), the channel axis, how the global batch is split over the ranks
    of a set, a per-channel mean offset, the Keras dtype policy and whether the
    training flag is a Python bool or a bool tensor inside tf.function."""

    name: str
    sample_shape: tuple
    axis: int
    sizes: str = "equal"  # equal | uneven | one_empty | all_empty
    offset: float = 0.0
    dtype: str = "float32"  # float32 | mixed_float16 | mixed_bfloat16
    tensor_training: bool = False

    @property
    def channels(self) -> int:
        return self.sample_shape[self.axis - 1 if self.axis > 0 else self.axis]


# The command's catalog; each runs once per dtype and process-set layout
# (offset cases in float32 only: they test float32 cancellation).
CATALOG = (
    Case("dense_2d_uneven", (5,), -1, sizes="uneven"),
    Case("conv2d_nhwc_one_empty", (4, 5, 3), -1, sizes="one_empty"),
    Case("conv3d_ndhwc_uneven", (3, 4, 5, 6), -1, sizes="uneven", tensor_training=True),
    Case("conv3d_ncdhw_uneven", (6, 3, 4, 5), 1, sizes="uneven"),
    Case("conv3d_ndhwc_offset_1e3", (3, 4, 5, 6), -1, sizes="uneven", offset=1e3),
    Case("conv3d_ndhwc_all_empty", (3, 4, 5, 6), -1, sizes="all_empty"),
)
FLOAT32_ONLY = {"conv3d_ndhwc_offset_1e3"}

DTYPES = {"float32": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}
DTYPE_ALIASES = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16", "fp32": "float32",
                 "fp16": "float16", "bf16": "bfloat16"}


def batch_sizes(kind: str, n: int) -> list[int]:
    """Per-rank batch sizes of one step for a set of n ranks. The pattern
    repeats every 8 ranks, so the global batch grows linearly with n."""
    return {
        "equal": [2] * n,
        "uneven": [1 + 2 * (i % 8) for i in range(n)],
        "one_empty": [0 if i == n - 1 else 2 + i % 8 for i in range(n)],
        "all_empty": [0] * n,
    }[kind]


def global_batches(case: Case, total: int, steps: int = STEPS):
    """The `steps` global batches and the upstream gradient dy of `case`, the
    same on every rank (seeded by the case name). Half-precision batches hold
    values exactly representable in that dtype (float32 arrays for bfloat16,
    which NumPy lacks), so the reference sees what the layer sees."""
    import numpy as np

    from dist_bn import reference

    rng = np.random.RandomState(zlib.crc32(case.name.encode()))
    shift = reference.per_channel(np.arange(case.channels), len(case.sample_shape) + 1, case.axis)
    batches = [
        (case.offset * (1 + shift) + (1 + 0.5 * shift) * rng.randn(total, *case.sample_shape) + shift)
        for _ in range(steps)
    ]
    if case.dtype == "mixed_float16":
        batches = [b.astype(np.float16) for b in batches]
    elif case.dtype == "mixed_bfloat16":
        batches = [_round_to_bfloat16(b) for b in batches]
    else:
        batches = [b.astype(np.float32) for b in batches]
    dy = rng.randn(total, *case.sample_shape).astype(np.float32)
    return batches, dy


def _round_to_bfloat16(x):
    """float32 array of the bfloat16 values nearest to x (round to nearest even)."""
    import numpy as np

    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def scaled_error(actual, expected) -> float:
    """max |actual - expected| relative to the largest |expected| (or 1 if that is < 1)."""
    import numpy as np

    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if expected.size == 0:
        return 0.0 if actual.size == 0 else float("inf")
    if actual.shape != expected.shape or not np.all(np.isfinite(actual)):
        return float("inf")
    return float(np.max(np.abs(actual - expected)) / max(1.0, np.max(np.abs(expected))))


TRAINING_METRICS = ("y", "dx", "dgamma", "dbeta", "moving_mean", "moving_variance")


def training_errors(ours, theirs, lo, hi):
    """scaled_error per TRAINING_METRICS; y and dx of `theirs` cover the whole
    global batch, of which this rank holds rows lo:hi."""
    errors = {}
    for metric, actual, expected in zip(TRAINING_METRICS, ours, theirs):
        errors[metric] = scaled_error(actual, expected[lo:hi] if metric in ("y", "dx") else expected)
    return errors


# Worst error allowed per metric, relative to the largest reference value.
FLOAT32 = dict(mean=1e-6, variance=1e-6, y=1e-5, dx=1e-5, dgamma=1e-5, dbeta=1e-5,
               moving_mean=1e-6, moving_variance=1e-6, inference_y=1e-5)
# |mean|/std up to 1.7e3 is held to the plain float32 tolerances: the layer
# subtracts the rounded mean exactly and carries what rounding dropped.
OFFSET = FLOAT32
# Outputs and input gradients are rounded to the compute dtype (float16: 11
# significant bits, bfloat16: 8); statistics stay float32/float64.
FLOAT16 = dict(FLOAT32, y=2e-3, dx=2e-3, dgamma=2e-3, dbeta=2e-3, inference_y=2e-3)
BFLOAT16 = dict(FLOAT32, y=1.6e-2, dx=1.6e-2, dgamma=1.6e-2, dbeta=1.6e-2, inference_y=1.6e-2)
SYNC_MOMENTS = dict(mean=1e-6, variance=1e-6, dx=1e-6)


def tolerances(case: Case) -> dict[str, float]:
    """The tolerances of `case`'s metrics against the float64 reference."""
    if case.dtype == "mixed_float16":
        return FLOAT16
    if case.dtype == "mixed_bfloat16":
        return BFLOAT16
    return OFFSET if case.offset else FLOAT32


# ---------------------------------------------------------------------------
# Process sets.
# ---------------------------------------------------------------------------


class UsageError(ValueError):
    """A bad command-line value, reported in one line with exit code 2."""


def parse_partition(spec: str, size: int) -> list[list[int]]:
    """An explicit partition "0-7:8-15" (sets separated by ':', ranks by ',',
    ranges a-b) into lists of ranks; every rank of the world exactly once."""
    groups = []
    for part in spec.split(":"):
        ranks = []
        for item in part.split(","):
            item = item.strip()
            match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
            if not match:
                raise UsageError(f"process set {spec!r}: {item!r} is not a rank or a range a-b")
            lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
            if hi < lo:
                raise UsageError(f"process set {spec!r}: range {item!r} is empty")
            ranks.extend(range(lo, hi + 1))
        groups.append(ranks)
    flat = [r for g in groups for r in g]
    if sorted(flat) != list(range(size)):
        missing = sorted(set(range(size)) - set(flat))
        extra = sorted({r for r in flat if flat.count(r) > 1 or r >= size})
        detail = "; ".join(filter(None, [f"missing {missing}" if missing else "",
                                         f"repeated or out of range {extra}" if extra else ""]))
        raise UsageError(f"process set {spec!r} must list every rank 0..{size - 1} exactly once ({detail})")
    return [sorted(g) for g in groups]


def node_partition(layout: Sequence[tuple[int, int, int]]) -> list[list[int]]:
    """One set per node from every rank's (rank, local_rank, local_size), as
    Horovod sees them: the ranks of a node must be consecutive (horovodrun
    places them so, and mpirun with -map-by slot); otherwise a clear error."""
    groups, rank = [], 0
    by_rank = {r: (lr, ls) for r, lr, ls in layout}
    while rank < len(layout):
        local_size = by_rank[rank][1]
        block = list(range(rank, rank + local_size))
        for i, r in enumerate(block):
            if by_rank.get(r) != (i, local_size):
                seen = by_rank.get(r)
                got = f"local rank {seen[0]} of {seen[1]}" if seen else "no such rank"
                raise UsageError(
                    "--process-sets node needs the ranks of each node to be consecutive, but rank "
                    f"{r} has {got} where local rank {i} of {local_size} belongs; start ranks by slot "
                    "(horovodrun does; mpirun: -map-by slot) or give the sets explicitly, e.g. 0-7:8-15")
        groups.append(block)
        rank += local_size
    return groups


@dataclasses.dataclass(frozen=True)
class Group:
    """The ranks this rank shares statistics with under one process-set layout."""

    label: str  # the layout: all, node, or the partition spec
    ranks: tuple[int, ...]
    process_set: Any = None  # hvd.ProcessSet, or None for all ranks

    @property
    def horovod_set(self):
        import horovod.tensorflow as hvd

        return self.process_set or hvd.global_process_set


def _launcher_size() -> int | None:
    for name in _SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def gloo_loopback_warning() -> str | None:
    """A warning when Horovod's Gloo controller is about to span hosts from a
    host whose name resolves to a loopback address: Horovod 0.28.1 creates the
    communicators of process sets (the global one included) on the address of
    the host's name, not on --network-interfaces, so the first collective
    fails with "connect [127.x.x.x]:PORT: Connection refused"."""
    if not os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR") or os.environ.get("HOROVOD_CROSS_SIZE", "1") == "1":
        return None
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        return f"this host's name {name!r} does not resolve; Horovod's Gloo controller needs it to"
    if address.startswith("127."):
        return (f"this host's name {name!r} resolves to {address}: Horovod 0.28.1's Gloo controller binds "
                "process-set communicators to that address and the ranks on other hosts cannot reach it. "
                "Map the name to this host's cluster address (/etc/hosts) or use the MPI controller.")
    return None


def init(layouts: Sequence[str] = ("all",), device: str = "auto") -> dict[str, Group]:
    """Start Horovod (process sets added dynamically when a layout needs them)
    and pin this rank to GPU local_rank (device "auto" or "gpu") or to the CPU.
    Returns {layout: this rank's Group}. Raises UsageError for a bad layout."""
    if any(layout != "all" for layout in layouts):
        os.environ["HOROVOD_DYNAMIC_PROCESS_SETS"] = "1"
    import horovod.tensorflow as hvd
    import tensorflow as tf

    warning = gloo_loopback_warning()
    if warning:
        print(f"{PROG}: warning: {warning}", file=sys.stderr, flush=True)
    from dist_bn.training.distributed import pin_local_gpu

    if device == "cpu":
        tf.config.set_visible_devices([], "GPU")
    hvd.init()
    if device != "cpu":
        pinned = pin_local_gpu()
        if pinned is None and device == "gpu":
            raise UsageError("--device gpu: TensorFlow sees no GPU on this rank")

    layout = hvd.allgather_object((hvd.rank(), hvd.local_rank(), hvd.local_size()), name="verify/layout")
    world = tuple(range(hvd.size()))
    registered: dict[tuple[int, ...], Any] = {world: None}
    groups = {}
    for label in layouts:
        if label == "all":
            partition = [list(world)]
        elif label == "node":
            partition = node_partition(layout)
        else:
            partition = parse_partition(label, hvd.size())
        for ranks in partition:  # the same sets in the same order on every rank
            key = tuple(ranks)
            if key not in registered:
                registered[key] = hvd.add_process_set(list(key))
        mine = next(tuple(g) for g in partition if hvd.rank() in g)
        groups[label] = Group(label, mine, registered[mine])
    return groups


# ---------------------------------------------------------------------------
# Running one case on this rank.
# ---------------------------------------------------------------------------


def _input_dtype(case: Case):
    import tensorflow as tf

    return {"mixed_float16": tf.float16, "mixed_bfloat16": tf.bfloat16}.get(case.dtype, tf.float32)


def make_layer(cls, case: Case, name: str, process_set=None):
    """A built layer of `cls` (SyncBatchNormalization or Keras's) with fixed,
    non-trivial weights."""
    import numpy as np

    import dist_bn

    kwargs = dict(axis=case.axis, momentum=MOMENTUM, epsilon=EPSILON, dtype=case.dtype, name=name)
    if cls is dist_bn.SyncBatchNormalization:
        kwargs["process_set"] = process_set
    layer = cls(**kwargs)
    layer.build((None,) + case.sample_shape)
    c = case.channels
    layer.set_weights([1.0 + 0.1 * np.arange(c), 0.05 * np.arange(c) - 0.1,
                       0.2 * np.ones(c), 1.5 * np.ones(c)])
    return layer


def train_steps(layer, batches, dy, tensor_training: bool, dtype):
    """Training steps on `batches`; returns (y, dx, dgamma, dbeta) of the first."""
    import tensorflow as tf

    call = tf.function(lambda x, t: layer(x, training=t)) if tensor_training else None
    results = None
    for x in batches:
        x = tf.constant(x, dtype)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = call(x, tf.constant(True)) if call else layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * dy)
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        if results is None:
            results = [y.numpy()] + [g.numpy() for g in grads]
    return results


def run_case(case: Case, group: Group, compare_keras: bool = False, steps: int = STEPS,
             prefix: str = "verify") -> dict:
    """Run `case` on this rank within `group` and measure it against the
    float64 reference on the group's global batch (and, with compare_keras,
    against keras.layers.BatchNormalization run on that whole batch).

    Every rank of the group must call it with the same arguments. Returns
    plain data: errors per metric (see `scaled_error`) and boolean checks.
    """
    import horovod.tensorflow as hvd
    import keras
    import numpy as np
    import tensorflow as tf

    import dist_bn
    from dist_bn import reference

    keras.mixed_precision.set_dtype_policy("float32")
    ranks = list(group.ranks)
    me = ranks.index(hvd.rank())
    sizes = batch_sizes(case.sizes, len(ranks))
    lo, hi = sum(sizes[:me]), sum(sizes[: me + 1])
    batches, dy = global_batches(case, sum(sizes), steps)
    dtype = _input_dtype(case)
    tag = f"{prefix}/{group.label}/{case.dtype}/{case.name}".replace(":", "_").replace(",", "_")
    layer_tag = re.sub(r"[^A-Za-z0-9_]", "_", tag)

    # The op behind the layer, once: the synchronized statistics themselves.
    gamma0 = 1.0 + 0.1 * np.arange(case.channels)
    beta0 = 0.05 * np.arange(case.channels) - 0.1
    first = tf.constant(batches[0][lo:hi], dtype)
    compute = tf.float32 if dtype != tf.float32 else dtype
    _, stat_mean, stat_var, stat_count = dist_bn.sync_batch_normalization(
        tf.cast(first, compute), tf.constant(gamma0, compute), tf.constant(beta0, compute),
        case.axis, EPSILON, process_set=group.horovod_set, name=f"{tag}/statistics")
    ref_count, ref_mean, ref_var = reference.moments(batches[0], case.axis)

    sync = make_layer(dist_bn.SyncBatchNormalization, case, f"sync_{layer_tag}", group.horovod_set)
    gamma, beta, mean0, var0 = [w.numpy().astype(np.float64) for w in sync.weights]
    y, dx, dgamma, dbeta = train_steps(sync, [b[lo:hi] for b in batches], dy[lo:hi],
                                       case.tensor_training, dtype)
    dgamma = hvd.allreduce(dgamma, op=hvd.Sum, process_set=group.horovod_set, name=f"{tag}/dgamma").numpy()
    dbeta = hvd.allreduce(dbeta, op=hvd.Sum, process_set=group.horovod_set, name=f"{tag}/dbeta").numpy()
    moving = [sync.moving_mean.numpy(), sync.moving_variance.numpy()]
    ours = (y, dx, dgamma, dbeta, *moving)

    ref_y = reference.forward(batches[0], case.axis, gamma, beta, EPSILON)
    ref_dx, ref_dgamma, ref_dbeta = reference.backward(batches[0], dy, case.axis, gamma, EPSILON)
    ref_moving = reference.moving_statistics(batches, case.axis, MOMENTUM, mean0, var0)

    gathered = hvd.allgather(np.concatenate(moving)[None], name=f"{tag}/moving",
                             process_set=group.horovod_set).numpy()
    bitwise_equal = all(g.tobytes() == gathered[0].tobytes() for g in gathered)

    inference_in = tf.constant(batches[0][lo:hi], dtype)
    if case.tensor_training:
        y_inf = tf.function(lambda x, t: sync(x, training=t))(inference_in, tf.constant(False))
    else:
        y_inf = sync(inference_in, training=False)
    unchanged = all(np.array_equal(a, b.numpy()) for a, b in
                    zip(moving, [sync.moving_mean, sync.moving_variance]))
    ref_inf = reference.normalize(batches[0][lo:hi], case.axis, moving[0], moving[1], gamma, beta, EPSILON)

    result = {
        "ranks": len(ranks),
        "batch_sizes": sizes,
        "output_dtype": y.dtype.name,
        "statistics": {
            "mean": scaled_error(stat_mean, ref_mean),
            "variance": scaled_error(stat_var, ref_var),
        },
        "count_exact": int(stat_count) == ref_count,
        "vs_numpy": {
            **training_errors(ours, (ref_y, ref_dx, ref_dgamma, ref_dbeta, *ref_moving), lo, hi),
            "inference_y": scaled_error(y_inf, ref_inf),
        },
        "moving_bitwise_equal_across_ranks": bool(bitwise_equal),
        "inference_leaves_moving_unchanged": bool(unchanged),
    }
    if compare_keras:
        keras_bn = make_layer(keras.layers.BatchNormalization, case, f"keras_{layer_tag}")
        k_y, k_dx, k_dgamma, k_dbeta = train_steps(keras_bn, batches, dy, False, dtype)
        k_moving = [keras_bn.moving_mean.numpy(), keras_bn.moving_variance.numpy()]
        result["vs_keras"] = training_errors(ours, (k_y, k_dx, k_dgamma, k_dbeta, *k_moving), lo, hi)
    return result


def run_sync_moments(name: str = "test/sync_moments") -> dict:
    """sync_moments over all ranks: values and the gradient of the sum of every
    rank's loss, against float64 NumPy."""
    import horovod.tensorflow as hvd
    import numpy as np
    import tensorflow as tf

    import dist_bn
    from dist_bn import reference

    rng = np.random.RandomState(7)
    sizes = batch_sizes("uneven", hvd.size())
    lo, hi = sum(sizes[: hvd.rank()]), sum(sizes[: hvd.rank() + 1])
    x = (5.0 + rng.randn(sum(sizes), 3, 4, 2)).astype(np.float32)
    a, b = rng.randn(hvd.size(), 2), rng.randn(hvd.size(), 2)
    xl = tf.constant(x[lo:hi])
    with tf.GradientTape() as tape:
        tape.watch(xl)
        mean, var = dist_bn.sync_moments(xl, axes=[0, 1, 2], name=name)
        loss = tf.reduce_sum(a[hvd.rank()] * mean) + tf.reduce_sum(b[hvd.rank()] * var)
    dx = tape.gradient(loss, xl).numpy()
    count, ref_mean, ref_var = reference.moments(x, -1)
    ref_dx = a.sum(0) / count + b.sum(0) * 2 * (x[lo:hi] - ref_mean) / count
    return {"vs_numpy": {"mean": scaled_error(mean, ref_mean), "variance": scaled_error(var, ref_var),
                         "dx": scaled_error(dx, ref_dx)}}


def run_channel_mismatch(name: str = "mismatch") -> dict:
    """Ranks with different channel counts must get a clear error, not a hang."""
    import horovod.tensorflow as hvd
    import tensorflow as tf

    import dist_bn

    layer = dist_bn.SyncBatchNormalization(name=name)
    x = tf.ones([2, 3, 4 + hvd.rank()])
    try:
        layer(x, training=True)
    except ValueError as error:
        return {"error": str(error)}
    return {"error": None}


# ---------------------------------------------------------------------------
# Judging and reporting (pure: plain data in, plain data out).
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    layout: str
    dtype: str
    case: str
    worst: str  # metric and rank of the worst error, or the failed check
    error: float | None
    tolerance: float | None
    passed: bool


def judge_case(layout: str, dtype: str, case: str, per_rank: Sequence[dict],
               limits: dict[str, float], scale: float = 1.0) -> tuple[Row, list[str]]:
    """One table row from every rank's result of a case, given as (rank,
    result) pairs, and the failures (each 'rank R metric: error > tolerance'
    or a failed check). The row shows the error closest to its tolerance."""
    failures, worst = [], None
    for rank, result in per_rank:
        for group in ("statistics", "vs_numpy"):
            for metric, error in result.get(group, {}).items():
                tol = limits[metric] * scale
                ratio = error / tol if tol > 0 else (0.0 if error == 0 else float("inf"))
                if worst is None or ratio > worst[0]:
                    worst = (ratio, f"{metric} r{rank}", error, tol)
                if not error <= tol:
                    failures.append(f"rank {rank} {metric}: {error:.3g} > {tol:.3g}")
        checks = {
            "count_exact": "global count differs from the reference",
            "moving_bitwise_equal_across_ranks": "moving statistics differ between ranks of the set",
            "inference_leaves_moving_unchanged": "inference changed the moving statistics",
        }
        for key, message in checks.items():
            if key in result and not result[key]:
                failures.append(f"rank {rank}: {message}")
        expected_dtype = {"float16": "float16", "bfloat16": "bfloat16"}.get(dtype, "float32")
        if "output_dtype" in result and result["output_dtype"] != expected_dtype:
            failures.append(f"rank {rank}: output dtype {result['output_dtype']}, expected {expected_dtype}")
    row = Row(layout, dtype, case, "-", None, None, not failures)
    if worst is not None:
        row.worst, row.error, row.tolerance = worst[1:]
        if failures and worst[2] <= worst[3]:  # every error within tolerance: a check failed
            row.worst = failures[0]
    elif failures:
        row.worst = failures[0]
    return row, failures


def format_table(rows: Sequence[Row]) -> str:
    header = ("set", "dtype", "case", "worst", "error", "tolerance", "result")
    lines = [header]
    for row in rows:
        lines.append((row.layout, row.dtype, row.case, row.worst,
                      "-" if row.error is None else f"{row.error:.2e}",
                      "-" if row.tolerance is None else f"{row.tolerance:.2g}",
                      "pass" if row.passed else "FAIL"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


# ---------------------------------------------------------------------------
# The command.
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Check on every rank that SyncBatchNormalization's statistics, outputs and "
                    "gradients equal one process's float64 result on the gathered global batch.",
        epilog="Run it on every rank, e.g. `horovodrun -np 16 -H node1:8,node2:8 dist-bn-verify "
               "--process-sets all node`, or `dist-bn-launch verify CONFIG.yaml`. Exit code: 0 all "
               "passed, 1 a mismatch on some rank, 2 a usage error.",
    )
    parser.add_argument("--process-sets", nargs="+", default=["all"], metavar="LAYOUT",
                        help="all (one set of every rank), node (one set per node, from Horovod's "
                             "local ranks), or a partition of the ranks such as 0-7:8-15 or 0,2:1,3 "
                             "(default: all)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), metavar="DTYPE",
                        help="float32, float16, bfloat16 (the half types through Keras mixed "
                             "precision; default: all three)")
    parser.add_argument("--cases", nargs="+", metavar="CASE",
                        help="only these cases of the catalog (default: all; see --list)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"training steps per case (default {STEPS})")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="auto: GPU local_rank when TensorFlow sees GPUs, else CPU (default)")
    parser.add_argument("--tolerance-scale", type=float, default=1.0, metavar="X",
                        help="multiply every tolerance by X (default 1)")
    parser.add_argument("--json", metavar="PATH", help="rank 0 also writes every rank's results here")
    parser.add_argument("--list", action="store_true", help="print the cases and tolerances, and exit")
    return parser


def _dtype_name(text: str) -> str:
    name = DTYPE_ALIASES.get(text, text)
    if name not in DTYPES:
        raise UsageError(f"--dtypes: unknown dtype {text!r}; use float32, float16 or bfloat16")
    return name


def selected_cases(names: Sequence[str] | None, dtypes: Sequence[str]) -> list[Case]:
    """The catalog cases to run, one per dtype (float32-only cases once)."""
    known = {case.name: case for case in CATALOG}
    for name in names or ():
        if name not in known:
            raise UsageError(f"--cases: unknown case {name!r}; known: {', '.join(known)}")
    chosen = [known[n] for n in names] if names else list(CATALOG)
    cases = []
    for dtype in dtypes:
        for case in chosen:
            if dtype != "float32" and case.name in FLOAT32_ONLY:
                continue
            cases.append(dataclasses.replace(case, dtype=DTYPES[dtype]))
    return cases


def describe_catalog() -> str:
    lines = ["cases (each per dtype and process-set layout):"]
    for case in CATALOG:
        only = " (float32 only)" if case.name in FLOAT32_ONLY else ""
        lines.append(f"  {case.name}: sample {case.sample_shape}, axis {case.axis}, batches {case.sizes}"
                     + (f", channel offsets {case.offset:g}..{case.offset * case.channels:g}" if case.offset else "")
                     + (", training flag as a tensor in tf.function" if case.tensor_training else "") + only)
    lines.append("  sync_moments: dist_bn.sync_moments values and gradient over all ranks")
    lines.append("  channel_mismatch: ranks with different channel counts get a clear error (2+ ranks)")
    lines.append("tolerances (max |error| / max(1, max |reference|)):")
    for label, limits in (("float32", FLOAT32), ("float32 offset", OFFSET), ("float16", FLOAT16),
                          ("bfloat16", BFLOAT16)):
        lines.append(f"  {label}: " + ", ".join(f"{k} {v:g}" for k, v in limits.items()))
    return "\n".join(lines)


def _world_line(hvd, tf, layout_info) -> str:
    import keras

    import dist_bn

    local_sizes = []
    rank = 0
    by_rank = {r: ls for r, _, ls in layout_info}
    while rank < len(by_rank):
        local_sizes.append(by_rank[rank])
        rank += max(1, by_rank[rank])
    controller = "gloo" if hvd.gloo_enabled() else "mpi" if hvd.mpi_enabled() else "?"
    gpus = tf.config.list_physical_devices("GPU")
    visible = tf.config.get_visible_devices("GPU")
    device = f"GPU (each rank on GPU local_rank of {len(gpus)} per node)" if visible else "CPU"
    nodes = "+".join(map(str, local_sizes))
    return (f"{PROG}: {hvd.size()} ranks on {len(local_sizes)} node(s) ({nodes}), Horovod "
            f"{_version('horovod')} ({controller} controller{', NCCL' if hvd.nccl_built() else ''}), "
            f"TensorFlow {tf.__version__}, Keras {keras.__version__}, dist_bn {dist_bn.__version__}, {device}")


def hosts_line(hostnames: Sequence[str]) -> str:
    """'hosts: a (ranks 0-7), b (ranks 8-15)' from every rank's host name, runs
    of consecutive ranks on one host grouped; at most 8 hosts are named."""
    runs: list[list] = []
    for rank, name in enumerate(hostnames):
        if runs and runs[-1][0] == name and runs[-1][2] == rank - 1:
            runs[-1][2] = rank
        else:
            runs.append([name, rank, rank])
    parts = [f"{name} (rank {lo})" if lo == hi else f"{name} (ranks {lo}-{hi})" for name, lo, hi in runs[:8]]
    if len(runs) > 8:
        parts.append(f"... {len(runs) - 8} more")
    return "hosts: " + ", ".join(parts)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        print(describe_catalog())
        return 0
    rank_hint = next((int(os.environ[v]) for v in _RANK_VARIABLES if os.environ.get(v, "").isdigit()), 0)

    def usage(message: str) -> int:
        if rank_hint == 0:
            print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
        return 2

    try:
        if args.steps < 1:
            raise UsageError("--steps must be >= 1")
        if not args.tolerance_scale >= 0:
            raise UsageError("--tolerance-scale must be >= 0")
        dtypes = list(dict.fromkeys(_dtype_name(d) for d in args.dtypes))
        cases = selected_cases(args.cases, dtypes)
        size = _launcher_size()
        layouts = list(dict.fromkeys(args.process_sets))
        for layout in layouts:  # explicit partitions are checked before Horovod starts
            if layout not in ("all", "node") and size is not None:
                parse_partition(layout, size)
    except UsageError as err:
        return usage(str(err))

    try:
        groups = init(layouts, args.device)
    except UsageError as err:
        return usage(str(err))
    import horovod.tensorflow as hvd
    import tensorflow as tf

    layout_info = hvd.allgather_object((hvd.rank(), hvd.local_rank(), hvd.local_size()), name="verify/world")
    hostnames = hvd.allgather_object(socket.gethostname(), name="verify/hosts")
    if hvd.rank() == 0:
        print(_world_line(hvd, tf, layout_info), flush=True)
        print(hosts_line(hostnames), flush=True)

    results: list[tuple[str, str, str, dict]] = []
    for layout in layouts:
        for case in cases:
            result = run_case(case, groups[layout], steps=args.steps)
            results.append((layout, _dtype_name(case.dtype), case.name, result))
    results.append(("all", "float32", "sync_moments", run_sync_moments(name="verify/sync_moments")))
    if hvd.size() > 1:
        results.append(("all", "float32", "channel_mismatch", run_channel_mismatch("verify_mismatch")))

    everyone = hvd.allgather_object(results, name="verify/results")
    rows, failures = [], []
    for i, (layout, dtype, name, _) in enumerate(results):
        per_rank = [(rank, everyone[rank][i][3]) for rank in range(hvd.size())]
        if name == "channel_mismatch":
            bad = [r for r, res in per_rank if not (res["error"] and "differ across ranks" in res["error"])]
            row = Row(layout, dtype, name, "error on every rank" if not bad else f"no clear error on ranks {bad}",
                      None, None, not bad)
            problems = [f"rank {r}: no clear error for mismatched channels" for r in bad]
        else:
            case = next((c for c in cases if c.name == name and _dtype_name(c.dtype) == dtype), None)
            limits = SYNC_MOMENTS if case is None else tolerances(case)
            renamed = [(r, {"vs_numpy": res["vs_numpy"]} if case is None else res) for r, res in per_rank]
            row, problems = judge_case(layout, dtype, name, renamed, limits, args.tolerance_scale)
        rows.append(row)
        failures.extend(f"{layout} {dtype} {name}: {p}" for p in problems)

    if hvd.rank() == 0:
        print(format_table(rows))
        failed = sum(not row.passed for row in rows)
        print(f"{len(rows) - failed} passed, {failed} failed", flush=True)
        for line in failures[:50]:
            print(f"  {line}")
        if len(failures) > 50:
            print(f"  ... and {len(failures) - 50} more")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({"world": hvd.size(), "ranks": [[list(r[:3]) + [r[3]] for r in rank_results]
                                                         for rank_results in everyone]}, f, indent=1)
        sys.stdout.flush()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
