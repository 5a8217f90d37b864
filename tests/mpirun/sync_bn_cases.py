"""Runs on every rank under mpirun/horovodrun: SyncBatchNormalization vs references.

A thin caller of `dist_bn.verify` (the code behind `dist-bn-verify`): every
rank draws the same global batches from a seed, keeps its own slice, trains
the layer on it, and measures its results against float64 NumPy and against
keras.layers.BatchNormalization, both run on the whole concatenated batch.
Errors are written, per case, to REPORT_DIR/rank<R>.json; the pytest side
(tests/dist_bn/test_mpirun.py) judges them with dist-bn-verify's own judge.

Usage: python sync_bn_cases.py REPORT_DIR
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dist_bn.verify import run, world  # noqa: E402
from dist_bn.verify.cases import Case  # noqa: E402

# (case, subset): subset cases sync within ranks {0..n-2} beside {n-1} (3+ ranks).
CASES = [
    (Case("dense_2d_equal", (5,), -1), False),
    (Case("dense_2d_uneven", (5,), -1, sizes="uneven"), False),
    (Case("conv2d_nhwc_uneven", (4, 5, 3), -1, sizes="uneven"), False),
    (Case("conv2d_nhwc_one_empty", (4, 5, 3), -1, sizes="one_empty"), False),
    (Case("conv3d_ndhwc_equal", (3, 4, 5, 6), -1, tensor_training=True), False),
    (Case("conv3d_ndhwc_uneven", (3, 4, 5, 6), -1, sizes="uneven", tensor_training=True), False),
    (Case("conv3d_ndhwc_one_empty", (3, 4, 5, 6), -1, sizes="one_empty"), False),
    (Case("conv3d_ncdhw_equal", (6, 3, 4, 5), 1), False),
    (Case("conv3d_ncdhw_uneven", (6, 3, 4, 5), 1, sizes="uneven", tensor_training=True), False),
    (Case("conv3d_ncdhw_one_empty", (6, 3, 4, 5), 1, sizes="one_empty"), False),
    (Case("conv3d_ndhwc_offset_1e3", (3, 4, 5, 6), -1, sizes="uneven", offset=1e3), False),
    (Case("conv3d_ncdhw_offset_1e3", (6, 3, 4, 5), 1, sizes="uneven", offset=1e3), False),
    (Case("conv3d_ndhwc_fp16", (3, 4, 5, 6), -1, sizes="uneven", dtype="mixed_float16"), False),
    (Case("conv3d_ndhwc_all_empty", (3, 4, 5, 6), -1, sizes="all_empty"), False),
    (Case("conv3d_ndhwc_subset", (3, 4, 5, 6), -1, sizes="uneven"), True),
]


def main(report_dir):
    size = int(os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("HOROVOD_SIZE") or 1)
    subset = f"0-{size - 2}:{size - 1}" if size >= 3 else None
    groups = world.init(["all"] + ([subset] if subset else []), device="cpu").groups
    import horovod.tensorflow as hvd

    report = {"world": hvd.size(), "cases": {}}
    for case, in_subset in CASES:
        if in_subset and subset is None:
            continue
        group = groups[subset] if in_subset else groups["all"]
        report["cases"][case.name] = dict(run.run_case(case, group, compare_keras=True, prefix="test"),
                                          layout=group.label)
    report["cases"]["sync_moments"] = run.run_sync_moments()
    report["cases"]["channel_mismatch"] = run.run_channel_mismatch()
    with open(os.path.join(report_dir, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
