"""The layer at real sizes, with masks and with empty shards under mpirun.

tests/mpirun/exactness_cases.py runs on every rank (uneven slices; a rank
whose values are all masked; a globally masked batch); this side holds the
tolerances. The 3.2M-values-per-rank case runs at 2 ranks only, to keep the
suite's memory and time within a 2-core machine. The last test trains a
Conv3D net with an empty rank against one process on the concatenated batch.
"""
import json
import os

import pytest

from mpirun_helpers import mpirun_argv, run_ranks
from paths import CASES

pytestmark = pytest.mark.mpirun

SCRIPT = str(CASES / "exactness_cases.py")
SCALE_CASES = ("3.2M_per_rank_offset_1e4", "401k_per_rank_ncdhw_offset_1e3")
MASK_CASES = ("masked_sequences", "masked_clips_ndhwc", "masked_channels_first")


@pytest.fixture(scope="module", params=[(2, "1"), (3, "0")], ids=["np2-with-scale", "np3"])
def reports(request, tmp_path_factory):
    np_, scale = request.param
    report_dir = tmp_path_factory.mktemp(f"exactness-np{np_}")
    result = run_ranks(mpirun_argv(np_, SCRIPT, str(report_dir), scale))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.load(open(os.path.join(report_dir, f"rank{r}.json"))) for r in range(np_)]


def cases_of(reports, names):
    found = [(rank, name, report["cases"][name]) for rank, report in enumerate(reports)
             for name in names if name in report["cases"]]
    if not found:
        pytest.skip("these cases run at another world size")
    return found


def test_statistics_at_real_sizes_within_1e6(reports):
    for rank, name, r in cases_of(reports, SCALE_CASES):
        assert r["count_exact"], (rank, name)
        assert r["mean_std"] <= 1e-6 and r["variance_rel"] <= 1e-6, (rank, name, r)
        # sync_moments returns float32: the float64 truth rounded.
        assert r["sync_moments_mean_rel"] <= 1.2e-7 and r["sync_moments_variance_rel"] <= 1e-6, (rank, name, r)


def test_outputs_and_gradients_at_real_sizes(reports):
    for rank, name, r in cases_of(reports, SCALE_CASES):
        assert r["y"] <= 2e-4 and r["dx"] <= 1e-5, (rank, name, r)
        # gamma's and beta's gradients are TF's fused float32 sums over 3.2M values.
        assert r["dgamma"] <= 5e-4 and r["dbeta"] <= 5e-4, (rank, name, r)


@pytest.mark.parametrize("group", ["scale", "mask"])
def test_moving_statistics_are_the_truth_rounded_and_equal_on_every_rank(reports, group):
    for rank, name, r in cases_of(reports, SCALE_CASES if group == "scale" else MASK_CASES):
        assert r["moving_mean_std"] <= 0.5 * r["moving_mean_floor"] + 1e-6, (rank, name, r)
        assert r["moving_variance_rel"] <= 1e-6, (rank, name, r)
    for name in reports[0]["cases"]:
        assert len({report["cases"][name]["moving_digest"] for report in reports}) == 1, name


def test_masked_statistics_and_gradients_across_ranks(reports):
    for rank, name, r in cases_of(reports, MASK_CASES + ("masked_everywhere",)):
        for metric in ("y", "dx", "dgamma", "dbeta"):
            assert r[metric] <= 1e-5, (rank, name, metric, r)


def test_a_globally_masked_batch_leaves_moving_statistics_alone(reports):
    for rank, name, r in cases_of(reports, ("masked_everywhere",)):
        assert r["moving_untouched"], (rank, name)


def test_conv3d_training_with_an_empty_shard_equals_one_process(tmp_path):
    """mpirun -np 3, the last rank empty behind oneDNN's misshapen empty Conv3D output."""
    script = str(CASES / "empty_shard_training.py")
    result = run_ranks(mpirun_argv(3, script, str(tmp_path)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(3)]
    assert reports[2]["sizes"][2] == 0
    # The bug is really there: the empty rank's Conv3D kept its input's 3 channels.
    assert reports[2]["empty_conv_output_shape"] == [0, 4, 8, 8, 3]
    for report in reports:
        assert report["worst_weight_error"] <= 1e-4, report
