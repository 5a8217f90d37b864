"""dist_bn.keras under model.fit across ranks, against one process on the global batch.

tests/mpirun/keras_fit_cases.py runs every case on every rank (2 ranks under
mpirun, 3 under horovodrun with Gloo) and writes what it measured; this side
holds the tolerances. The reference is one process training Keras's own
BatchNormalization on the concatenated global batches from rank 0's weights.
"""
import json
import os

import pytest

from mpirun_helpers import horovodrun_gloo_argv, mpirun_argv, run_ranks
from paths import CASES

pytestmark = pytest.mark.mpirun

SCRIPT = str(CASES / "keras_fit_cases.py")
LAUNCHES = {
    "mpirun-np2": (mpirun_argv, 2, "fit,sparse,loss_scale,resume,resume_mid_epoch,warmup"),
    "horovodrun-gloo-np3": (horovodrun_gloo_argv, 3, "fit,empty_validation,resume,resume_mid_epoch"),
}


@pytest.fixture(scope="module", params=sorted(LAUNCHES))
def reports(request, tmp_path_factory):
    argv_of, np_, cases = LAUNCHES[request.param]
    report_dir = tmp_path_factory.mktemp(request.param)
    result = run_ranks(argv_of(np_, SCRIPT, str(report_dir), cases))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    loaded = [json.load(open(os.path.join(report_dir, f"rank{r}.json"))) for r in range(np_)]
    assert all(report["size"] == np_ for report in loaded)
    return loaded


def case(reports, name):
    if name not in reports[0]["cases"]:
        pytest.skip(f"{name} runs in the other launch")
    return [report["cases"][name] for report in reports]


def test_fit_reaches_the_weights_of_one_process_on_the_global_batch(reports):
    for rank, r in enumerate(case(reports, "fit")):
        # Other ranks started elsewhere: only the broadcast made them agree.
        assert r["initial_weights_differed"] == (rank != 0), rank
        assert r["weights"] <= 1e-4, (rank, r["per_weight"])


def test_fit_logs_are_exact_over_ranks_validation_included(reports):
    for rank, r in enumerate(case(reports, "fit")):
        assert set(r["logs"]) == {"loss", "sparse_categorical_accuracy",
                                  "val_loss", "val_sparse_categorical_accuracy"}
        for key, errors in r["logs"].items():
            assert max(errors) <= 1e-5, (rank, key, errors)


def test_a_rank_without_validation_data_logs_the_global_validation(reports):
    for rank, r in enumerate(case(reports, "empty_validation")):
        assert r["keys"] == ["loss", "sparse_categorical_accuracy", "val_loss",
                             "val_sparse_categorical_accuracy"], (rank, r)
        assert max(r["val"].values()) <= 1e-5, (rank, r)


def test_evaluate_and_predict_over_uneven_shards(reports):
    for rank, r in enumerate(case(reports, "fit")):
        assert max(r["evaluate"].values()) <= 1e-5, (rank, r["evaluate"])
        assert r["predict"] <= 1e-5 and r["predict_rows"] == 31, (rank, r)
    # The shards really differ: a rank's own evaluate is not the global one.
    assert any(max(r["evaluate_local"].values()) > 1e-3 for r in case(reports, "fit"))


def test_sparse_gradients_under_train_on_batch_and_a_custom_loop(reports):
    for rank, r in enumerate(case(reports, "sparse")):
        assert r["embedding_gradient_type"] == "IndexedSlices"
        assert r["train_on_batch"] <= 1e-5 and r["custom_loop"] <= 1e-5, (rank, r)


def test_loss_scale_optimizer_inside_the_distributed_one(reports):
    for rank, r in enumerate(case(reports, "loss_scale")):
        assert r["is_loss_scale_optimizer"] and r["scale"] > 1, (rank, r)
        assert r["weights"] <= 1e-4, (rank, r)


def test_interrupted_fit_resumed_by_backup_and_restore_equals_an_uninterrupted_one(reports):
    for rank, r in enumerate(case(reports, "resume")):
        assert r["interrupted"] == "injected interruption" and r["had_backup"], (rank, r)
        assert r["iterations"][0] == r["iterations"][1], (rank, r)
        assert r["weights"] <= 1e-6, (rank, r)


def test_a_fit_interrupted_mid_epoch_resumes_equal_on_every_rank(reports):
    """dist_bn.keras.callbacks.BackupAndRestore: rank 0 alone backs up (every batch);
    on resume every rank gets its state and skips the 2 batches already trained."""
    for rank, r in enumerate(case(reports, "resume_mid_epoch")):
        assert r["interrupted"] == "injected interruption", (rank, r)
        if rank == 0:
            assert r["metadata"]["epoch"] == 1 and r["metadata"]["batches_done"] == 2, r["metadata"]
        else:
            assert r["metadata"] is None, (rank, r["metadata"])  # nothing written off rank 0
        assert r["ranks_agree"] and r["iterations"][0] == r["iterations"][1], (rank, r)
        assert r["weights"] <= 1e-6, (rank, r)
        assert not r["backup_left"], rank  # deleted at the end of the resumed fit


def test_learning_rate_warmup_and_rank_zero_helpers(reports):
    for rank, r in enumerate(case(reports, "warmup")):
        size, lr, steps = len(reports), r["scaled"], 3
        assert lr == pytest.approx(0.05 * size)
        expected = [lr / size * ((e + b / steps) * (size - 1) / 2 + 1) for e in range(2)
                    for b in range(steps)]
        assert r["rates"][:6] == pytest.approx(expected, rel=1e-6), rank
        assert r["rates"][6:] == pytest.approx([lr] * 3, rel=1e-6) and r["final"] == pytest.approx(lr)
        assert r["seed_states_differ"] and r["weights_agree"], rank
        assert r["root_only"] == (1 if rank == 0 else 0)
        assert r["root_verbose"] == (2 if rank == 0 else 0)
