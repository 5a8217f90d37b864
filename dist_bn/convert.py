"""Model rewriting at any nesting depth, and the BN conversions built on it.

Keras 3.8's `clone_model(recursive=True)` recurses one level only (its inner
call drops `recursive`), so a BatchNormalization in a model inside a model
inside a model stayed as it was, silently. `rewrite_model` does the
recursion itself: every Sequential or functional model met at any depth is
rebuilt from rewritten layers (the layer inside a TimeDistributed too), a
layer shared by several models stays shared,
and weights are copied layer by layer (not by the order of the whole model's
weight list, which a replacement may change). Layers it cannot reach, a BN
inside a custom layer or a subclassed model, are found by `unreachable` so
that callers refuse them instead of skipping them.

`convert_sync_batchnorm` and `revert_sync_batchnorm` swap Keras's
BatchNormalization for ours and back; `dist_bn.folding` folds BN into the
layer before it with the same mechanism.
"""
import logging
import warnings

import keras
from keras.src.models.functional import Functional

from dist_bn.layer import SyncBatchNormalization

logger = logging.getLogger("dist_bn")


def is_rebuildable(layer):
    """True for the models `rewrite_model` rebuilds: Sequential and functional."""
    return isinstance(layer, (keras.Sequential, Functional))


def _is_time_distributed(layer):
    return type(layer) is keras.layers.TimeDistributed


def _sublayers(layer):
    return layer._flatten_layers(include_self=False, recursive=False)


def walk(model, prefix=None):
    """(path, layer) for every layer of `model` at any depth, depth first.

    Paths are layer names joined by '/' from `model` down, e.g.
    'classifier/backbone/block1/bn'; a shared layer is listed once.
    """
    seen = set()

    def visit(layer, path):
        for sub in _sublayers(layer):
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            sub_path = f"{path}/{sub.name}"
            yield sub_path, sub
            yield from visit(sub, sub_path)

    yield from visit(model, prefix or model.name)


def unreachable(model, is_target):
    """Paths of layers matching `is_target` that `rewrite_model` cannot replace:
    those inside a layer that is not a Sequential or functional model (a
    custom layer holding a BN, a subclassed model), with that container."""
    found = []

    def visit(layer, path):
        for sub in _sublayers(layer):
            sub_path = f"{path}/{sub.name}"
            if is_target(sub):
                continue
            if is_rebuildable(sub):
                visit(sub, sub_path)
                continue
            if _is_time_distributed(sub):
                if not is_target(sub.layer):
                    visit(sub, sub_path)
                continue
            hidden = [p for p, inner in walk(sub, sub_path) if is_target(inner)]
            found.extend(f"{p} (inside {type(sub).__name__} {sub_path})" for p in hidden)

    if is_target(model) or not is_rebuildable(model):
        hidden = [p for p, inner in walk(model) if is_target(inner)]
        return [f"{p} (inside {type(model).__name__} {model.name})" for p in hidden]
    visit(model, model.name)
    return found


def clone_layer(layer):
    """A fresh layer with `layer`'s config (no weights), as `clone_model` makes."""
    try:
        return layer.__class__.from_config(layer.get_config())
    except Exception as err:  # Keras raises many kinds here; say which layer
        raise ValueError(
            f"cannot clone layer {layer.name!r} ({type(layer).__name__}) from its config: {err}. "
            "Give the layer a get_config that from_config accepts."
        ) from err


def rewrite_model(model, replace, drop=(), weights=None):
    """A copy of a Sequential or functional `model`, rewritten at any depth.

    Args:
        model: the model; it is not changed.
        replace: `replace(layer, path)` returns a new (unbuilt) layer to stand
            for `layer`, or None to copy it unchanged.
        drop: layers removed from the graph: each call of one returns its
            first input (e.g. a BN folded into the layer before it).
        weights: `weights(old, new)` gives the weight list for a replaced
            layer; by default it is the old layer's (`get_weights()`).

    Returns:
        (new model, [(path, old layer, new layer) for each replacement]).
    """
    if not is_rebuildable(model):
        raise ValueError(
            f"{model.name!r} is a {type(model).__name__}, not a Sequential or functional model: "
            "Keras cannot rebuild subclassed models; change their layers in their code."
        )
    dropped = {id(layer) for layer in drop}
    clones = {}  # id(old) -> new, so that shared layers stay shared
    copies = []  # (old, new, replaced) for every leaf layer, to copy weights into
    replaced = []

    def rebuild_layer(layer, path):
        if id(layer) in clones:
            return clones[id(layer)]
        if is_rebuildable(layer):
            new = rebuild_model(layer, path)
        elif _is_time_distributed(layer):  # the wrapped layer is rewritten like any other
            config = layer.get_config()
            config.pop("layer")
            new = layer.__class__(rebuild_layer(layer.layer, f"{path}/{layer.layer.name}"), **config)
        else:
            new = replace(layer, path)
            if new is not None:
                replaced.append((path, layer, new))
            copies.append((layer, new if new is not None else clone_layer(layer), new is not None))
            new = copies[-1][1]
        clones[id(layer)] = new
        return new

    def rebuild_model(sub, path):
        if isinstance(sub, keras.Sequential):
            layers = [rebuild_layer(layer, f"{path}/{layer.name}") for layer in sub.layers
                      if id(layer) not in dropped]
            first = sub._layers[0] if sub._layers else None
            if isinstance(first, keras.layers.InputLayer):
                layers.insert(0, keras.Input(batch_shape=first.batch_shape, dtype=first._dtype,
                                             name=first.name))
            new = keras.Sequential(layers, name=sub.name)
        else:
            def clone_function(layer):
                if id(layer) in dropped:
                    return layer  # never called: call_function skips it
                return rebuild_layer(layer, f"{path}/{layer.name}")

            def call_function(layer, *args, **kwargs):
                if id(layer) in dropped:
                    return args[0]
                return layer(*args, **kwargs)

            new = keras.models.clone_model(sub, clone_function=clone_function,
                                           call_function=call_function if dropped else None)
        new.trainable = sub.trainable
        return new

    new_model = rebuild_model(model, model.name)
    for old, new, was_replaced in copies:
        values = weights(old, new) if (was_replaced and weights is not None) else old.get_weights()
        if values:
            new.set_weights(values)
    return new_model, replaced


def _log_replaced(what, replaced):
    paths = [path for path, _, _ in replaced]
    logger.info("%s: %d layer(s)%s%s", what, len(paths), ": " if paths else "", ", ".join(paths))


def _is_keras_bn(layer):
    return type(layer) is keras.layers.BatchNormalization


def _is_sync_bn(layer):
    return isinstance(layer, SyncBatchNormalization)


def batchnorm_paths(model):
    """Paths of every BatchNormalization (ours included) in `model`, any depth."""
    return [path for path, layer in walk(model) if isinstance(layer, keras.layers.BatchNormalization)]


def _swap_bn(model, is_target, make, what, function):
    hidden = unreachable(model, is_target)
    if hidden:
        raise ValueError(
            f"{function}: {len(hidden)} layer(s) cannot be reached by rebuilding the model, "
            f"so they would stay as they are: {'; '.join(hidden)}. Use the layer you want "
            "directly in that layer's or model's code."
        )
    new_model, replaced = rewrite_model(
        model, lambda layer, path: make(layer) if is_target(layer) else None)
    _log_replaced(what, replaced)
    if not replaced:
        warnings.warn(f"{function}: {model.name!r} has no layer to convert; returning an unchanged copy",
                      stacklevel=3)
    left = [path for path, layer in walk(new_model) if is_target(layer)]
    if left:  # rewrite_model reached every layer; this guards that promise
        raise RuntimeError(f"{function}: layers left unconverted: {', '.join(left)}")
    return new_model


def convert_sync_batchnorm(model, process_set=None, unbiased_moving_variance=False):
    """A copy of a Keras model with every BatchNormalization made synchronized.

    Works on Sequential and functional models nested to any depth: each
    `keras.layers.BatchNormalization` becomes a `SyncBatchNormalization` with
    the same config and weights (moving statistics included); every other
    layer is copied with its weights; the original model is not changed.
    How many layers were converted, and their paths, are logged to the
    'dist_bn' logger (INFO); a model with none gives a warning. A BN that
    cannot be reached (inside a custom layer or a subclassed model) is an
    error naming it, never left unsynchronized silently; build those with
    SyncBatchNormalization directly.
    """

    def make(layer):
        config = layer.get_config()
        config.pop("synchronized", None)
        return SyncBatchNormalization(**config, process_set=process_set,
                                      unbiased_moving_variance=unbiased_moving_variance)

    return _swap_bn(model, _is_keras_bn, make, "convert_sync_batchnorm: converted to SyncBatchNormalization",
                    "convert_sync_batchnorm")


def revert_sync_batchnorm(model):
    """A copy of `model` with every SyncBatchNormalization made a plain
    `keras.layers.BatchNormalization` with the same weights, at any depth.

    The result needs neither dist_bn nor Horovod, computes the same in
    inference, and trains with per-process statistics: what an exported or
    single-device model wants. Counts and errors as `convert_sync_batchnorm`.
    """

    def make(layer):
        config = layer.get_config()
        config.pop("process_set", None)
        config.pop("unbiased_moving_variance", None)
        return keras.layers.BatchNormalization(**config)

    return _swap_bn(model, _is_sync_bn, make, "revert_sync_batchnorm: reverted to BatchNormalization",
                    "revert_sync_batchnorm")
