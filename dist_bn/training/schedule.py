"""Learning rate: the per-rank base rate scaled by the number of ranks, reached
after a linear warmup.

Data parallelism with W ranks multiplies the global batch by W, so the rate
is multiplied by W too (the linear scaling rule of Goyal et al., 2017,
"Accurate, Large Minibatch SGD"); starting at that rate right away can
diverge, so it grows linearly over the first `warmup_epochs` epochs, from
peak / warmup_steps at the first step to the peak, and stays there.
"""
from __future__ import annotations

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="dist_bn")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """lr(step) = peak * min(1, (step + 1) / warmup_steps); `step` counts from 0.

    warmup_steps = 0 means no warmup (the peak from the first step).
    """

    def __init__(self, peak: float, warmup_steps: int):
        if peak <= 0:
            raise ValueError(f"peak learning rate must be > 0, got {peak}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        if self.warmup_steps == 0:
            return ops.convert_to_tensor(self.peak, "float32")
        step = ops.cast(step, "float32")
        fraction = ops.minimum(1.0, (step + 1.0) / float(self.warmup_steps))
        return self.peak * fraction

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps}


def make_schedule(train: dict, world_size: int, steps_per_epoch: int) -> WarmupSchedule:
    """The schedule for the `train` config section: peak = learning_rate x world
    size, warmup over ceil(warmup_epochs x steps_per_epoch) steps."""
    peak = train["learning_rate"] * world_size
    warmup_steps = int(math.ceil(train["warmup_epochs"] * steps_per_epoch - 1e-9))
    return WarmupSchedule(peak, max(0, warmup_steps))
