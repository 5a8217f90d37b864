"""The classifier: a small C3D/R3D-style 3D convolutional network.

`depth` blocks of Conv3D (3x3x3, 'same') -> batch norm -> ReLU, with
`width * 2**i` channels in block i and 1x2x2 max pooling (space only, time is
kept) between blocks, then global average pooling and a Dense layer giving
`num_classes` logits. Channels-last (NDHWC), a functional Keras model.

`model.bn` picks the batch norm, the only thing the three variants differ in:
  sync   dist_bn.SyncBatchNormalization: statistics over every rank's clips
  local  keras.layers.BatchNormalization: statistics over this rank's clips
  none   no batch norm; the convolutions get a bias instead
(a convolution followed by batch norm has no bias: BN's beta replaces it).
Under a mixed precision policy the logits are float32 all the same, so the
loss and the softmax are computed in float32.
"""
from __future__ import annotations

from typing import Any, Mapping

import keras

from dist_bn import SyncBatchNormalization

BN_LAYERS = {"sync": SyncBatchNormalization, "local": keras.layers.BatchNormalization}
# Float32 copies of a block's output a training step holds at once: the
# convolution's, BN's and ReLU's outputs kept for the backward pass, their
# gradients, and BN's and the pooling's temporaries (measured roughly on CPU).
TENSORS_PER_BLOCK = 8
# Copies of a clip while it is generated and batched (tf.data prefetching).
INPUT_COPIES = 8


def batch_norm(kind: str, momentum: float, name: str) -> keras.layers.Layer | None:
    """The batch-norm layer for `model.bn` = kind, or None for 'none'."""
    if kind == "none":
        return None
    try:
        layer = BN_LAYERS[kind]
    except KeyError:
        raise ValueError(f"model.bn must be one of sync, local, none; got {kind!r}") from None
    return layer(momentum=momentum, name=name)


def training_step_bytes(model: Mapping[str, Any], data: Mapping[str, Any], batch_size: int) -> int:
    """A rough estimate of the memory one training step needs on a rank: the
    blocks' activations (`TENSORS_PER_BLOCK` float32 copies of each block's
    output) and the generated clips, for `batch_size` clips. Used to refuse a
    config that cannot fit before building anything (see `loop`)."""
    height, width = data["height"], data["width"]
    per_frame = INPUT_COPIES * height * width
    for i in range(model["depth"]):
        if i > 0:  # 1x2x2 max pooling, padding 'same'
            height, width = -(-height // 2), -(-width // 2)
        per_frame += TENSORS_PER_BLOCK * height * width * model["width"] * 2**i
    return 4 * batch_size * data["frames"] * per_frame


def build_model(model: Mapping[str, Any], data: Mapping[str, Any]) -> keras.Model:
    """The classifier for the `model` and `data` config sections. Layers are
    created under the current dtype policy (set it before for mixed precision)."""
    inputs = keras.Input(shape=(data["frames"], data["height"], data["width"], 1), name="clips")
    x = inputs
    for i in range(model["depth"]):
        if i > 0:
            x = keras.layers.MaxPooling3D(pool_size=(1, 2, 2), padding="same", name=f"pool{i}")(x)
        bn = batch_norm(model["bn"], model["momentum"], name=f"bn{i + 1}")
        x = keras.layers.Conv3D(model["width"] * 2**i, 3, padding="same", use_bias=bn is None,
                                name=f"conv{i + 1}")(x)
        if bn is not None:
            x = bn(x)
        x = keras.layers.ReLU(name=f"relu{i + 1}")(x)
    x = keras.layers.GlobalAveragePooling3D(name="pool")(x)
    outputs = keras.layers.Dense(data["num_classes"], dtype="float32", name="logits")(x)
    return keras.Model(inputs, outputs, name=f"c3d_{model['bn']}")
