"""dist_bn.training.schedule: scaling by world size and linear warmup."""
from __future__ import annotations

import keras
import pytest

from dist_bn.training.schedule import WarmupSchedule, make_schedule


def lr(schedule, step):
    return float(schedule(step))


def test_linear_warmup_then_constant():
    schedule = WarmupSchedule(0.4, warmup_steps=4)
    assert [lr(schedule, s) for s in range(6)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
    assert lr(schedule, 10_000) == pytest.approx(0.4)


def test_no_warmup():
    assert lr(WarmupSchedule(0.05, 0), 0) == pytest.approx(0.05)


@pytest.mark.parametrize("world,steps,warmup_epochs,peak,warmup_steps", [
    (1, 100, 1.0, 0.01, 100),
    (4, 100, 1.0, 0.04, 100),
    (8, 10, 2.5, 0.08, 25),
    (2, 7, 0.5, 0.02, 4),  # 3.5 steps -> 4
    (2, 7, 0.0, 0.02, 0),
])
def test_make_schedule_scales_by_world_size(world, steps, warmup_epochs, peak, warmup_steps):
    schedule = make_schedule({"learning_rate": 0.01, "warmup_epochs": warmup_epochs}, world, steps)
    assert schedule.peak == pytest.approx(peak)
    assert schedule.warmup_steps == warmup_steps
    assert lr(schedule, 10 * steps + warmup_steps) == pytest.approx(peak)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        WarmupSchedule(0.0, 1)
    with pytest.raises(ValueError):
        WarmupSchedule(0.1, -1)


def test_serializable_and_usable_by_optimizer():
    schedule = WarmupSchedule(0.3, 3)
    again = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    assert isinstance(again, WarmupSchedule) and again.get_config() == schedule.get_config()
    optimizer = keras.optimizers.SGD(learning_rate=schedule)
    assert float(optimizer.learning_rate) == pytest.approx(0.1)  # iterations = 0
