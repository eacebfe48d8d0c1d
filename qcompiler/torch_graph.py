"""Differentiable execution of a float or fake-quant model in torch (for the learning stage).

:class:`TorchGraph` runs the nodes of an ``onnx_ir`` graph in order with torch ops, so
gradients flow from the outputs to anything a caller substitutes: a node's outputs
(``node_hooks``: the learning stage replaces activation Quantize/DequantizeLinear and
weight DequantizeLinear with its own quantizers) or a constant input
(``input_hooks``: transformed norm affines, biases). With no hooks it computes what the
reference interpreter computes (QuantizeLinear rounds half to even in float32, as ONNX
does, with a straight-through gradient so that fixed quantizers pass gradients on);
tests check the two agree.

Only standard-domain ops that float and fake-quant transformer, CNN and decoder graphs
contain are implemented; anything else raises :class:`UnsupportedOp` naming the node.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from .errors import UnsupportedOpError
from .graph import const_array, node_label


class UnsupportedOp(UnsupportedOpError):
    """A node the torch executor has no differentiable form for (a user error: exit 2)."""


NodeHook = Callable[[ir.Node, list], list]
InputHook = Callable[[], torch.Tensor]

_TORCH_DTYPES = {
    ir.DataType.FLOAT: torch.float32, ir.DataType.DOUBLE: torch.float64, ir.DataType.FLOAT16: torch.float16,
    ir.DataType.INT64: torch.int64, ir.DataType.INT32: torch.int32, ir.DataType.INT16: torch.int16,
    ir.DataType.INT8: torch.int8, ir.DataType.UINT8: torch.uint8, ir.DataType.BOOL: torch.bool,
}


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A torch tensor of ``array``; int4/uint4/uint16/uint32 widen to int32 (values kept)."""
    array = np.asarray(array)
    native = (np.int64, np.int32, np.int16, np.int8, np.uint8)
    if (array.dtype.kind in "iu" and array.dtype not in native) or str(array.dtype) in ("int4", "uint4"):
        array = array.astype(np.int32)
    array = np.ascontiguousarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axes(node: ir.Node, inputs: list, index: int) -> list[int] | None:
    """Axes from the attribute (older opsets) or the optional input ``index``."""
    attr = _attr(node, "axes")
    if attr is not None:
        return list(attr)
    return _ints(inputs[index]) if len(inputs) > index and inputs[index] is not None else None


# -- op implementations ---------------------------------------------------------------------------


def _broadcast_scale(scale: torch.Tensor, zero: torch.Tensor, x: torch.Tensor, node: ir.Node):
    """Scale and zero point shaped to broadcast over ``x`` (per-axis and blocked forms)."""
    if scale.dim() == 0:
        return scale, zero
    axis = _attr(node, "axis", 1) % x.dim()
    block = _attr(node, "block_size", 0) or 0
    if block:
        length = x.shape[axis]
        scale = scale.repeat_interleave(block, dim=axis).narrow(axis, 0, length)
        zero = zero.repeat_interleave(block, dim=axis).narrow(axis, 0, length)
        return scale, zero
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape), zero.reshape(shape)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` (half to even) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def quantize_linear(node: ir.Node, x, scale, zero=None):
    zero = torch.zeros((), dtype=torch.int32) if zero is None else zero
    dtype = node.outputs[0].dtype
    lo, hi = _INT_RANGES.get(dtype, (-128, 127))
    scale, zero = _broadcast_scale(scale, zero, x, node)
    q = round_ste(x.float() / scale.float()) + zero.float()
    return torch.clamp(q, lo, hi)


def dequantize_linear(node: ir.Node, q, scale, zero=None):
    zero = torch.zeros((), dtype=torch.int32) if zero is None else zero
    scale, zero = _broadcast_scale(scale, zero, q, node)
    return (q.float() - zero.float()) * scale.float()


_INT_RANGES = {
    ir.DataType.INT8: (-128, 127), ir.DataType.UINT8: (0, 255), ir.DataType.INT16: (-32768, 32767),
    ir.DataType.UINT16: (0, 65535), ir.DataType.INT4: (-8, 7), ir.DataType.UINT4: (0, 15),
    ir.DataType.INT32: (-(2**31), 2**31 - 1),
}


def _reshape(node, x, shape):
    dims = _ints(shape)
    if not _attr(node, "allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _gemm(node, a, b, c=None):
    a = a.t() if _attr(node, "transA", 0) else a
    b = b.t() if _attr(node, "transB", 0) else b
    y = _attr(node, "alpha", 1.0) * (a @ b)
    return y if c is None else y + _attr(node, "beta", 1.0) * c


def _pads(node, spatial: int) -> list[int]:
    if _attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise UnsupportedOp(f"{node_label(node)}: auto_pad={_attr(node, 'auto_pad')} is not supported")
    pads = list(_attr(node, "pads", [0] * (2 * spatial)))
    # ONNX: [x1_begin, x2_begin, ..., x1_end, ...]; F.pad: last axis first, (begin, end) pairs
    out = []
    for i in reversed(range(spatial)):
        out += [pads[i], pads[i + spatial]]
    return out


def _conv(node, x, w, b=None):
    spatial = x.dim() - 2
    x = F.pad(x, _pads(node, spatial))
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return fn(x, w, b, stride=_attr(node, "strides", [1] * spatial), dilation=_attr(node, "dilations", [1] * spatial),
              groups=_attr(node, "group", 1))


def _pool(node, x, kind: str):
    spatial = x.dim() - 2
    kernel = list(_attr(node, "kernel_shape"))
    strides = _attr(node, "strides", [1] * spatial)
    if _attr(node, "ceil_mode", 0):
        raise UnsupportedOp(f"{node_label(node)}: ceil_mode pooling is not supported")
    pads = _pads(node, spatial)
    if kind == "max":
        x = F.pad(x, pads, value=-math.inf)
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
        return fn(x, kernel, strides, dilation=_attr(node, "dilations", [1] * spatial))
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
    if any(pads) and not _attr(node, "count_include_pad", 0):
        ones = F.pad(torch.ones_like(x[:1, :1]), pads)
        return fn(F.pad(x, pads), kernel, strides) / fn(ones, kernel, strides)
    return fn(F.pad(x, pads), kernel, strides)


def _layer_norm(node, x, gamma, beta=None):
    axis = _attr(node, "axis", -1) % x.dim()
    eps = _attr(node, "epsilon", 1e-5)
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * gamma
    return y if beta is None else y + beta


def _batch_norm(node, x, gamma, beta, mean, var):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    inv = gamma / torch.sqrt(var + _attr(node, "epsilon", 1e-5))
    return (x - mean.reshape(shape)) * inv.reshape(shape) + beta.reshape(shape)


def _rms_norm(node, x, gamma):
    axis = _attr(node, "axis", -1) % x.dim()
    dims = tuple(range(axis, x.dim()))
    return x / torch.sqrt((x * x).mean(dim=dims, keepdim=True) + _attr(node, "epsilon", 1e-5)) * gamma


def _softmax(node, x):
    return torch.softmax(x, dim=_attr(node, "axis", -1))


def _gelu(node, x):
    return F.gelu(x, approximate="tanh" if _attr(node, "approximate", "none") == "tanh" else "none")


def _reduce(fn):
    def run(node, x, axes=None):
        dims = _axes(node, [x, axes], 1)
        keep = bool(_attr(node, "keepdims", 1))
        if not dims:
            if _attr(node, "noop_with_empty_axes", 0):
                return x
            dims = list(range(x.dim()))
        return fn(x, [d % x.dim() for d in dims], keep)
    return run


def _reduce_max(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = x.amax(dim=d, keepdim=keep)
    return x


def _reduce_min(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = x.amin(dim=d, keepdim=keep)
    return x


def _slice(node, x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        n = x.shape[a]
        if st < 0:
            raise UnsupportedOp(f"{node_label(node)}: negative Slice steps are not supported")
        s = max(0, min(n, s + n if s < 0 else s))
        e = max(0, min(n, e + n if e < 0 else e))
        index[a % x.dim()] = slice(s, e, st)
    return x[tuple(index)]


def _split(node, x, split=None):
    axis = _attr(node, "axis", 0) % x.dim()
    sizes = _ints(split) if split is not None else _attr(node, "split")
    if sizes is None:
        count = _attr(node, "num_outputs", len(node.outputs))
        step = -(-x.shape[axis] // count)
        sizes = [min(step, x.shape[axis] - i * step) for i in range(count)]
    return list(torch.split(x, list(sizes), dim=axis))


def _gather(node, data, indices):
    axis = _attr(node, "axis", 0) % data.dim()
    idx = indices.long()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = data.index_select(axis, idx.reshape(-1))
    return out.reshape(tuple(data.shape[:axis]) + tuple(idx.shape) + tuple(data.shape[axis + 1:]))


def _gather_elements(node, data, indices):
    axis = _attr(node, "axis", 0) % data.dim()
    idx = indices.long()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    window = tuple(slice(0, n) if i != axis else slice(None) for i, n in enumerate(idx.shape))
    return torch.gather(data[window], axis, idx)


def _gather_nd(node, data, indices):
    if _attr(node, "batch_dims", 0):
        raise UnsupportedOp(f"{node_label(node)}: GatherND with batch_dims is not supported")
    idx = indices.long()
    parts = tuple(idx[..., i] for i in range(idx.shape[-1]))
    return data[parts]


def _expand(node, x, shape):
    dims = _ints(shape)
    target = torch.broadcast_shapes(tuple(x.shape), tuple(dims))
    return x.expand(target)


def _unsqueeze(node, x, axes=None):
    dims = _axes(node, [x, axes], 1)
    rank = x.dim() + len(dims)
    for d in sorted(a % rank for a in dims):
        x = x.unsqueeze(d)
    return x


def _squeeze(node, x, axes=None):
    dims = _axes(node, [x, axes], 1)
    if dims is None:
        return x.squeeze()
    for d in sorted((a % x.dim() for a in dims), reverse=True):
        x = x.squeeze(d)
    return x


def _clip(node, x, lo=None, hi=None):
    lo = _attr(node, "min") if lo is None and _attr(node, "min") is not None else lo
    hi = _attr(node, "max") if hi is None and _attr(node, "max") is not None else hi
    if lo is not None:
        x = torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype))
    if hi is not None:
        x = torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype))
    return x


def _cast(node, x):
    dtype = _TORCH_DTYPES.get(ir.DataType(_attr(node, "to")))
    if dtype is None:
        raise UnsupportedOp(f"{node_label(node)}: Cast to {ir.DataType(_attr(node, 'to')).name} is not supported")
    return x.to(dtype)


def _pad(node, x, pads, value=None, axes=None):
    if _attr(node, "mode", "constant") != "constant" or axes is not None:
        raise UnsupportedOp(f"{node_label(node)}: only constant Pad without axes is supported")
    p = _ints(pads)
    n = x.dim()
    flat = []
    for i in reversed(range(n)):
        flat += [p[i], p[i + n]]
    return F.pad(x, flat, value=0.0 if value is None else float(value.reshape(-1)[0]))


def _matmul(node, a, b):
    return a @ b


def _binary(fn):
    return lambda node, a, b: fn(a, b)


def _unary(fn):
    return lambda node, x: fn(x)


def _variadic(fn):
    def run(node, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out
    return run


def _div(node, a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _range(node, start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def _constant_of_shape(node, shape):
    value = _attr(node, "value")
    fill = value.numpy().reshape(-1)[0] if value is not None else np.float32(0)
    return torch.full(tuple(_ints(shape)), torch.as_tensor(fill).item(), dtype=to_torch(np.asarray(fill)).dtype)


def _mod(node, a, b):
    return torch.fmod(a, b) if _attr(node, "fmod", 0) else torch.remainder(a, b)


def _where(node, c, a, b):
    return torch.where(c.bool(), a, b)


def _hard_sigmoid(node, x):
    return torch.clamp(_attr(node, "alpha", 0.2) * x + _attr(node, "beta", 0.5), 0.0, 1.0)


def _leaky_relu(node, x):
    return F.leaky_relu(x, _attr(node, "alpha", 0.01))


def _flatten(node, x):
    axis = _attr(node, "axis", 1) % max(x.dim(), 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _transpose(node, x):
    perm = _attr(node, "perm")
    return x.permute(*(perm if perm is not None else reversed(range(x.dim()))))


def _concat(node, *xs):
    return torch.cat([x for x in xs if x is not None], dim=_attr(node, "axis"))


def _tile(node, x, repeats):
    return x.repeat(*_ints(repeats))


def _shape(node, x):
    start, end = _attr(node, "start", 0), _attr(node, "end")
    return torch.tensor(list(x.shape)[start:end], dtype=torch.int64)


def _global_pool(fn):
    return lambda node, x: fn(x, dim=tuple(range(2, x.dim())), keepdim=True)


OPS: dict[str, Callable] = {
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _div,
    "Pow": _binary(torch.pow), "MatMul": _matmul, "Gemm": _gemm, "Conv": _conv,
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Sum": _variadic(torch.add),
    "Equal": _binary(torch.eq), "Less": _binary(torch.lt), "Greater": _binary(torch.gt),
    "LessOrEqual": _binary(torch.le), "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or), "Xor": _binary(torch.logical_xor),
    "Not": _unary(torch.logical_not), "IsNaN": _unary(torch.isnan), "IsInf": _unary(torch.isinf),
    "Relu": _unary(torch.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf), "Exp": _unary(torch.exp), "Log": _unary(torch.log), "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal), "Neg": _unary(torch.neg), "Abs": _unary(torch.abs),
    "Floor": _unary(torch.floor), "Ceil": _unary(torch.ceil), "Sin": _unary(torch.sin), "Cos": _unary(torch.cos),
    "Softplus": _unary(F.softplus), "HardSwish": _unary(F.hardswish), "Identity": _unary(lambda x: x),
    "HardSigmoid": _hard_sigmoid, "LeakyRelu": _leaky_relu, "Clip": _clip, "Cast": _cast, "Where": _where,
    "Softmax": _softmax, "Gelu": _gelu, "LayerNormalization": _layer_norm, "BatchNormalization": _batch_norm, "RMSNormalization": _rms_norm,
    "ReduceMean": _reduce(lambda x, d, k: x.mean(dim=d, keepdim=k)),
    "ReduceSum": _reduce(lambda x, d, k: x.sum(dim=d, keepdim=k)),
    "ReduceMax": _reduce(_reduce_max), "ReduceMin": _reduce(_reduce_min),
    "Reshape": _reshape, "Transpose": _transpose, "Flatten": _flatten, "Concat": _concat, "Split": _split,
    "Slice": _slice, "Gather": _gather, "GatherElements": _gather_elements, "GatherND": _gather_nd,
    "Expand": _expand, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Tile": _tile, "Pad": _pad,
    "Shape": _shape, "Range": _range, "ConstantOfShape": _constant_of_shape, "Mod": _mod,
    "MaxPool": lambda node, x: _pool(node, x, "max"), "AveragePool": lambda node, x: _pool(node, x, "avg"),
    "GlobalAveragePool": _global_pool(torch.mean), "GlobalMaxPool": _global_pool(torch.amax),
    "QuantizeLinear": quantize_linear, "DequantizeLinear": dequantize_linear,
}


class TorchGraph:
    """Runs ``model``'s graph in torch; see the module docstring for the hooks."""

    def __init__(self, model: ir.Model, node_hooks: Mapping[str, NodeHook] | None = None,
                 input_hooks: Mapping[tuple[str, int], InputHook] | None = None,
                 share_constants: TorchGraph | None = None):
        self.graph = model.graph
        self.node_hooks = dict(node_hooks or {})
        self.input_hooks = dict(input_hooks or {})
        # Another executor of the same graph lends its constants (one copy in memory).
        self._constants: dict[int, torch.Tensor] = share_constants._constants if share_constants else {}
        for node in self.graph:
            runnable = node.domain in ("", "ai.onnx") and (node.op_type in OPS or node.op_type == "Constant")
            if not runnable and node.name not in self.node_hooks:
                raise UnsupportedOp(f"{node_label(node)}: the learning stage has no differentiable form of this op")
            for value in node.inputs:
                if value is None or id(value) in self._constants or value.producer() is not None:
                    continue
                array = const_array(value)
                if array is not None:
                    self._constants[id(value)] = to_torch(array)

    def __call__(self, feeds: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
        env: dict[int, torch.Tensor] = {}
        for value in self.graph.inputs:
            array = feeds[value.name]
            env[id(value)] = array if isinstance(array, torch.Tensor) else to_torch(array)
        for node in self.graph:
            if node.op_type == "Constant" and node.name not in self.node_hooks:
                env[id(node.outputs[0])] = to_torch(const_array(node.outputs[0]))
                continue
            inputs = []
            for index, value in enumerate(node.inputs):
                hook = self.input_hooks.get((node.name, index))
                if hook is not None:
                    inputs.append(hook())
                elif value is None:
                    inputs.append(None)
                elif id(value) in env:
                    inputs.append(env[id(value)])
                else:
                    inputs.append(self._constants[id(value)])
            hook = self.node_hooks.get(node.name)
            outputs = hook(node, inputs) if hook is not None else OPS[node.op_type](node, *inputs)
            if not isinstance(outputs, list | tuple):
                outputs = [outputs]
            for value, out in zip(node.outputs, outputs, strict=False):
                env[id(value)] = out
        return {value.name: env[id(value)] for value in self.graph.outputs}

    def constant(self, value: ir.Value) -> torch.Tensor | None:
        """The torch tensor of a constant input (shared with the executor)."""
        return self._constants.get(id(value))


__all__ = ["OPS", "TorchGraph", "UnsupportedOp", "dequantize_linear", "quantize_linear", "round_ste", "to_torch"]
