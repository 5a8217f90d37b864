"""The cases dist-bn-verify and the multi-rank tests run, their data and their tolerances.

Pure Python and NumPy: no Horovod, no TensorFlow. A case is one batch-norm
configuration; its global batches are the same on every rank (seeded by the
case's name), and each rank keeps the slice `batch_sizes` gives it.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Sequence

import numpy as np

from dist_bn import reference

STEPS = 3
MOMENTUM = 0.9
EPSILON = 1e-3


class UsageError(ValueError):
    """A bad choice of cases, dtypes or process sets, reported in one line (exit code 2)."""


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

    @property
    def dtype_label(self) -> str:
        """float32, float16 or bfloat16: the name the command line and its table use."""
        return DTYPE_ALIASES.get(self.dtype, self.dtype)

    def as_dict(self) -> dict:
        """Plain data (JSON, allgather_object); `from_dict` gives the case back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> "Case":
        return cls(**{**fields, "sample_shape": tuple(fields["sample_shape"])})


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


def dtype_name(text: str) -> str:
    """float32, float16 or bfloat16 for a name or alias the command line accepts."""
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
    rng = np.random.RandomState(zlib.crc32(case.name.encode()))
    shift = reference.per_channel(np.arange(case.channels), len(case.sample_shape) + 1, case.axis)
    batches = [
        (case.offset * (1 + shift) + (1 + 0.5 * shift) * rng.randn(total, *case.sample_shape) + shift)
        for _ in range(steps)
    ]
    if case.dtype == "mixed_float16":
        batches = [b.astype(np.float16) for b in batches]
    elif case.dtype == "mixed_bfloat16":
        batches = [round_to_bfloat16(b) for b in batches]
    else:
        batches = [b.astype(np.float32) for b in batches]
    dy = rng.randn(total, *case.sample_shape).astype(np.float32)
    return batches, dy


def round_to_bfloat16(x):
    """float32 array of the bfloat16 values nearest to x (round to nearest even)."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


# Worst error allowed per metric, relative to the largest reference value
# (`dist_bn.verify.judge.scaled_error`).
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
# Against Keras's own layer on the whole batch (the tests' second reference):
# at a 1e3 offset Keras's float32 layer is the less accurate of the two.
KERAS_OFFSET = dict(OFFSET, y=2e-3, dx=5e-4, dgamma=5e-3, moving_variance=1e-4)


def tolerances(case: Case) -> dict[str, float]:
    """The tolerances of `case`'s metrics against the float64 reference."""
    if case.dtype == "mixed_float16":
        return FLOAT16
    if case.dtype == "mixed_bfloat16":
        return BFLOAT16
    return OFFSET if case.offset else FLOAT32


def keras_tolerances(case: Case) -> dict[str, float]:
    """The tolerances of `case`'s metrics against keras.layers.BatchNormalization."""
    return KERAS_OFFSET if case.offset and case.dtype == "float32" else tolerances(case)


def describe_catalog() -> str:
    """The catalog and the tolerances, as `dist-bn-verify --list` prints them."""
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
