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

The package: `cases` (the catalog, its data and tolerances), `world`
(Horovod and the process sets), `run` (one case on this rank), `judge` (the
verdicts and the table) and this command line. The multi-rank tests run and
judge with the same code (tests/mpirun/sync_bn_cases.py,
tests/dist_bn/test_mpirun.py), so the command checks a user's cluster with
exactly the code that checks the project.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
from typing import Sequence

from dist_bn import rank_env
from dist_bn.verify.cases import (DTYPES, STEPS, UsageError, describe_catalog, dtype_name,
                                  selected_cases)
from dist_bn.verify.judge import Result, format_table, hosts_line, judge_results
from dist_bn.verify.run import run_case, run_channel_mismatch, run_sync_moments
from dist_bn.verify.world import World, init, parse_partition

PROG = "dist-bn-verify"


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


def world_line(hvd, tf, world: World) -> str:
    """The first line rank 0 prints: ranks, nodes, versions and device."""
    import keras

    import dist_bn

    controller = "gloo" if hvd.gloo_enabled() else "mpi" if hvd.mpi_enabled() else "?"
    gpus = tf.config.list_physical_devices("GPU")
    visible = tf.config.get_visible_devices("GPU")
    device = f"GPU (each rank on GPU local_rank of {len(gpus)} per node)" if visible else "CPU"
    nodes = world.node_sizes
    return (f"{PROG}: {hvd.size()} ranks on {len(nodes)} node(s) ({'+'.join(map(str, nodes))}), Horovod "
            f"{_version('horovod')} ({controller} controller{', NCCL' if hvd.nccl_built() else ''}), "
            f"TensorFlow {tf.__version__}, Keras {keras.__version__}, dist_bn {dist_bn.__version__}, {device}")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def run_all(world: World, layouts: Sequence[str], cases, steps: int) -> list[Result]:
    """Every case under every layout on this rank, then sync_moments and (2+ ranks) channel_mismatch."""
    import horovod.tensorflow as hvd

    results = []
    for layout in layouts:
        for case in cases:
            results.append(Result(layout, case.dtype_label, case.name,
                                  run_case(case, world.groups[layout], steps=steps)))
    results.append(Result("all", "float32", "sync_moments", run_sync_moments(name="verify/sync_moments")))
    if hvd.size() > 1:
        results.append(Result("all", "float32", "channel_mismatch", run_channel_mismatch("verify_mismatch")))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        print(describe_catalog())
        return 0

    def usage(message: str) -> int:
        if rank_env.launcher_rank() == 0:
            print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
        return 2

    try:
        if args.steps < 1:
            raise UsageError("--steps must be >= 1")
        if not args.tolerance_scale >= 0:
            raise UsageError("--tolerance-scale must be >= 0")
        dtypes = list(dict.fromkeys(dtype_name(d) for d in args.dtypes))
        cases = selected_cases(args.cases, dtypes)
        size = rank_env.launcher_size()
        layouts = list(dict.fromkeys(args.process_sets))
        for layout in layouts:  # explicit partitions are checked before Horovod starts
            if layout not in ("all", "node") and size is not None:
                parse_partition(layout, size)
        world = init(layouts, args.device, prog=PROG)
    except UsageError as err:
        return usage(str(err))
    import horovod.tensorflow as hvd
    import tensorflow as tf

    hostnames = hvd.allgather_object(socket.gethostname(), name="verify/hosts")
    if hvd.rank() == 0:
        print(world_line(hvd, tf, world), flush=True)
        print(hosts_line(hostnames), flush=True)

    results = run_all(world, layouts, cases, args.steps)
    everyone = hvd.allgather_object(results, name="verify/results")
    rows, failures = judge_results(everyone, args.tolerance_scale)

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
                json.dump({"world": hvd.size(),
                           "ranks": [[[r.layout, r.dtype, r.case, r.data] for r in rank_results]
                                     for rank_results in everyone]}, f, indent=1)
        sys.stdout.flush()
    return 1 if failures else 0
