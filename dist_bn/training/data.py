"""A synthetic video-clip data set whose class only motion reveals.

Each clip is `frames x height x width x 1` float32: a bright antialiased disc
on Gaussian noise, moving in a straight line at constant speed and wrapping
around the frame edges (a torus). The class is the direction of motion, one
of `num_classes` evenly spaced angles (4 classes: right, up, left, down).
Because the disc starts at a uniformly random position and wraps around,
its position in every single frame is uniform whatever the class, and its
size, brightness and the noise are drawn independently of the class: no
single frame says anything about the label, so a model has to compare frames
over time (a Conv3D's temporal kernel does; a per-frame 2D model cannot beat
chance).

Clip `i` is generated on the fly, with TensorFlow's stateless random ops,
from the pair (data.seed, i) alone: every rank, every epoch and every resumed
run sees exactly the same clip for the same index, and nothing is downloaded
or stored. Labels are `i % num_classes`, so classes are balanced exactly.
Indices [0, train_clips) form the training split and
[train_clips, train_clips + eval_clips) the held-out evaluation split.

Sharding follows the global batch: every epoch the training indices are
permuted with a seed made of (train.seed, epoch), identically on every rank;
global batch `t` is positions [t*B*W, (t+1)*B*W) of that permutation (B clips
per rank, W ranks), and rank r takes every W-th of them starting at r
(`Dataset.shard(W, r)`). So the ranks' parts are disjoint, they cover the
global batch, and the global batches do not depend on how many ranks share
them (4 ranks x 2 clips see the same 8 clips per step as 1 process x 8).
A resumed run replays the same order because the permutation depends only on
the epoch. The last `train_clips % (B*W)` clips of each epoch's permutation
are dropped, so every rank runs the same number of full steps (a rank with
one step fewer would leave the others waiting in a collective forever).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import tensorflow as tf

# Appearance of a clip, the same for every class (see the module docstring).
NOISE_STD = 0.3            # std of the per-pixel Gaussian background noise
BRIGHTNESS = (0.6, 1.2)    # disc intensity above the background
RADIUS = (0.06, 0.12)      # disc radius, as a fraction of min(height, width)
MIN_RADIUS = 1.2           # pixels: a disc never shrinks below this
SPEED = (0.75, 1.5)        # pixels per frame, times max(1, min(height, width) / 32)

# Eval batches hold at least this many clips: inference needs no batch
# statistics, so a bigger batch only makes evaluation faster.
MIN_EVAL_BATCH = 16


def clip_label(index: tf.Tensor | int, num_classes: int) -> tf.Tensor:
    """The class of clip `index`: its direction of motion, `index % num_classes`."""
    return tf.cast(tf.math.floormod(tf.cast(index, tf.int64), num_classes), tf.int32)


def make_clip(index: tf.Tensor | int, data: Mapping[str, Any]) -> tuple[tf.Tensor, tf.Tensor]:
    """(video, label) of clip `index`: video [frames, height, width, 1] float32,
    label an int32 scalar. A pure function of (data.seed, index) and the shape keys."""
    frames, height, width, num_classes = data["frames"], data["height"], data["width"], data["num_classes"]
    index = tf.cast(index, tf.int64)
    seeds = tf.random.experimental.stateless_split(
        tf.stack([tf.constant(data["seed"], tf.int64), index]), num=2)
    u = tf.random.stateless_uniform([6], seed=seeds[0], alg="philox")
    noise = tf.random.stateless_normal([frames, height, width], seed=seeds[1], alg="philox")

    label = clip_label(index, num_classes)
    size = float(min(height, width))
    angle = 2.0 * math.pi * tf.cast(label, tf.float32) / num_classes
    speed = (SPEED[0] + (SPEED[1] - SPEED[0]) * u[0]) * max(1.0, size / 32.0)
    radius = tf.maximum(MIN_RADIUS, (RADIUS[0] + (RADIUS[1] - RADIUS[0]) * u[1]) * size)
    brightness = BRIGHTNESS[0] + (BRIGHTNESS[1] - BRIGHTNESS[0]) * u[2]
    start_y, start_x = u[3] * height, u[4] * width

    # Centre per frame; image rows grow downwards, so "up" is -y.
    t = tf.range(frames, dtype=tf.float32)
    centre_y = start_y - speed * tf.sin(angle) * t  # [frames]
    centre_x = start_x + speed * tf.cos(angle) * t

    def torus_distance(coords, centre, period):
        d = tf.math.floormod(coords[tf.newaxis, :] - centre[:, tf.newaxis], period)
        return tf.minimum(d, period - d)  # [frames, period]

    dy = torus_distance(tf.range(height, dtype=tf.float32) + 0.5, centre_y, float(height))
    dx = torus_distance(tf.range(width, dtype=tf.float32) + 0.5, centre_x, float(width))
    distance = tf.sqrt(dy[:, :, tf.newaxis] ** 2 + dx[:, tf.newaxis, :] ** 2)
    disc = tf.clip_by_value(radius + 0.5 - distance, 0.0, 1.0)  # 1 inside, antialiased edge
    video = brightness * disc + NOISE_STD * noise
    return video[..., tf.newaxis], label


def steps_per_epoch(data: Mapping[str, Any], batch_size: int, world_size: int) -> int:
    """Full global batches per epoch; the same on every rank."""
    return data["train_clips"] // (batch_size * world_size)


def epoch_order(train_clips: int, train_seed: int, epoch: int | tf.Tensor) -> tf.Tensor:
    """The permutation of training indices for `epoch`, identical on every rank."""
    seed = tf.stack([tf.constant(train_seed, tf.int64), tf.cast(epoch, tf.int64)])
    return tf.random.experimental.stateless_shuffle(tf.range(train_clips, dtype=tf.int64), seed=seed)


def _generate(indices: tf.data.Dataset, data: Mapping[str, Any], batch_size: int,
              drop_remainder: bool) -> tf.data.Dataset:
    return (indices
            .map(lambda i: make_clip(i, data), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .batch(batch_size, drop_remainder=drop_remainder)
            .prefetch(tf.data.AUTOTUNE))


def train_indices(config: Mapping[str, Any], epoch: int, rank: int, world_size: int) -> tf.data.Dataset:
    """The clip indices `rank` trains on in `epoch`, in order (see the module docstring)."""
    data, train = config["data"], config["train"]
    steps = steps_per_epoch(data, train["batch_size"], world_size)
    order = epoch_order(data["train_clips"], train["seed"], epoch)
    return (tf.data.Dataset.from_tensor_slices(order[: steps * train["batch_size"] * world_size])
            .shard(world_size, rank))


def train_dataset(config: Mapping[str, Any], epoch: int, rank: int, world_size: int,
                  last_epoch: int | None = None) -> tf.data.Dataset:
    """This rank's batches of (videos [B, F, H, W, 1], labels [B]) for `epoch`
    (1-based), or for epochs `epoch`..`last_epoch` one after the other (what
    `fit` iterates from `initial_epoch` on): exactly `steps_per_epoch`
    batches of train.batch_size clips per epoch."""
    if last_epoch is None:
        indices = train_indices(config, epoch, rank, world_size)
    else:
        indices = tf.data.Dataset.range(epoch, last_epoch + 1).flat_map(
            lambda e: train_indices(config, e, rank, world_size))
    return _generate(indices, config["data"], config["train"]["batch_size"], drop_remainder=True)


def eval_indices(data: Mapping[str, Any]) -> tf.Tensor:
    """The evaluation split's indices, in a fixed order mixed by data.seed, so
    that a rank's shard holds every class (labels follow the index)."""
    indices = tf.range(data["train_clips"], data["train_clips"] + data["eval_clips"], dtype=tf.int64)
    return tf.random.experimental.stateless_shuffle(indices, seed=tf.constant([data["seed"], -1], tf.int64))


def eval_batch_size(config: Mapping[str, Any]) -> int:
    return max(config["train"]["batch_size"], MIN_EVAL_BATCH)


def eval_shard(data: Mapping[str, Any], rank: int, world_size: int) -> tf.data.Dataset:
    """The evaluation clip indices of `rank`: every world_size-th from `rank` on."""
    return tf.data.Dataset.from_tensor_slices(eval_indices(data)).shard(world_size, rank)


def eval_dataset(config: Mapping[str, Any], rank: int, world_size: int) -> tf.data.Dataset:
    """This rank's share of the evaluation split, all of it kept (the last
    batch may be short, or absent when there are more ranks than clips), so
    the shards together hold each evaluation clip exactly once."""
    data = config["data"]
    return _generate(eval_shard(data, rank, world_size), data, eval_batch_size(config), drop_remainder=False)


def eval_shard_size(data: Mapping[str, Any], rank: int, world_size: int) -> int:
    """How many evaluation clips `rank` holds (they differ by at most one)."""
    return len(range(rank, data["eval_clips"], world_size))


def eval_batches(config: Mapping[str, Any], rank: int, world_size: int) -> int:
    """How many batches `eval_dataset` yields on `rank`."""
    return -(-eval_shard_size(config["data"], rank, world_size) // eval_batch_size(config))
