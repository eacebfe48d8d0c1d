"""Mixin of the integer lowering: ops that move, pool or reduce quantized values, and
``ConvTranspose`` rewritten as a ``ConvInteger`` (``self.b``, ``self.qin``, ``self.align``,
``self.requantize`` come from the lowering in :mod:`qcompiler.passes.lower_integer`)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler import intops
from qcompiler.graph import const_array
from qcompiler.qdq import constant_value as _dequantized_constant, is_nearest_resize

from .lowering_common import QT, Refuse as _Refuse, shape_of as _shape

_INT8 = (np.dtype(np.int8), np.dtype(np.uint8))


class StructuralLowering:
    def _transposed_as_conv(self, node: ir.Node, x: QT, w_int: np.ndarray):
        """``ConvTranspose`` as a ``ConvInteger``: the input with ``stride − 1`` zero points
        between its elements (Reshape, Pad, Reshape, Slice: data movement), padded by
        ``d·(k − 1) − pad`` (cropped where that is negative), convolved with the kernel
        flipped and its channel axes swapped (``W'[o, i] = W[i, o, ::-1, …]``)."""
        attrs = {k: a.value for k, a in node.attributes.items()}
        shape = _shape(node.inputs[0])
        if attrs.get("group", 1) != 1 or shape is None or not all(isinstance(d, int) for d in shape):
            raise _Refuse("grouped ConvTranspose or unknown input shape")
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or "output_shape" in attrs:
            raise _Refuse("ConvTranspose with auto_pad SAME or output_shape")
        spatial = len(shape) - 2
        kernel = list(w_int.shape[2:])
        strides = [int(v) for v in attrs.get("strides", [1] * spatial)]
        dilations = [int(v) for v in attrs.get("dilations", [1] * spatial)]
        pads = [int(v) for v in attrs.get("pads", [0] * (2 * spatial))]
        extra = [int(v) for v in attrs.get("output_padding", [0] * spatial)]
        value, dims = x.value, list(shape)
        zero = self.b.const("pad_value", np.asarray(x.zero, dtype=x.dtype).reshape(()))
        if any(s > 1 for s in strides):
            # [N, C, H, W] → [N, C, H, 1, W, 1] → pad each 1 to s with the zero point → [N, C, H·s, W·s]
            split = [dims[0], dims[1]] + [v for d in dims[2:] for v in (d, 1)]
            value = self.b.node("Reshape", [value, self.b.const("shape", np.array(split, np.int64))], dtype=x.dtype, shape=split, base=node.name)
            grow = [0] * len(split) * 2
            for i, s in enumerate(strides):
                grow[len(split) + 3 + 2 * i] = s - 1
            spread = [dims[0], dims[1]] + [v for d, s in zip(dims[2:], strides) for v in (d, s)]
            value = self.b.node("Pad", [value, self.b.const("pads", np.array(grow, np.int64)), zero], dtype=x.dtype, shape=spread, base=node.name)
            dims = [dims[0], dims[1]] + [d * s for d, s in zip(dims[2:], strides)]
            value = self.b.node("Reshape", [value, self.b.const("shape", np.array(dims, np.int64))], dtype=x.dtype, shape=dims, base=node.name)
            kept = [(d // s - 1) * s + 1 for d, s in zip(dims[2:], strides)]
            value = self.b.node("Slice", [value, self.b.const("starts", np.zeros(spatial, np.int64)), self.b.const("ends", np.array(kept, np.int64)),
                                          self.b.const("axes", np.arange(2, 2 + spatial, dtype=np.int64))],
                                dtype=x.dtype, shape=dims[:2] + kept, base=node.name)
            dims = dims[:2] + kept
        begin = [d * (k - 1) - p for d, k, p in zip(dilations, kernel, pads[:spatial])]
        end = [d * (k - 1) - p + e for d, k, p, e in zip(dilations, kernel, pads[spatial:], extra)]
        if any(v < 0 for v in begin + end):  # crop what the transposed conv's padding removes
            starts = [max(0, -v) for v in begin]
            ends = [n - max(0, -v) for n, v in zip(dims[2:], end)]
            value = self.b.node("Slice", [value, self.b.const("starts", np.array(starts, np.int64)), self.b.const("ends", np.array(ends, np.int64)),
                                          self.b.const("axes", np.arange(2, 2 + spatial, dtype=np.int64))],
                                dtype=x.dtype, shape=dims[:2] + [e - s for s, e in zip(starts, ends)], base=node.name)
            begin, end = [max(0, v) for v in begin], [max(0, v) for v in end]
        flipped = np.flip(np.swapaxes(w_int, 0, 1), axis=tuple(range(2, 2 + spatial)))
        conv_attrs = {"dilations": dilations, "pads": begin + end, "kernel_shape": kernel}
        return QT(value, x.scale, x.zero), conv_attrs, np.ascontiguousarray(flipped)

    def _op_Resize(self, node: ir.Node, out: QT):
        """Nearest-neighbour Resize moves values: the integer tensor is resized as is (its
        roi/scales/sizes are constants)."""
        if not is_nearest_resize(node):
            return None
        x = self.qin(node.inputs[0])
        if x is None or x.axis is not None or any(v is not None and const_array(v) is None for v in node.inputs[1:]):
            return None
        attrs = {k: a.value for k, a in node.attributes.items()}
        moved = self.b.node("Resize", [x.value, *node.inputs[1:]], attrs, dtype=x.dtype, shape=_shape(node.outputs[0]), base=node.name)
        return self.align(QT(moved, x.scale, x.zero), out, _shape(node.outputs[0]))

    def _op_Pad(self, node: ir.Node, out: QT):
        """Pad moves values; a constant pad value is quantized with the input's parameters
        (it must be representable: 0 always is)."""
        x = self.qin(node.inputs[0])
        extra = list(node.inputs[1:])
        if x is None or x.axis is not None or any(v is not None and const_array(v) is None for v in extra):
            return None
        mode = node.attributes["mode"].as_string() if "mode" in node.attributes else "constant"
        inputs = [x.value, *extra]
        if mode == "constant":
            value = const_array(extra[1]) if len(extra) > 1 and extra[1] is not None else np.zeros(())
            level = float(np.asarray(value, np.float64).reshape(-1)[0]) / x.s + float(np.asarray(x.zero).reshape(-1)[0])
            lo, hi = intops.int_range(x.dtype)
            if not np.isfinite(level) or abs(level - round(level)) > 1e-6 or not lo <= round(level) <= hi:
                raise _Refuse(f"pad value {float(np.asarray(value).reshape(-1)[0])} is not a level of the input's quantization")
            padded = self.b.const("pad_value", np.asarray(round(level), dtype=x.dtype))
            inputs = [x.value, extra[0], padded, *extra[2:]]
        attrs = {k: a.value for k, a in node.attributes.items()}
        moved = self.b.node("Pad", inputs, attrs, dtype=x.dtype, shape=_shape(node.outputs[0]), base=node.name)
        return self.align(QT(moved, x.scale, x.zero), out, _shape(node.outputs[0]))

    def _op_Max(self, node: ir.Node, out: QT):
        """Max/Min commute with a common increasing quantization: each input re-expressed with
        the output's parameters (a float constant quantized with them), then the integer
        Max/Min: ``max(Q(x), Q(c)) = Q(max(x, c))`` for the non-decreasing ``Q``."""
        aligned = []
        for value in node.inputs:
            part = self.qin(value)
            constant = _dequantized_constant(value) if part is None else None
            if constant is not None:
                lo, hi = intops.int_range(out.dtype)
                levels = np.clip(np.round(constant / out.s) + out.z, lo, hi).astype(out.dtype)
                aligned.append(self.b.const("bound", levels))
                continue
            if part is None or part.axis is not None:
                return None
            aligned.append(self.align(part, out, _shape(value)))
        if not aligned:
            return None
        return self.b.node(node.op_type, aligned, dtype=out.dtype, shape=_shape(node.outputs[0]), base=node.name)

    _op_Min = _op_Max

    def _op_ReduceMax(self, node: ir.Node, out: QT):
        """The largest integer is the largest value (the scale is positive): reduce, then
        re-express with the output's parameters."""
        x = self.qin(node.inputs[0])
        if x is None or x.axis is not None or any(v is not None and const_array(v) is None for v in node.inputs[1:]):
            return None
        attrs = {k: a.value for k, a in node.attributes.items()}
        reduced = self.b.node(node.op_type, [x.value, *node.inputs[1:]], attrs, dtype=x.dtype, shape=_shape(node.outputs[0]), base=node.name)
        return self.align(QT(reduced, x.scale, x.zero), out, _shape(node.outputs[0]))

    _op_ReduceMin = _op_ReduceMax
    _op_GlobalMaxPool = _op_ReduceMax

    def _op_GlobalAveragePool(self, node: ir.Node, out: QT):
        shape = _shape(node.inputs[0])
        if shape is None:
            return None
        return self._mean(node, out, list(range(2, len(shape))), keepdims=True)

    def _op_AveragePool(self, node: ir.Node, out: QT):
        """A windowed mean: a depthwise ``ConvInteger`` with weights 1 (padding reads the zero
        point, so it adds 0) sums each window, requantized by ``s / (k·s_out)``. Exact when
        every window counts ``k`` values: no padding, or padding counted (``count_include_pad``)."""
        x = self.qin(node.inputs[0])
        shape = _shape(node.inputs[0])
        if x is None or x.axis is not None or shape is None or x.dtype not in _INT8:
            return None
        attrs = {k: a.value for k, a in node.attributes.items()}
        kernel = [int(k) for k in attrs["kernel_shape"]]
        pads = [int(p) for p in attrs.get("pads", [0] * (2 * len(kernel)))]
        auto_pad = attrs.get("auto_pad", "NOTSET")
        if attrs.get("ceil_mode", 0):
            raise _Refuse("ceil_mode windows are partial at the edge")
        padded = any(pads) or auto_pad in ("SAME_UPPER", "SAME_LOWER")
        if padded and not attrs.get("count_include_pad", 0):
            raise _Refuse("padded windows that do not count the padding have varying sizes")
        channels = shape[1]
        ones = self.b.const(f"{node.name}_window", np.ones((channels, 1, *kernel), np.int8))
        conv_attrs = {"group": channels, "kernel_shape": kernel}
        conv_attrs.update({k: attrs[k] for k in ("strides", "dilations", "auto_pad") if k in attrs})
        if "pads" in attrs:
            conv_attrs["pads"] = pads
        total = self.b.node("ConvInteger", [x.value, ones, self.b.const("x_zero_point", x.zero)], conv_attrs,
                            dtype=np.int32, shape=_shape(node.outputs[0]), base=node.name)
        window = int(np.prod(kernel))
        return self.requantize(total, x.s / (out.s * window), out, shape=_shape(node.outputs[0]))

    def _op_ReduceMean(self, node: ir.Node, out: QT):
        shape = _shape(node.inputs[0])
        if shape is None:
            return None
        axes = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if axes is None and "axes" in node.attributes:
            axes = np.asarray(node.attributes["axes"].as_ints())
        keepdims = node.attributes["keepdims"].as_int() if "keepdims" in node.attributes else 1
        if axes is None or axes.size == 0:
            if node.attributes.get_int("noop_with_empty_axes", 0):
                return None
            axes = np.arange(len(shape))
        return self._mean(node, out, sorted({int(a) % len(shape) for a in np.ravel(axes)}), bool(keepdims))

    def _mean(self, node: ir.Node, out: QT, axes: list[int], keepdims: bool):
        """``mean(x̂) = s·(Σq − N·z) / N``: an int32 (or int64) sum, requantized by ``s / (N·s_out)``."""
        x = self.qin(node.inputs[0])
        shape = _shape(node.inputs[0])
        if x is None or shape is None or not all(isinstance(d, int) for d in shape):
            return None
        window = int(np.prod([shape[a] for a in axes]))
        acc = np.int64 if self._range(x) * window >= 2**31 else np.int32
        wide = self.b.node("Cast", [x.value], {"to": ir.DataType.from_numpy(np.dtype(acc))}, dtype=acc, shape=shape, base=node.name)
        total = self.b.node("ReduceSum", [wide, self.b.const("axes", np.asarray(axes, np.int64))], {"keepdims": int(keepdims)},
                            dtype=acc, shape=_shape(node.outputs[0]), base=node.name)
        return self.requantize(total, x.s / (out.s * window), out, x_zero=np.asarray(window * x.z, acc),
                               shape=_shape(node.outputs[0]))
