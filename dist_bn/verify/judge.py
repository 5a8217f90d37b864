"""Judging what every rank measured, and the table rank 0 prints. Pure: plain data in and out.

A case's result (`dist_bn.verify.run.run_case`) carries its case, errors per
metric against each reference and boolean checks. `judge_results` turns every
rank's results into table rows and failure lines; the command line and the
multi-rank tests (tests/dist_bn/test_mpirun.py) both judge with it.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from dist_bn.verify.cases import SYNC_MOMENTS, Case, keras_tolerances, tolerances

TRAINING_METRICS = ("y", "dx", "dgamma", "dbeta", "moving_mean", "moving_variance")
CHECKS = {
    "count_exact": "global count differs from the reference",
    "moving_bitwise_equal_across_ranks": "moving statistics differ between ranks of the set",
    "inference_leaves_moving_unchanged": "inference changed the moving statistics",
}


def scaled_error(actual, expected) -> float:
    """max |actual - expected| relative to the largest |expected| (or 1 if that is < 1)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if expected.size == 0:
        return 0.0 if actual.size == 0 else float("inf")
    if actual.shape != expected.shape or not np.all(np.isfinite(actual)):
        return float("inf")
    return float(np.max(np.abs(actual - expected)) / max(1.0, np.max(np.abs(expected))))


def training_errors(ours, theirs, lo, hi):
    """scaled_error per TRAINING_METRICS; y and dx of `theirs` cover the whole
    global batch, of which this rank holds rows lo:hi."""
    errors = {}
    for metric, actual, expected in zip(TRAINING_METRICS, ours, theirs):
        errors[metric] = scaled_error(actual, expected[lo:hi] if metric in ("y", "dx") else expected)
    return errors


@dataclasses.dataclass(frozen=True)
class Result:
    """What one rank measured for one case under one process-set layout."""

    layout: str
    dtype: str
    case: str
    data: dict


@dataclasses.dataclass
class Row:
    layout: str
    dtype: str
    case: str
    worst: str  # metric and rank of the worst error, or the failed check
    error: float | None
    tolerance: float | None
    passed: bool


def judge_case(layout: str, dtype: str, case: str, per_rank: Sequence[tuple[int, dict]],
               limits: dict[str, float], scale: float = 1.0,
               keras_limits: dict[str, float] | None = None) -> tuple[Row, list[str]]:
    """One table row from every rank's result of a case, given as (rank,
    result) pairs, and the failures (each 'rank R metric: error > tolerance'
    or a failed check). `limits` hold the statistics and the float64
    comparison, `keras_limits` the comparison with Keras's layer where the
    result has one. The row shows the error closest to its tolerance."""
    failures, worst = [], None
    judged = {"statistics": limits, "vs_numpy": limits, "vs_keras": keras_limits}
    for rank, result in per_rank:
        for reference, group_limits in judged.items():
            if group_limits is None:
                continue
            for metric, error in result.get(reference, {}).items():
                tol = group_limits[metric] * scale
                ratio = error / tol if tol > 0 else (0.0 if error == 0 else float("inf"))
                label = metric if reference != "vs_keras" else f"{metric} (vs Keras)"
                if worst is None or ratio > worst[0]:
                    worst = (ratio, f"{label} r{rank}", error, tol)
                if not error <= tol:
                    failures.append(f"rank {rank} {label}: {error:.3g} > {tol:.3g}")
        for key, message in CHECKS.items():
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


def judge_layer_case(layout: str, per_rank: Sequence[tuple[int, dict]], scale: float = 1.0):
    """`judge_case` for a result of `run_case`, with the tolerances of the case it carries."""
    case = Case.from_dict(per_rank[0][1]["case"])
    return judge_case(layout, case.dtype_label, case.name, per_rank, tolerances(case), scale,
                      keras_limits=keras_tolerances(case))


def judge_channel_mismatch(layout: str, per_rank: Sequence[tuple[int, dict]]) -> tuple[Row, list[str]]:
    """Every rank must have got the clear error for ranks whose channel counts differ."""
    bad = [r for r, res in per_rank if not (res["error"] and "differ across ranks" in res["error"])]
    row = Row(layout, "float32", "channel_mismatch",
              "error on every rank" if not bad else f"no clear error on ranks {bad}", None, None, not bad)
    return row, [f"rank {r}: no clear error for mismatched channels" for r in bad]


def judge_results(everyone: Sequence[Sequence[Result]], scale: float = 1.0) -> tuple[list[Row], list[str]]:
    """Rows and failure lines from every rank's results (the same cases in the
    same order on every rank), each failure prefixed by its layout, dtype and case."""
    rows, failures = [], []
    for i, first in enumerate(everyone[0]):
        per_rank = [(rank, results[i].data) for rank, results in enumerate(everyone)]
        if first.case == "channel_mismatch":
            row, problems = judge_channel_mismatch(first.layout, per_rank)
        elif first.case == "sync_moments":
            row, problems = judge_case(first.layout, first.dtype, first.case, per_rank, SYNC_MOMENTS, scale)
        else:
            row, problems = judge_layer_case(first.layout, per_rank, scale)
        rows.append(row)
        failures.extend(f"{first.layout} {first.dtype} {first.case}: {p}" for p in problems)
    return rows, failures


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
