"""Channel tracking: where a per-channel scale of one tensor ends up downstream.

Scaling a producer's output per channel, ``Y' = Y·σ`` (``σ_j > 0`` for output channel
``j``), is an exact transform when every op between the producer and the next linear
ops commutes with it, ``f(x·σ) = f(x)·σ'``, and those linear ops absorb ``σ'`` in
their weight rows. The ops that commute here:

* data movement — ``Reshape``/``Flatten`` that split or merge axes in row-major order,
  ``Transpose``, ``Squeeze``, ``Unsqueeze``, ``Identity``, ``Dropout``;
* positively homogeneous ops (``f(σx) = σf(x)`` for ``σ > 0``) — ``Relu``,
  ``LeakyRelu``, ``PRelu``, ``Clip(0, ∞)``, max/average pooling over spatial axes;
  ``Mul``/``Div`` by a constant;
* affine ops — ``Add``/``Sub``/``Min``/``Max`` with a constant ``c`` (``c → c·σ``); optionally
  ``Clip(0, h)`` (ReLU6) as ``Min(Relu(x), h·σ)`` with a per-channel bound;
* ``MatMul`` of two activations when the scaled operand carries its channels on
  batch axes or on its free axis (rows of ``A``, columns of ``B``):
  ``A·(B·σ) = (A·B)·σ`` — the attention value path ``probs @ V``.

* ``Mul`` by another activation that does not itself carry the scale:
  ``(x·σ)⊙g = (x⊙g)·σ`` — a gated MLP's ``up`` → ``down`` pair (SwiGLU).

GELU, SiLU, Softmax, LayerNorm, residual ``Add`` of two activations and graph
outputs do not commute: :func:`trace` refuses with the reason.

The tracker carries, for every scaled tensor, an integer array ``ids`` broadcastable
to it (size 1 on axes that hold no channel) naming the producer channel of each
element; the scale of that tensor is then ``σ[ids]``. At a consumer the ids along the
contraction axis give ``rows``: the producer channel of each weight row.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from qcompiler.graph import const_array, node_label

LINEAR = ("MatMul", "Gemm", "Conv", "ConvTranspose")
_PASS_THROUGH = {"Relu", "LeakyRelu", "Identity"}
_POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}


class Refused(Exception):
    """The scale cannot be propagated exactly; the message says why."""


@dataclasses.dataclass
class Consumer:
    """A linear op reading a scaled tensor with a constant weight: it absorbs the scale."""

    node: ir.Node
    input: ir.Value
    axis: int  # contraction axis of ``input``
    rows: np.ndarray  # producer channel of each weight input channel


@dataclasses.dataclass
class Edit:
    """A constant operand ``node.inputs[index]`` that must become ``c·σ[ids]``."""

    node: ir.Node
    index: int
    ids: np.ndarray


@dataclasses.dataclass
class Chain:
    """Everything a per-channel scale of ``output`` touches down to the consumers."""

    output: ir.Value
    channels: int
    consumers: list[Consumer]
    edits: list[Edit]
    clips: list[Edit]  # ReLU6 Clip nodes to rewrite with a per-channel upper bound
    values: list[ir.Value]  # every scaled tensor (the output included)


def dims(value: ir.Value, shapes: dict[str, tuple[int, ...]] | None = None) -> list[int | None] | None:
    """Static dims of ``value`` (None for symbolic ones, unless ``shapes`` has measured
    ones), or None if the rank is unknown."""
    measured = shapes.get(value.name) if shapes else None
    if value.shape is None:
        return list(measured) if measured is not None else None
    out = [d if isinstance(d, int) else None for d in value.shape]
    if measured is not None and len(measured) == len(out):
        out = [m if d is None else d for d, m in zip(out, measured)]
    return out


def start_ids(rank: int, axis: int, channels: int) -> np.ndarray:
    shape = [1] * rank
    shape[axis] = channels
    return np.arange(channels, dtype=np.int64).reshape(shape)


def trace(output: ir.Value, ids: np.ndarray, *, relu6: bool = False, shapes: dict | None = None) -> Chain:
    """Follow ``output`` (channels laid out as ``ids``) to the linear ops that absorb them.

    ``shapes`` (name → shape measured on a sample) fills symbolic dims of reshapes.
    Raises :class:`Refused` when some reader does not commute with per-channel scaling.
    """
    chain = Chain(output, int(ids.max()) + 1, [], [], [], [])
    seen_nodes: set[int] = set()
    queue = [(output, ids)]
    while queue:
        value, ids = queue.pop(0)
        chain.values.append(value)
        if value.is_graph_output():
            raise Refused(f"'{value.name}' is a graph output")
        for use in list(value.uses()):
            node, index = use.node, use.idx
            if id(node) in seen_nodes:
                raise Refused(f"{node_label(node)} reads the scaled tensor twice")
            seen_nodes.add(id(node))
            step = _step(node, index, value, ids, chain, relu6, shapes)
            if step is not None:
                queue.append(step)
    if not chain.consumers:
        raise Refused("no linear op with a constant weight reads it")
    return chain


def _depends_on(value: ir.Value, source: ir.Value, limit: int = 4096) -> bool:
    """Whether ``value`` is computed from ``source`` (a bounded walk up the graph)."""
    stack, seen = [value], set()
    while stack and len(seen) < limit:
        current = stack.pop()
        if current is source:
            return True
        if id(current) in seen:
            continue
        seen.add(id(current))
        producer = current.producer()
        if producer is not None:
            stack.extend(v for v in producer.inputs if v is not None)
    return len(seen) >= limit  # too far to tell: assume it does


def _step(node: ir.Node, index: int, value: ir.Value, ids: np.ndarray, chain: Chain, relu6: bool, shapes):
    """Record what ``node`` does with scaled input ``index``; return ``(output, ids)`` to follow."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        raise Refused(f"{node_label(node)} is not a standard op")
    consumer = _consumer(node, index, value, ids)
    if consumer is not None:
        chain.consumers.append(consumer)
        return None
    out = node.outputs[0]
    if op in _PASS_THROUGH or (op == "Dropout" and index == 0) or (op == "PRelu" and index == 0):
        if op == "PRelu" and const_array(node.inputs[1]) is None:
            raise Refused(f"{node_label(node)} has a non-constant slope")
        return out, _pad(ids, out)
    if op == "Clip" and index == 0:
        lo, hi = (_bound(node, k) for k in (1, 2))
        if lo is None and hi is None:
            return out, _pad(ids, out)
        if lo != 0.0:
            raise Refused(f"{node_label(node)}: Clip with a lower bound other than 0 is not homogeneous")
        if hi is not None and math.isfinite(hi):
            if not relu6:
                raise Refused(f"{node_label(node)}: Clip(0, {hi:g}) would need a per-channel upper bound")
            chain.clips.append(Edit(node, 2, ids))
        return out, _pad(ids, out)
    if op in ("Add", "Sub", "Mul", "Div") and len(node.inputs) == 2:
        other = 1 - index
        if op == "Mul" and const_array(node.inputs[other]) is None and not _depends_on(node.inputs[other], chain.output):
            return out, _pad(ids, out)  # (x·σ)⊙g = (x⊙g)·σ for an activation g not scaled itself (SwiGLU's up → down)
        if const_array(node.inputs[other]) is None:
            raise Refused(f"{node_label(node)} combines the scaled tensor with another activation")
        if op == "Div" and index == 1:
            raise Refused(f"{node_label(node)} divides by the scaled tensor")
        if op in ("Add", "Sub"):
            chain.edits.append(Edit(node, other, ids))
        return out, _pad(ids, out)
    if op in ("Min", "Max") and len(node.inputs) == 2:
        if const_array(node.inputs[1 - index]) is None:
            raise Refused(f"{node_label(node)} combines the scaled tensor with another activation")
        chain.edits.append(Edit(node, 1 - index, ids))  # min(x·σ, c·σ) = min(x, c)·σ
        return out, _pad(ids, out)
    if op in _POOLS and index == 0:
        if ids.ndim < 2 or any(d > 1 for d in ids.shape[2:]):
            raise Refused(f"{node_label(node)} pools over the scaled channels")
        return out, ids  # max(σx) = σ·max(x), mean(σx) = σ·mean(x) per channel
    if op in ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze") and index == 0:
        return out, _layout(node, value, ids, shapes)
    if op == "MatMul":
        return out, _matmul(node, index, ids)
    raise Refused(f"{node_label(node)} does not commute with per-channel scaling")


# -- consumers ---------------------------------------------------------------------------


def _consumer(node: ir.Node, index: int, value: ir.Value, ids: np.ndarray) -> Consumer | None:
    """The consumer record if ``node`` absorbs the scale in its weight, else None."""
    if node.op_type not in LINEAR or index != 0 or len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    w = const_array(weight)
    if w is None:
        return None  # a MatMul of two activations: traced as data movement
    rank = ids.ndim
    if node.op_type == "MatMul":
        if w.ndim != 2:
            raise Refused(f"{node_label(node)}: batched constant weight")
        axis = rank - 1
    elif node.op_type == "Gemm":
        if _int_attr(node, "transA", 0):
            raise Refused(f"{node_label(node)}: Gemm with transA")
        axis = 1
    else:
        if node.op_type == "ConvTranspose" and _int_attr(node, "group", 1) != 1:
            raise Refused(f"{node_label(node)}: grouped ConvTranspose")
        axis = 1
    if weight.is_graph_input() or any(use.node is not node for use in weight.uses()):
        raise Refused(f"{node_label(node)}: weight '{weight.name}' is shared with another node")
    spread = [a for a in range(rank) if a != axis and ids.shape[a] > 1]
    if spread:
        raise Refused(f"{node_label(node)}: channels of its input lie on axes {spread}, not only on the contraction axis")
    channels = _consumer_channels(node, w)
    rows = np.broadcast_to(ids.reshape(-1), (channels,)) if ids.shape[axis] == 1 else ids.reshape(-1)
    if rows.size != channels:
        raise Refused(f"{node_label(node)}: {rows.size} scaled channels but {channels} weight rows")
    return Consumer(node, value, axis, np.array(rows))


def _consumer_channels(node: ir.Node, w: np.ndarray) -> int:
    if node.op_type == "MatMul":
        return w.shape[0]
    if node.op_type == "Gemm":
        return w.shape[1] if _int_attr(node, "transB", 0) else w.shape[0]
    if node.op_type == "Conv":
        return w.shape[1] * _int_attr(node, "group", 1)
    return w.shape[0]  # ConvTranspose: (C_in, C_out/group, k...)


# -- layout ---------------------------------------------------------------------------


def _pad(ids: np.ndarray, out: ir.Value) -> np.ndarray:
    """ids for an elementwise output that may have a higher rank (broadcasting)."""
    rank = len(out.shape) if out.shape is not None else ids.ndim
    if rank < ids.ndim:
        raise Refused(f"'{out.name}' has a lower rank than its input")
    return ids.reshape((1,) * (rank - ids.ndim) + ids.shape)


def _layout(node: ir.Node, value: ir.Value, ids: np.ndarray, shapes) -> np.ndarray:
    op = node.op_type
    if op == "Transpose":
        perm = node.attributes.get("perm")
        order = list(perm.as_ints()) if perm is not None else list(range(ids.ndim))[::-1]
        return ids.transpose(order)
    if op == "Squeeze":
        axes = _axes(node, ids.ndim)
        if axes is None:
            axes = [a for a, d in enumerate(dims(value, shapes) or []) if d == 1]
        if any(ids.shape[a] != 1 for a in axes):
            raise Refused(f"{node_label(node)} squeezes a channel axis")
        return ids.squeeze(tuple(axes))
    if op == "Unsqueeze":
        out_rank = len(node.outputs[0].shape) if node.outputs[0].shape is not None else None
        axes = _axes(node, out_rank)
        if axes is None or out_rank is None:
            raise Refused(f"{node_label(node)}: unknown axes")
        return np.expand_dims(ids, tuple(sorted(axes)))
    in_dims = dims(value, shapes)
    if in_dims is None or len(in_dims) != ids.ndim:
        raise Refused(f"{node_label(node)}: unknown input rank")
    in_dims = [ids.shape[a] if ids.shape[a] > 1 else d for a, d in enumerate(in_dims)]
    out_dims = _flatten_dims(node, in_dims, shapes) if op == "Flatten" else _reshape_dims(node, in_dims, shapes)
    if out_dims is None:
        raise Refused(f"{node_label(node)}: unknown output rank")
    return regroup(ids, in_dims, out_dims, node_label(node))


def regroup(ids: np.ndarray, a: list[int | None], b: list[int | None], where: str = "reshape") -> np.ndarray:
    """ids laid out over dims ``a`` after a row-major reshape to dims ``b``.

    Axes are grouped from the right into blocks with equal products (a split
    ``C → (h, d)`` or a merge ``(h, d) → C``); blocks that carry channels are
    reshaped, blocks that do not stay size 1. Dims left of the last channel block
    may be unknown.
    """
    channel_axes = [k for k in range(ids.ndim) if ids.shape[k] > 1]
    if not channel_axes:
        return ids.reshape([1] * len(b))
    lowest = channel_axes[0]
    i, j = len(a) - 1, len(b) - 1
    a_eff, b_eff = [1] * len(a), [1] * len(b)
    while i >= lowest:
        if j < 0 or a[i] is None or b[j] is None:
            raise Refused(f"{where}: cannot match the reshape's axes (unknown or mismatched dims)")
        group_a, group_b, pa, pb = [i], [j], a[i], b[j]
        while pa != pb:
            if pa < pb:
                i -= 1
                if i < 0 or a[i] is None:
                    raise Refused(f"{where}: cannot match the reshape's axes")
                pa *= a[i]
                group_a.append(i)
            else:
                j -= 1
                if j < 0 or b[j] is None:
                    raise Refused(f"{where}: cannot match the reshape's axes")
                pb *= b[j]
                group_b.append(j)
        if any(ids.shape[k] > 1 for k in group_a):
            for k in group_a:
                a_eff[k] = a[k]
            for k in group_b:
                b_eff[k] = b[k]
        i, j = i - 1, j - 1
    return np.broadcast_to(ids, a_eff).reshape(b_eff)


def _reshape_dims(node: ir.Node, in_dims: list[int | None], shapes) -> list[int | None] | None:
    out = dims(node.outputs[0], shapes)
    target = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if target is None:
        return out
    target = [int(t) for t in target.reshape(-1)]
    out = out if out is not None and len(out) == len(target) else [None] * len(target)
    allow_zero = _int_attr(node, "allowzero", 0)
    for k, t in enumerate(target):
        if out[k] is None:
            if t > 0:
                out[k] = t
            elif t == 0 and not allow_zero and k < len(in_dims):
                out[k] = in_dims[k]
    if sum(d is None for d in out) == 1 and all(d is not None for d in in_dims):
        known = math.prod(d for d in out if d is not None)
        if known:
            out[out.index(None)] = math.prod(in_dims) // known
    return out


def _flatten_dims(node: ir.Node, in_dims: list[int | None], shapes) -> list[int | None]:
    out = dims(node.outputs[0], shapes)
    if out is not None and len(out) == 2 and None not in out:
        return out
    axis = _int_attr(node, "axis", 1) % max(len(in_dims), 1)

    def prod(ds):
        return None if None in ds else math.prod(ds)

    return [prod(in_dims[:axis]), prod(in_dims[axis:])]


def _matmul(node: ir.Node, index: int, ids: np.ndarray) -> np.ndarray:
    """``A @ B`` with one operand scaled: its channels must avoid the contraction axis."""
    if ids.ndim < 2:
        raise Refused(f"{node_label(node)}: a vector operand")
    contraction = ids.ndim - 1 if index == 0 else ids.ndim - 2
    if ids.shape[contraction] > 1:
        raise Refused(f"{node_label(node)} contracts over the scaled channels")
    return _pad(ids, node.outputs[0])


# -- small helpers --------------------------------------------------------------------


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _axes(node: ir.Node, rank: int | None) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = const_array(node.inputs[1])
        if axes is None:
            return None
        axes = [int(a) for a in axes.reshape(-1)]
    elif "axes" in node.attributes:
        axes = list(node.attributes["axes"].as_ints())
    else:
        return None
    if rank is None:
        return axes if all(a >= 0 for a in axes) else None
    return [a % rank for a in axes]


def _bound(node: ir.Node, index: int) -> float | None:
    """A Clip bound: None when absent; refuses a bound that is not a constant scalar."""
    if len(node.inputs) <= index or node.inputs[index] is None:
        return None
    array = const_array(node.inputs[index])
    if array is None or array.size != 1:
        raise Refused(f"{node_label(node)}: Clip bound is not a constant scalar")
    return float(array.reshape(-1)[0])
