"""dist-bn-bench: what synchronized batch norm costs, measured side by side in one run.

Run it on every rank, under mpirun, horovodrun or the launcher:

    mpirun -np 2 dist-bn-bench --config configs/demo.yaml

Sections (all by default, or pick with --sections):
  layer       forward+backward of one BN layer on 5-D NDHWC tensors: TF's fused
              kernel and Keras's BatchNormalization (both local), our
              SyncBatchNormalization, Horovod's SyncBatchNormalization
  collective  the SyncBN forward collective as the layer issues it (pack,
              all-reduce, unpack), a bare hvd.allreduce of the same payload,
              and mpi4py's Allreduce of the same bytes (the transport's floor)
  model       a training step of the project's 3D-conv model, bn local vs sync
  memory      peak allocator memory of that training step, local vs sync
  deep        a training step of a deep thin X3D-like net (--deep-blocks blocks
              of a depthwise 3x3x3 and a 1x1x1 Conv3D, each with BN + ReLU):
              Keras's local BN, ours (default transport, and Horovod's), and
              tf-keras's local BN vs Horovod's layer; and the latency of one
              collective of 2C+1 doubles: ours per transport, a bare
              hvd.allreduce (both in a chain as deep as the net's) and mpi4py
Every time is the median over --steps iterations after --warmup, of the
slowest rank in each iteration; every ratio is taken within this run. Rank 0
prints a table and writes the numbers as JSON (--json).

TensorFlow reads two settings at import: TF_CPU_ALLOCATOR_USE_BFC (CPU memory
statistics) and TF_USE_LEGACY_KERAS (Horovod's layer needs tf-keras, Keras 2).
The command restarts itself once with them set.
"""
import argparse
import json
import os
import sys
import time

IMPORT_TIME_ENV = {"TF_CPU_ALLOCATOR_USE_BFC": "true", "TF_USE_LEGACY_KERAS": "1",
                   "TF_CPP_MIN_LOG_LEVEL": "2"}


def _restart_with_import_time_env():
    if all(os.environ.get(k) == v for k, v in IMPORT_TIME_ENV.items()):
        return
    env = {**os.environ, **IMPORT_TIME_ENV}
    os.execve(sys.executable, [sys.executable, "-m", "dist_bn.bench.cli", *sys.argv[1:]], env)


# The section names, in run order (dist_bn.bench.sections.SECTIONS holds the
# functions; it imports TensorFlow, which this command line must not before
# its restart). tests/dist_bn/test_bench.py checks the two agree.
SECTION_NAMES = ("layer", "collective", "model", "memory", "deep")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="dist-bn-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTION_NAMES),
                        help="comma-separated subset of " + ",".join(SECTION_NAMES))
    parser.add_argument("--shapes", default="2x8x56x56x64,2x4x14x14x256",
                        help="per-rank NDHWC shapes for the layer section")
    parser.add_argument("--deep-blocks", type=int, default=30,
                        help="deep section: blocks (2 BN layers each, plus the stem's)")
    parser.add_argument("--deep-channels", type=int, default=16, help="deep section: channels")
    parser.add_argument("--deep-shape", default="2x4x6x6",
                        help="deep section: per-rank clips x frames x height x width (3 colour channels)")
    parser.add_argument("--steps", type=int, default=20, help="timed iterations (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    parser.add_argument("--config", default="configs/demo.yaml",
                        help="training config whose model/data/train sections the model section uses")
    parser.add_argument("--json", default=None,
                        help="where rank 0 writes the results (default: bench-<time>.json; never overwritten)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides of --config")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTION_NAMES)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTION_NAMES)}")
    try:
        args.deep_shape = tuple(int(d) for d in args.deep_shape.split("x"))
    except ValueError:
        parser.error(f"--deep-shape: expected e.g. 2x4x6x6, got {args.deep_shape!r}")
    if len(args.deep_shape) != 4 or min(args.deep_shape) < 1:
        parser.error("--deep-shape: clips x frames x height x width, 4 positive numbers")
    if args.deep_blocks < 1 or args.deep_channels < 1:
        parser.error("--deep-blocks and --deep-channels must be at least 1")
    try:
        args.shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    except ValueError:
        parser.error(f"--shapes: expected e.g. 2x8x56x56x64, got {args.shapes!r}")
    if any(len(s) != 5 for s in args.shapes):
        parser.error("--shapes: each shape is N x D x H x W x C (5-D, channels last)")
    args.json = args.json or time.strftime("bench-%Y%m%d-%H%M%S.json")
    if os.path.exists(args.json):
        parser.error(f"--json {args.json} exists; give another file name")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    _restart_with_import_time_env()
    import horovod.tensorflow as hvd

    from dist_bn.bench import sections
    from dist_bn.training import distributed

    distributed.init()  # Horovod, and GPU local_rank pinned where there are GPUs
    results = sections.run(args)
    if hvd.rank() == 0:
        print(sections.render(results))
        with open(args.json, "x") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
