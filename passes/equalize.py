"""Per-channel scale folding shared by ``smooth-quant`` and ``cross-layer-equalization``.

A *producer* P writes a tensor ``Y`` with channels ``j``; its chain (see
:mod:`channel_tracker`) leads to consumers ``Z_k = X_k·W_k`` that read ``Y`` through
ops that commute with per-channel scaling. For any ``s > 0``:

    Y' = Y·diag(s)⁻¹      folded into P: weight columns and bias / s (MatMul, Gemm, Conv),
                          or the affine γ, β / s (LayerNormalization, RMSNormalization,
                          Mul by a per-channel constant)
    W_k' = diag(s)·W_k    folded into the consumers' weight rows (input channels)

so ``Z_k`` is unchanged; constants added on the path (biases, ReLU6 bounds) are
divided by ``s`` too. The passes only differ in how they choose ``s``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompiler.graph import NameFactory, add_initializer, const_array, node_label, set_initializer_array
from qcompiler.instruments import max_relative_error

from qcompiler.passes.channel_tracker import Chain, Consumer, Refused, start_ids, trace

NORMS = ("LayerNormalization", "RMSNormalization")


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _sole_user(value: ir.Value, node: ir.Node) -> bool:
    return not value.is_graph_input() and all(use.node is node for use in value.uses())


@dataclasses.dataclass
class Producer:
    """Where ``1/s`` is folded: ``kind`` is ``linear`` or ``norm``; channels on ``axis`` of the output."""

    node: ir.Node
    kind: str
    axis: int
    channels: int

    @property
    def output(self) -> ir.Value:
        return self.node.outputs[0]

    @property
    def label(self) -> str:
        return node_label(self.node)


def producer_of(node: ir.Node, kinds: tuple[str, ...]) -> Producer | None:
    """``node`` as a producer of a kind in ``kinds``, else None; raises Refused for a
    candidate that cannot be rescaled (shared weight, non-constant bias...)."""
    if node.domain not in ("", "ai.onnx") or not node.outputs or node.outputs[0].shape is None:
        return None
    rank = len(node.outputs[0].shape)
    op = node.op_type
    if "linear" in kinds and op in ("MatMul", "Gemm", "Conv", "ConvTranspose") and len(node.inputs) >= 2:
        w = const_array(node.inputs[1])
        if w is None or const_array(node.inputs[0]) is not None:
            return None
        if op == "MatMul" and w.ndim != 2:
            return None
        if not _sole_user(node.inputs[1], node):
            raise Refused(f"{node_label(node)}: weight '{node.inputs[1].name}' is shared with another node")
        if len(node.inputs) > 2 and node.inputs[2] is not None and const_array(node.inputs[2]) is None:
            raise Refused(f"{node_label(node)}: non-constant bias")
        if op == "MatMul":
            return Producer(node, "linear", rank - 1, w.shape[1])
        if op == "Gemm":
            return Producer(node, "linear", 1, w.shape[0] if _int_attr(node, "transB", 0) else w.shape[1])
        if op == "Conv":
            return Producer(node, "linear", 1, w.shape[0])
        if _int_attr(node, "group", 1) != 1:
            raise Refused(f"{node_label(node)}: grouped ConvTranspose")
        return Producer(node, "linear", 1, w.shape[1])
    if "norm" not in kinds:
        return None
    if op in NORMS:
        gamma = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if gamma is None:
            return None
        if _int_attr(node, "axis", -1) % rank != rank - 1 or gamma.ndim != 1:
            raise Refused(f"{node_label(node)} normalizes over more than the last axis")
        if len(node.inputs) > 2 and node.inputs[2] is not None and const_array(node.inputs[2]) is None:
            raise Refused(f"{node_label(node)}: non-constant bias")
        return Producer(node, "norm", rank - 1, gamma.size)
    if op == "Mul" and len(node.inputs) == 2:  # RMSNorm's affine: x̂ · γ with a per-channel γ
        for index in (0, 1):
            gamma = const_array(node.inputs[index])
            if gamma is None or const_array(node.inputs[1 - index]) is not None:
                continue
            if gamma.size > 1 and gamma.ndim <= rank and gamma.shape[-1] == gamma.size:
                return Producer(node, "norm", rank - 1, gamma.size)
    return None


# -- constants ---------------------------------------------------------------------------


class Folder:
    """Writes rescaled constants: in place when the initializer is only this node's,
    else as a fresh initializer (a shared bias or a Constant node output).

    The folding functions below only call ``read``/``write``/``scale``/``expand``: the
    learning stage (``learn-quant``) runs them on torch tensors through its own folder,
    so the transforms it learns are exactly the ones folded here."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.names = NameFactory(graph)

    def read(self, node: ir.Node, index: int) -> np.ndarray:
        return const_array(node.inputs[index]).astype(np.float64)

    def write(self, node: ir.Node, index: int, array: np.ndarray) -> None:
        value = node.inputs[index]
        dtype = const_array(value).dtype
        array = np.ascontiguousarray(array, dtype=dtype)
        if value.is_initializer() and _sole_user(value, node):
            set_initializer_array(value, array)
        else:
            node.replace_input_with(index, add_initializer(self.graph, self.names(f"{value.name or 'const'}_eq"), array))

    def expand(self, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return np.broadcast_to(array, shape)

    def scale(self, node: ir.Node, index: int, factor: np.ndarray) -> None:
        """``inputs[index] ← inputs[index] · factor`` (broadcasting, keeping the constant's
        rank where the extra leading axes are 1; absent inputs are skipped)."""
        if len(node.inputs) > index and node.inputs[index] is not None:
            c = self.read(node, index)
            out = c * factor
            while out.ndim > c.ndim and out.shape[0] == 1:
                out = out[0]
            self.write(node, index, out)


def _along(vector: np.ndarray, axis: int, rank: int) -> np.ndarray:
    shape = [1] * rank
    shape[axis] = -1
    return vector.reshape(shape)


def scale_producer(folder: Folder, p: Producer, sigma: np.ndarray) -> None:
    """Multiply P's output channel j by ``sigma[j]``."""
    node, op = p.node, p.node.op_type
    if p.kind == "norm":
        if op in NORMS:
            folder.scale(node, 1, sigma)
            folder.scale(node, 2, sigma)
        else:
            index = 0 if const_array(node.inputs[0]) is not None else 1
            gamma = folder.read(node, index)
            folder.write(node, index, folder.expand(gamma, tuple(gamma.shape[:-1]) + (p.channels,)) * sigma)
        return
    w = folder.read(node, 1)
    if op == "MatMul":
        folder.write(node, 1, w * sigma[None, :])
    elif op == "Gemm":
        folder.write(node, 1, w * (sigma[:, None] if _int_attr(node, "transB", 0) else sigma[None, :]))
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = folder.read(node, 2)
            folder.write(node, 2, folder.expand(c, np.broadcast_shapes(tuple(c.shape), tuple(sigma.shape))) * sigma)
    else:
        folder.write(node, 1, w * _along(sigma, 0 if op == "Conv" else 1, w.ndim))
        folder.scale(node, 2, sigma)


def producer_ranges(p: Producer) -> np.ndarray:
    """``max|W|`` per output channel of a linear producer."""
    w = np.abs(const_array(p.node.inputs[1]).astype(np.float64))
    op = p.node.op_type
    if op == "MatMul" or (op == "Gemm" and not _int_attr(p.node, "transB", 0)):
        return w.max(axis=0)
    if op == "ConvTranspose":
        return np.moveaxis(w, 1, 0).reshape(w.shape[1], -1).max(axis=1)
    return w.reshape(w.shape[0], -1).max(axis=1)


def _conv_rows(node: ir.Node, w: np.ndarray) -> np.ndarray:
    """Input channel of each ``W[o, c_local]`` of a (grouped) Conv: ``(o // opg)·cpg + c_local``."""
    groups = _int_attr(node, "group", 1)
    out_per_group, in_per_group = w.shape[0] // groups, w.shape[1]
    o = np.arange(w.shape[0])[:, None]
    return (o // out_per_group) * in_per_group + np.arange(in_per_group)[None, :]


def consumer_ranges(c: Consumer) -> np.ndarray:
    """``max|W|`` per input channel (weight row) of a consumer."""
    node = c.node
    w = np.abs(const_array(node.inputs[1]).astype(np.float64))
    if node.op_type == "MatMul" or (node.op_type == "Gemm" and not _int_attr(node, "transB", 0)):
        return w.max(axis=1)
    if node.op_type == "Gemm":
        return w.max(axis=0)
    if node.op_type == "ConvTranspose":
        return w.reshape(w.shape[0], -1).max(axis=1)
    rows = _conv_rows(node, w)
    out = np.zeros(rows.max() + 1)
    np.maximum.at(out, rows.reshape(-1), w.reshape(w.shape[0] * w.shape[1], -1).max(axis=1))
    return out


def consumer_matrix(c: Consumer) -> np.ndarray | None:
    """The consumer as ``Z = X·M`` (M: in × out) when it is a plain matrix product, else None."""
    node = c.node
    w = const_array(node.inputs[1]).astype(np.float32)
    if node.op_type == "MatMul":
        return w
    if node.op_type == "Gemm":
        return w.T if _int_attr(node, "transB", 0) else w
    if node.op_type == "Conv" and _int_attr(node, "group", 1) == 1 and all(d == 1 for d in w.shape[2:]):
        return w.reshape(w.shape[0], w.shape[1]).T
    return None


def scale_consumer(folder: Folder, c: Consumer, s: np.ndarray) -> None:
    """Multiply the consumer's weight row (input channel) k by ``s[k]``."""
    node = c.node
    w = folder.read(node, 1)
    if node.op_type == "MatMul" or (node.op_type == "Gemm" and not _int_attr(node, "transB", 0)):
        folder.write(node, 1, w * s[:, None])
    elif node.op_type == "Gemm":
        folder.write(node, 1, w * s[None, :])
    elif node.op_type == "ConvTranspose":
        folder.write(node, 1, w * _along(s, 0, w.ndim))
    else:
        factor = s[_conv_rows(node, w)]
        folder.write(node, 1, w * factor.reshape(factor.shape + (1,) * (w.ndim - 2)))


# -- chains -----------------------------------------------------------------------------


@dataclasses.dataclass
class Pair:
    producer: Producer
    chain: Chain

    def reduce(self, per_row) -> np.ndarray:
        """Max over consumers of a per-weight-row quantity ``per_row(consumer)``, in producer channels."""
        out = np.zeros(self.producer.channels)
        for consumer in self.chain.consumers:
            np.maximum.at(out, consumer.rows, per_row(consumer))
        return out


def find_pairs(model: ir.Model, kinds: tuple[str, ...], relu6: bool = False,
               shapes: dict | None = None) -> tuple[list[Pair], list[tuple[str, str]]]:
    """Every producer whose scale can be folded exactly, and ``(producer, reason)`` for the rest.

    Chains never overlap: a tensor already scaled by an earlier chain refuses a later one.
    """
    pairs, refused = [], []
    claimed: dict[int, str] = {}
    for node in model.graph:
        try:
            producer = producer_of(node, kinds)
            if producer is None:
                continue
            ids = start_ids(len(producer.output.shape), producer.axis, producer.channels)
            chain = trace(producer.output, ids, relu6=relu6, shapes=shapes)
            clash = next((claimed[id(v)] for v in chain.values if id(v) in claimed), None)
            if clash:
                raise Refused(f"overlaps the chain of {clash}")
        except Refused as exc:
            refused.append((node_label(node), str(exc)))
            continue
        for value in chain.values:
            claimed[id(value)] = producer.label
        pairs.append(Pair(producer, chain))
    return pairs, refused


def apply_scale(folder: Folder, pair: Pair, s: np.ndarray) -> None:
    """Fold ``Y' = Y/s`` into the producer and the path, ``diag(s)·W`` into the consumers."""
    sigma = 1.0 / s
    scale_producer(folder, pair.producer, sigma)
    for edit in pair.chain.edits:
        folder.scale(edit.node, edit.index, sigma[edit.ids])
    for clip in pair.chain.clips:
        _clip_to_min(folder, clip.node, sigma[clip.ids])
    for consumer in pair.chain.consumers:
        scale_consumer(folder, consumer, s[consumer.rows])


def _clip_to_min(folder: Folder, clip: ir.Node, sigma: np.ndarray) -> None:
    """``Clip(x, 0, h)`` on a scaled input → ``Min(Relu(x), h·σ)`` (per-channel upper bound)."""
    graph = folder.graph
    high = const_array(clip.inputs[2])
    bound = add_initializer(graph, folder.names(f"{clip.name or 'clip'}_bound"), (high.astype(np.float64) * sigma).astype(high.dtype))
    relu = ir.node("Relu", [clip.inputs[0]], name=folder.names(f"{clip.name or 'clip'}_relu"))
    minimum = ir.node("Min", [relu.outputs[0], bound], name=folder.names(f"{clip.name or 'clip'}_min"))
    old = clip.outputs[0]
    for v in (relu.outputs[0], minimum.outputs[0]):
        v.dtype, v.shape = old.dtype, old.shape
    relu.outputs[0].name = folder.names(f"{old.name}_relu")
    graph.insert_after(clip, [relu, minimum])
    old.replace_all_uses_with(minimum.outputs[0])
    name = old.name
    graph.remove(clip, safe=True)
    minimum.outputs[0].name = name


def measured_shapes(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Shapes of the node outputs on one sample, when some are symbolic (else empty)."""
    from qcompiler.calibration import _Runner

    names = [v.name for node in model.graph for v in node.outputs
             if v.name and v.shape is not None and not all(isinstance(d, int) for d in v.shape)]
    if not names:
        return {}
    return {name: tuple(np.shape(array)) for name, array in _Runner(model, names)(feeds).items()}


# -- the exactness check -------------------------------------------------------------------


class EquivalenceCheck:
    """Outputs on one sample before and after a rewrite; ``verify`` fails past ``tolerance``."""

    def __init__(self, model: ir.Model, feeds: dict[str, np.ndarray], who: str, tolerance: float = 1e-4):
        self.feeds, self.who, self.tolerance = feeds, who, tolerance
        self.before = self._run(model)

    def _run(self, model: ir.Model) -> list[np.ndarray]:
        from qcompiler.calibration import _Runner

        names = [v.name for v in model.graph.outputs]
        results = _Runner(model, names)(self.feeds)
        return [np.asarray(results[n]) for n in names]

    def verify(self, model: ir.Model) -> float:
        after = self._run(model)
        error = max((max_relative_error(a, b) for a, b in zip(self.before, after) if a.dtype.kind == "f"), default=0.0)
        if not error <= self.tolerance:
            raise RuntimeError(f"{self.who}: outputs moved by {error:.3g} (relative) after rescaling: a bug in the pass")
        return error
