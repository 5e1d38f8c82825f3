"""Layer taps for Kronecker-factored curvature: each Dense/Conv2D layer's input and pre-activation.

K-FAC needs, for every factorable layer, its input ``a`` and its pre-activation output
``s = a W (+ b)`` inside the same forward pass that gives the model's outputs.
:func:`chain_taps` runs a Keras ``Sequential`` model or functional chain layer by layer
(each layer feeds the next) on given variable values: Dense and Conv2D layers whose
kernel is a parameter of interest are computed as ``activation(s)`` with ``s`` exposed;
every other layer runs as itself (``stateless_call``) and may not hold parameters of
interest.
"""
from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf


@dataclass
class Tap:
    """One factorable layer in a forward pass.

    ``kind``: "dense" or "conv2d"; ``a``: its input (batch, ..., d_in) or (batch, h, w, c);
    ``s``: its pre-activation output; ``kernel_block`` / ``bias_block``: indices into the
    model's ``blocks_`` (``bias_block`` None: no bias among the parameters); ``conv``: for
    Conv2D, ``(kh, kw, strides, dilations, padding)``; ``name``: the layer's name.
    """

    kind: str
    a: tf.Tensor
    s: tf.Tensor
    kernel_block: int
    bias_block: int | None
    name: str
    conv: tuple | None = None


def chain_layers(model) -> list:
    """The layers of a Sequential model or of a functional model that is a chain (each
    layer's input is the previous layer's output), in order; otherwise a ValueError."""
    import keras

    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if isinstance(model, keras.Sequential):
        return layers
    inputs = getattr(model, "inputs", None)
    if not inputs or len(inputs) != 1:
        raise ValueError("Kronecker-factored curvature needs a keras.Sequential model or a functional chain with "
                         "one input")
    prev = inputs[0]
    for layer in layers:
        try:
            ok = layer.input is prev
        except (AttributeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"Kronecker-factored curvature needs a chain of layers (each feeding the next); layer "
                             f"{layer.name!r} ({type(layer).__name__}) does not take the previous layer's output")
        prev = layer.output
    return layers


def chain_taps(model, trainable_values: list, non_trainable_values: list, x, block_of: dict, call_kwargs: dict):
    """``(outputs, taps)`` of a chain model on explicit variable values.

    ``trainable_values`` / ``non_trainable_values`` align with ``model.trainable_variables``
    / ``model.non_trainable_variables``; ``block_of`` maps ``id(variable)`` to its block
    index in theta for the variables that are parameters of interest.
    """
    import keras

    value = {id(v): t for v, t in zip(model.trainable_variables, trainable_values)}
    value.update({id(v): t for v, t in zip(model.non_trainable_variables, non_trainable_values)})
    taps = []
    inputs = getattr(model, "inputs", None)
    h = tf.cast(x, inputs[0].dtype) if inputs else x  # as the model's Input layer does
    for layer in chain_layers(model):
        ours = [v for v in layer.trainable_variables if id(v) in block_of]
        if ours and isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)) and type(layer) in (
                keras.layers.Dense, keras.layers.Conv2D):
            h = _factorable(layer, h, value, block_of, taps)
            continue
        if ours:
            raise ValueError(f"Kronecker-factored curvature covers Dense and Conv2D layers only: layer {layer.name!r} "
                             f"({type(layer).__name__}) has parameters of interest ({', '.join(v.path for v in ours)});"
                             f" leave it out of `trainable`, or use another solver")
        tv = [value[id(v)] for v in layer.trainable_variables]
        ntv = [value[id(v)] for v in layer.non_trainable_variables]
        h = layer.stateless_call(tv, ntv, h, **(call_kwargs if getattr(layer, "_call_has_training_arg", False)
                                                else {}))[0]
    return h, taps


def _factorable(layer, a, value, block_of, taps):
    import keras

    kernel = layer.kernel
    if id(kernel) not in block_of:
        raise ValueError(f"layer {layer.name!r}: its bias is a parameter of interest but its kernel is not; "
                         "Kronecker factors need the kernel")
    if getattr(layer, "lora_rank", None):
        raise ValueError(f"layer {layer.name!r} uses LoRA; Kronecker factors cover plain Dense/Conv2D kernels")
    K = value[id(kernel)]
    a = tf.cast(a, layer.compute_dtype)  # as the layer casts its input
    bias = getattr(layer, "bias", None)
    b = None if bias is None else value[id(bias)]
    bias_block = None if bias is None or id(bias) not in block_of else block_of[id(bias)]
    if isinstance(layer, keras.layers.Dense):
        s = tf.tensordot(a, K, axes=[[a.shape.rank - 1], [0]])
        conv = None
        kind = "dense"
    else:
        if layer.data_format != "channels_last" or layer.groups != 1:
            raise ValueError(f"layer {layer.name!r}: Kronecker factors need channels_last and groups=1")
        strides, dilations = tuple(layer.strides), tuple(layer.dilation_rate)
        padding = layer.padding.upper()
        s = tf.nn.conv2d(a, K, strides=strides, padding=padding, dilations=dilations)
        conv = (int(K.shape[0]), int(K.shape[1]), strides, dilations, padding)
        kind = "conv2d"
    if b is not None:
        s = s + b
    taps.append(Tap(kind, a, s, block_of[id(kernel)], bias_block, layer.name, conv))
    return layer.activation(s) if layer.activation is not None else s
