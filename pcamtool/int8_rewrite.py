"""Rewrites of the exported float graph that make its int8 version fast on onnxruntime's CPU kernels.

Each rewrite computes what the graph computed (up to float rounding, or
exactly where said) and only changes how onnxruntime can run it. They exist
because of how onnxruntime lays out an int8 graph on the CPU: it runs the
quantized convolutions channels-last (NHWC) and moves the input's
NHWC -> NCHW transpose past the elementwise preprocessing, so everything
before the first convolution runs on 3-wide channel rows. Measured on
plain4 (256 images, 2-core AVX-512 VNNI EPYC; benchmarks/RESULTS.md):

* the first convolution, 3 input channels -> 32 at 96x96, took as long in
  int8 as the three later ones together: onnxruntime's int8 convolution has
  no fast path for 3 input channels. With a 4th, all-zero channel it ran
  2.1-2.7x faster (:func:`normalization_as_conv`);
* per-channel constants of shape ``(1, 3, 1, 1)`` then broadcast along the
  innermost axis, element by element: Sub 254 ms and Div 217 ms against
  30 ms and 19 ms in the fp32 graph (:func:`tile_channel_constants`);
* converting the uint8 image to float, dividing by 255 and quantizing it
  again with scale 1/255 gives back the uint8 image
  (:func:`feed_uint8_input`).

:func:`tile_channel_constants` is for graphs :func:`normalization_as_conv`
does not recognise, whose preprocessing stays float.

Example::

    x01 = normalization_as_conv(proto)        # before quantize_static
    ...quantize with x01 pinned to scale 1/255, zero point 0...
    feed_uint8_input(int8_proto, x01)         # after
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

STEM_CHANNELS = 4      # the first convolution's input channels after normalization_as_conv
INPUT_SCALE = np.float32(1 / 255)


def _graph_maps(proto: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[Any]]]:
    """(initializers by name, producing node by output, consuming nodes by input)."""
    inits = {t.name: t for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in proto.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    return inits, producer, consumers


def _value_types(proto: Any) -> dict[str, tuple[int, list[Optional[int]]]]:
    """(element type, shape with None for unknown dims) of every tensor shape inference can type."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto)
    return {v.name: (v.type.tensor_type.elem_type,
                     [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim])
            for v in list(inferred.graph.value_info) + list(inferred.graph.input)}


def _const(inits: dict[str, Any], name: str) -> Optional[np.ndarray]:
    from onnx import numpy_helper

    return numpy_helper.to_array(inits[name]) if name in inits else None


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def normalization_as_conv(proto: Any) -> Optional[str]:
    """Turn ``(x01 - mean) / std -> Conv(3 channels)`` into a 1x1 Conv (3 -> 4) and a Conv on 4 channels.

    The 1x1 convolution computes the normalization (weight ``1/std`` on its
    own channel, bias ``-mean/std``) and a 4th channel that is always 0; the
    first convolution gets zero weights for it. Exact in real arithmetic,
    zero padding included: the first convolution still pads the normalized
    image with zeros. Quantized, both are int8 convolutions, which is what
    makes the first one fast (module docstring).

    Returns the name of ``x01`` (the float image in [0, 1] that feeds the
    normalization), or None, changing nothing, where the graph does not
    start with that pattern (a division may be a multiplication by the
    reciprocal; per-channel constants may be ``(3,)``-sized in any shape).
    """
    from onnx import helper, numpy_helper

    inits, producer, consumers = _graph_maps(proto)
    for conv in proto.graph.node:
        w = _const(inits, conv.input[1]) if conv.op_type == "Conv" and len(conv.input) > 1 else None
        if w is None or w.ndim != 4 or w.shape[1] != 3 or _attr(conv, "group", 1) != 1:
            continue
        scale_node = producer.get(conv.input[0])
        sub = producer.get(scale_node.input[0]) if scale_node is not None else None
        if scale_node is None or sub is None or scale_node.op_type not in ("Div", "Mul") or sub.op_type != "Sub":
            return None
        std_c, mean_c = _const(inits, scale_node.input[1]), _const(inits, sub.input[1])
        if std_c is None or mean_c is None or std_c.size not in (3, 3 * np.prod(std_c.shape[-2:])):
            return None
        if len(consumers.get(conv.input[0], [])) != 1 or len(consumers.get(sub.output[0], [])) != 1:
            return None
        per_channel = [np.asarray(a, np.float64).reshape(3, -1)[:, 0] for a in (std_c, mean_c)]
        scale = 1.0 / per_channel[0] if scale_node.op_type == "Div" else per_channel[0]
        w1 = np.zeros((STEM_CHANNELS, 3, 1, 1), np.float32)
        b1 = np.zeros(STEM_CHANNELS, np.float32)
        for c in range(3):
            w1[c, c] = scale[c]
            b1[c] = -per_channel[1][c] * scale[c]
        x01, out = sub.input[0], conv.input[0]
        proto.graph.initializer.extend([numpy_helper.from_array(w1, "pcamtool_normalize_w"),
                                        numpy_helper.from_array(b1, "pcamtool_normalize_b")])
        padded = np.concatenate([w, np.zeros((w.shape[0], STEM_CHANNELS - 3) + w.shape[2:], w.dtype)], axis=1)
        inits[conv.input[1]].CopyFrom(numpy_helper.from_array(padded, conv.input[1]))
        at = list(proto.graph.node).index(sub)
        proto.graph.node.remove(scale_node)
        proto.graph.node.remove(sub)
        proto.graph.node.insert(at, helper.make_node(
            "Conv", [x01, "pcamtool_normalize_w", "pcamtool_normalize_b"], [out], name="pcamtool_normalize",
            kernel_shape=[1, 1]))
        _drop_unused_initializers(proto)      # the mean and std constants
        # shapes recorded for the removed tensors no longer hold (the output keeps its name, now 4 channels)
        keep = [v for v in proto.graph.value_info if v.name != out]
        del proto.graph.value_info[:]
        proto.graph.value_info.extend(keep)
        return x01
    return None


def tile_channel_constants(proto: Any) -> int:
    """Tile per-channel constants to the full image and turn division by constants into multiplication.

    A ``(1, 3, 1, 1)`` constant of a Sub/Div/Mul/Add on an ``(N, 3, H, W)``
    tensor with fixed ``H, W`` becomes ``(1, 3, H, W)``: in the int8 layout
    the broadcast then runs over the batch axis only (module docstring).
    A division by a constant becomes a multiplication by its reciprocal
    (cheaper; the rounding it changes is far below an int8 step). Returns
    the number of nodes changed.
    """
    from onnx import numpy_helper

    types = _value_types(proto)
    inits, _, consumers = _graph_maps(proto)
    changed = 0
    for n in proto.graph.node:
        if n.op_type not in ("Sub", "Div", "Mul", "Add") or len(n.input) != 2:
            continue
        data, const = n.input
        value = _const(inits, const)
        if value is None or len(consumers.get(const, [])) != 1:
            continue
        shape = types.get(data, (0, []))[1]
        reciprocal = n.op_type == "Div" and value.dtype == np.float32 and bool(np.all(value != 0))
        tile = value.shape == (1, 3, 1, 1) and len(shape) == 4 and shape[1] == 3 and bool(shape[2] and shape[3])
        if not (reciprocal or tile):
            continue
        if reciprocal:
            n.op_type, value = "Mul", (1.0 / value).astype(np.float32)
        if tile:
            value = np.ascontiguousarray(np.broadcast_to(value, (1, 3, shape[2], shape[3])))
        inits[const].CopyFrom(numpy_helper.from_array(value, const))
        changed += 1
    return changed


def feed_uint8_input(proto: Any, x01: str) -> bool:
    """Feed the uint8 image straight to the first quantized node: drop ``Cast -> /255 -> QuantizeLinear``.

    With ``x01`` quantized at scale 1/255 and zero point 0, quantizing
    ``float(x) / 255`` gives ``x`` back exactly (the division and the
    rescaling are each within an ulp, far from a rounding boundary), so the
    three nodes are replaced by the uint8 tensor they started from. Returns
    whether the pattern was found; the graph is unchanged otherwise.
    """
    import onnx

    inits, producer, consumers = _graph_maps(proto)
    div = producer.get(x01)
    cast = producer.get(div.input[0]) if div is not None else None
    users = consumers.get(x01, [])
    if div is None or cast is None or div.op_type != "Div" or cast.op_type != "Cast" or len(users) != 1 \
            or users[0].op_type != "QuantizeLinear" or len(users[0].input) != 3:
        return False
    q = users[0]
    scale, zero, factor = (_const(inits, name) for name in (q.input[1], q.input[2], div.input[1]))
    source = cast.input[0]
    if scale is None or zero is None or factor is None or factor.size != 1 or float(factor) != 255.0 \
            or np.float32(scale) != INPUT_SCALE or zero.dtype != np.uint8 or int(zero) != 0 \
            or _value_types(proto).get(source, (0, []))[0] != onnx.TensorProto.UINT8 \
            or len(consumers.get(cast.output[0], [])) != 1 or len(consumers.get(source, [])) != 1:
        return False
    for n in consumers.get(q.output[0], []):
        for i, name in enumerate(n.input):
            if name == q.output[0]:
                n.input[i] = source
    for n in (q, div, cast):
        proto.graph.node.remove(n)
    _drop_unused_initializers(proto)
    return True


def _drop_unused_initializers(proto: Any) -> None:
    """Remove initializers no node reads any more (onnxruntime warns about each one on stderr)."""
    used = {name for n in proto.graph.node for name in n.input} | {o.name for o in proto.graph.output}
    for t in [t for t in proto.graph.initializer if t.name not in used]:
        proto.graph.initializer.remove(t)
