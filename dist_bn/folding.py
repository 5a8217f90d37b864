"""`fold_batchnorm`: inference-mode batch norm folded into the layer before it.

In inference a BN layer is a per-channel affine map with its moving
statistics, y = s * (z - mean) + beta with s = gamma / sqrt(var + eps). When
z = x W + b comes straight from a Conv1D/Conv2D/Conv3D/Dense whose output
nothing else reads, the two make one layer with kernel W * s (scaled along
its output channels) and bias s * (b - mean) + beta: one pass over the
activations instead of two, and no BN layer left to ship. The folded values
are computed in float64 and rounded once to the kernel's dtype.

A BN can be folded when, in its own (Sequential or functional) model, its
input is the only use of the output of such a layer, which is called once,
has no activation, and whose channel axis is the BN's axis. Any other BN
(after a pooling or an activation, the first layer of a nested model, a
shared layer, ...) is either an error naming it and why, or, with
`keep_unfoldable=True`, kept as a BN.
"""
import logging

import keras
import numpy as np

from dist_bn import convert

logger = logging.getLogger("dist_bn")

FOLDABLE = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D, keras.layers.Dense)


def folded_weights(kernel, bias, gamma, beta, moving_mean, moving_variance, epsilon):
    """(kernel, bias) of a layer followed by inference BN, as one layer.

    kernel's last axis is the output channel (Conv*D and Dense alike); bias
    may be None (a layer without one). Computed in float64, returned in the
    kernel's dtype.
    """
    dtype = kernel.dtype
    kernel, mean, variance = (np.asarray(a, np.float64) for a in (kernel, moving_mean, moving_variance))
    channels = kernel.shape[-1]
    gamma = np.ones(channels) if gamma is None else np.asarray(gamma, np.float64)
    beta = np.zeros(channels) if beta is None else np.asarray(beta, np.float64)
    bias = np.zeros(channels) if bias is None else np.asarray(bias, np.float64)
    scale = gamma / np.sqrt(variance + epsilon)
    return (kernel * scale).astype(dtype), ((bias - mean) * scale + beta).astype(dtype)


def _producer_problem(layer, bn_axis, ndim):
    """Why the BN after `layer` cannot be folded into it, or None if it can."""
    if type(layer) not in FOLDABLE:
        return f"follows {type(layer).__name__} {layer.name!r}, not Conv1D/Conv2D/Conv3D/Dense"
    activation = keras.activations.serialize(layer.activation)
    if activation not in ("linear", None):
        return f"follows {layer.name!r} whose activation {activation!r} comes between them"
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        return f"follows {layer.name!r}, which is LoRA-enabled or quantized"
    if isinstance(layer, keras.layers.Dense):
        channel_axis = ndim - 1
    else:
        channel_axis = 1 if layer.data_format == "channels_first" else ndim - 1
    if bn_axis % ndim != channel_axis:
        return (f"normalizes axis {bn_axis} but {layer.name!r} puts its channels on axis {channel_axis}")
    return None


def _bn_ndim(bn):
    spec = bn.input_spec
    return getattr(spec, "ndim", None) if spec is not None else None


def _pairs_in_sequential(model, path):
    """{id(bn): (bn, producer)} and {path: problem} for the BNs of a Sequential."""
    pairs, problems = {}, {}
    layers = model.layers
    for i, bn in enumerate(layers):
        if not isinstance(bn, keras.layers.BatchNormalization):
            continue
        bn_path = f"{path}/{bn.name}"
        ndim = _bn_ndim(bn)
        if i == 0:
            problems[bn_path] = f"is the first layer of {model.name!r}: its input comes from outside that model"
        elif ndim is None:
            problems[bn_path] = "is not built (call the model once, or give it an Input)"
        elif layers.count(bn) > 1 or layers.count(layers[i - 1]) > 1:
            problems[bn_path] = "is shared (it or the layer before it appears twice)"
        else:
            problem = _producer_problem(layers[i - 1], bn.axis, ndim)
            if problem:
                problems[bn_path] = problem
            else:
                pairs[id(bn)] = (bn, layers[i - 1])
    return pairs, problems


def _pairs_in_functional(model, path):
    """As `_pairs_in_sequential`, from the functional model's graph."""
    nodes = [node for depth in model._nodes_by_depth.values() for node in depth]
    node_ids = {id(node) for node in nodes}
    calls, readers = {}, {}
    for node in nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
        for tensor in node.input_tensors:
            readers[id(tensor)] = readers.get(id(tensor), 0) + 1
    for tensor in model.outputs:
        readers[id(tensor)] = readers.get(id(tensor), 0) + 1

    pairs, problems = {}, {}
    for node in nodes:
        bn = node.operation
        if not isinstance(bn, keras.layers.BatchNormalization) or id(bn) in pairs:
            continue
        bn_path = f"{path}/{bn.name}"
        inputs = node.input_tensors
        if calls[id(bn)] > 1:
            problems[bn_path] = f"is called {calls[id(bn)]} times in {model.name!r}"
            continue
        if len(inputs) != 1:
            problems[bn_path] = "does not take exactly one tensor input"
            continue
        producer, node_index, _ = inputs[0]._keras_history
        producer_node = producer._inbound_nodes[node_index]
        if producer_node.is_input or id(producer_node) not in node_ids:
            problems[bn_path] = f"reads an input of {model.name!r}: its input comes from outside that model"
        elif calls.get(id(producer), 0) > 1:
            problems[bn_path] = f"follows {producer.name!r}, which is called more than once"
        elif readers[id(inputs[0])] > 1:
            problems[bn_path] = f"follows {producer.name!r}, whose output is also used elsewhere"
        else:
            problem = _producer_problem(producer, bn.axis, len(inputs[0].shape))
            if problem:
                problems[bn_path] = problem
            else:
                pairs[id(bn)] = (bn, producer)
    return pairs, problems


def foldable(model):
    """({id(bn): (bn, producer)}, {bn path: why not}) for `model` at any depth."""
    pairs, problems = {}, {}

    def visit(sub, path):
        find = _pairs_in_sequential if isinstance(sub, keras.Sequential) else _pairs_in_functional
        found, why = find(sub, path)
        pairs.update(found)
        problems.update(why)
        for layer in sub.layers:
            if convert.is_rebuildable(layer):
                visit(layer, f"{path}/{layer.name}")

    visit(model, model.name)
    # Any other BN sits inside a layer (TimeDistributed, a custom layer), not in a model's graph.
    layers = dict(convert.walk(model))
    listed = {id(layers[path]) for path in problems if path in layers}
    for path, layer in layers.items():
        if isinstance(layer, keras.layers.BatchNormalization) and id(layer) not in {*pairs, *listed}:
            parent = path.rsplit("/", 1)[0]
            container = type(layers.get(parent, model)).__name__
            problems[path] = (f"is inside {container} {parent!r}, not directly in a Sequential or "
                              "functional model")
    return pairs, problems


def fold_batchnorm(model, keep_unfoldable=False):
    """A copy of `model` for inference with its BN layers folded away.

    Every BatchNormalization (SyncBatchNormalization included) that directly
    follows a Conv1D/Conv2D/Conv3D/Dense is folded into it (see the module
    docstring), at any nesting depth of Sequential and functional models.
    The copy computes what `model(x, training=False)` computes, to float32
    rounding, with fewer layers; it is meant for inference (training it
    would train without batch norm). Any other BN is a ValueError naming
    each one and why, unless `keep_unfoldable=True`, which keeps those as
    they are. The numbers folded and kept are logged to the 'dist_bn'
    logger (INFO).
    """
    if not convert.is_rebuildable(model):
        raise ValueError(f"fold_batchnorm: {model.name!r} is a {type(model).__name__}, not a Sequential "
                         "or functional model; Keras cannot rebuild subclassed models")
    pairs, problems = foldable(model)
    if problems and not keep_unfoldable:
        listed = "; ".join(f"{path} {why}" for path, why in problems.items())
        raise ValueError(
            f"fold_batchnorm: {len(problems)} BatchNormalization layer(s) cannot be folded: {listed}. "
            "Pass keep_unfoldable=True to keep them as BatchNormalization layers.")
    producers = {id(producer): bn for bn, producer in pairs.values()}

    def replace(layer, path):
        if id(layer) not in producers:
            return None
        config = layer.get_config()
        config["use_bias"] = True
        return layer.__class__.from_config(config)

    def weights(old, new):
        bn = producers[id(old)]
        kernel, bias = folded_weights(
            old.kernel.numpy(), old.bias.numpy() if old.use_bias else None,
            bn.gamma.numpy() if bn.scale else None, bn.beta.numpy() if bn.center else None,
            bn.moving_mean.numpy(), bn.moving_variance.numpy(), bn.epsilon)
        return [kernel, bias]

    folded, replaced = convert.rewrite_model(
        model, replace, drop=[bn for bn, _ in pairs.values()], weights=weights)
    logger.info("fold_batchnorm: folded %d BatchNormalization layer(s)%s%s; kept %d%s%s",
                len(replaced), ": " if replaced else "",
                ", ".join(f"{producers[id(old)].name} into {path}" for path, old, _ in replaced),
                len(problems), ": " if problems else "", ", ".join(problems))
    return folded
