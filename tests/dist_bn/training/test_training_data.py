"""dist_bn.training.data: determinism, balanced labels, motion-only classes, sharding."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import tensorflow as tf

from dist_bn.training import data
from dist_bn.training.schema import load_config

DATA = {"frames": 6, "height": 16, "width": 16, "num_classes": 4, "train_clips": 48, "eval_clips": 20, "seed": 3}


def make_config(tmp_path, **sections):
    """The default config (an empty file), with DATA and `sections` filled in."""
    (tmp_path / "empty.yaml").write_text("")
    config = load_config(tmp_path / "empty.yaml")
    config["data"].update(DATA)
    for section, values in sections.items():
        config[section].update(values)
    return config


def indices(dataset) -> list[int]:
    return [int(i) for i in dataset.as_numpy_iterator()]


def test_clip_shape_dtype_and_label():
    video, label = data.make_clip(5, DATA)
    assert video.shape == (6, 16, 16, 1) and video.dtype == tf.float32
    assert label.dtype == tf.int32 and int(label) == 5 % 4


def test_clip_is_a_function_of_seed_and_index():
    a, _ = data.make_clip(7, DATA)
    b, _ = data.make_clip(tf.constant(7, tf.int64), dict(DATA))
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    other_index, _ = data.make_clip(8, DATA)
    other_seed, _ = data.make_clip(7, {**DATA, "seed": 4})
    assert not np.allclose(a.numpy(), other_index.numpy())
    assert not np.allclose(a.numpy(), other_seed.numpy())


def test_labels_are_balanced():
    labels = [int(data.clip_label(i, 4)) for i in range(48)]
    assert np.bincount(labels).tolist() == [12, 12, 12, 12]


def brightest_pixel(frame):
    return np.unravel_index(np.argmax(frame), frame.shape)


def test_motion_reveals_the_class(monkeypatch):
    """Without noise the disc's centre moves in the label's direction
    (0 right, 1 up, 2 left, 3 down; rows grow downwards), wrapping around."""
    monkeypatch.setattr(data, "NOISE_STD", 0.0)
    expected = {0: (0, 1), 1: (-1, 0), 2: (0, -1), 3: (1, 0)}
    for index in range(16):
        video, label = data.make_clip(index, {**DATA, "height": 32, "width": 32})
        frames = video.numpy()[..., 0]
        start, end = brightest_pixel(frames[0]), brightest_pixel(frames[-1])
        step = [((e - s + 16) % 32) - 16 for s, e in zip(start, end)]  # torus difference
        dy, dx = expected[int(label)]
        moved = step[0] * dy + step[1] * dx
        across = abs(step[0] * dx) + abs(step[1] * dy)
        assert moved >= 3 and across <= 1, (index, int(label), step)


def test_single_frames_do_not_reveal_the_class(monkeypatch):
    """Where the disc is in any one frame is uniform whatever the class: the
    mean position per class and frame stays near the centre of the torus."""
    monkeypatch.setattr(data, "NOISE_STD", 0.0)
    clips = 400
    videos, labels = next(iter(tf.data.Dataset.range(clips).map(lambda i: data.make_clip(i, DATA)).batch(clips)))
    frames = videos.numpy()[..., 0].reshape(clips, DATA["frames"], -1)
    rows, cols = np.unravel_index(np.argmax(frames, axis=-1), (DATA["height"], DATA["width"]))
    positions = np.stack([rows, cols], axis=-1).astype(np.float64)  # [clips, frames, 2]
    for label in range(4):
        mean = positions[labels.numpy() == label].mean(axis=0)
        # Uniform on 0..15: mean 7.5, std of a mean over 100 clips ~ 0.46.
        assert np.all(np.abs(mean - 7.5) < 2.0), (label, mean)


def test_steps_per_epoch_drops_the_partial_global_batch():
    assert data.steps_per_epoch(DATA, batch_size=4, world_size=3) == 4  # 48 // 12
    assert data.steps_per_epoch(DATA, batch_size=5, world_size=3) == 3  # 48 // 15
    assert data.steps_per_epoch(DATA, batch_size=50, world_size=1) == 0


@pytest.mark.parametrize("world_size,batch_size", [(1, 8), (2, 4), (3, 5), (4, 2)])
def test_train_shards_are_disjoint_and_cover_each_global_batch(tmp_path, world_size, batch_size):
    config = make_config(tmp_path, train={"batch_size": batch_size, "seed": 1})
    steps = data.steps_per_epoch(config["data"], batch_size, world_size)
    order = data.epoch_order(48, 1, 2).numpy().tolist()
    shards = [indices(data.train_indices(config, 2, r, world_size)) for r in range(world_size)]
    assert all(len(s) == steps * batch_size for s in shards)  # same number of steps on every rank
    for t in range(steps):
        parts = [s[t * batch_size:(t + 1) * batch_size] for s in shards]
        flat = [i for p in parts for i in p]
        assert len(set(flat)) == len(flat)  # disjoint
        global_batch = order[t * batch_size * world_size:(t + 1) * batch_size * world_size]
        assert sorted(flat) == sorted(global_batch)  # together: the global batch


def test_global_batches_do_not_depend_on_the_number_of_ranks(tmp_path):
    """4 ranks x 2 clips train on the same 8 clips per step as 1 process x 8."""
    one = make_config(tmp_path, train={"batch_size": 8})
    four = make_config(tmp_path, train={"batch_size": 2})
    single = indices(data.train_indices(one, 1, 0, 1))
    shards = [indices(data.train_indices(four, 1, r, 4)) for r in range(4)]
    for t in range(len(single) // 8):
        step_four = sorted(i for s in shards for i in s[2 * t:2 * t + 2])
        assert step_four == sorted(single[8 * t:8 * t + 8])


def test_epoch_order_depends_on_seed_and_epoch_only(tmp_path):
    config = make_config(tmp_path, train={"batch_size": 4, "seed": 5})
    first = indices(data.train_indices(config, 3, 0, 2))
    assert indices(data.train_indices(copy.deepcopy(config), 3, 0, 2)) == first  # e.g. after resuming
    assert indices(data.train_indices(config, 4, 0, 2)) != first
    assert sorted(data.epoch_order(48, 5, 3).numpy().tolist()) == list(range(48))


def test_train_dataset_batches(tmp_path):
    config = make_config(tmp_path, train={"batch_size": 4})
    batches = list(data.train_dataset(config, 1, 1, 2))
    assert len(batches) == 6
    clips, labels = batches[0]
    assert clips.shape == (4, 6, 16, 16, 1) and labels.shape == (4,)
    first = indices(data.train_indices(config, 1, 1, 2))[0]
    video, label = data.make_clip(first, config["data"])
    np.testing.assert_array_equal(clips[0].numpy(), video.numpy())
    assert int(labels[0]) == int(label)


@pytest.mark.parametrize("world_size", [1, 3, 25])
def test_eval_shards_are_disjoint_cover_the_split_and_skip_training_clips(tmp_path, world_size):
    config = make_config(tmp_path, train={"batch_size": 2})
    shards = [indices(data.eval_shard(config["data"], r, world_size)) for r in range(world_size)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(48, 68))  # each eval clip exactly once, none from training
    for rank, shard in enumerate(shards):
        assert len(shard) == data.eval_shard_size(config["data"], rank, world_size)
        if world_size > 3 and rank not in (0, world_size - 1):
            continue  # rank 0 holds a clip, the last rank none: enough of 25
        batches = list(data.eval_dataset(config, rank, world_size))
        assert len(batches) == data.eval_batches(config, rank, world_size)
        assert sum(int(b[1].shape[0]) for b in batches) == len(shard)


def test_eval_shards_mix_classes(tmp_path):
    """Labels follow the index, so the eval order is shuffled before sharding:
    with 4 ranks and 4 classes no rank may end up with a single class."""
    config = make_config(tmp_path)
    for rank in range(4):
        shard = indices(data.eval_shard(config["data"], rank, 4))
        assert len({i % 4 for i in shard}) > 1
