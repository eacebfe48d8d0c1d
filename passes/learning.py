"""The learnable parameters of ``learn-quant`` on one fake-quant model, and their write-back.

:class:`Learner` wires the quantizers of :mod:`qcompiler.learned_quantizers` into a
:class:`~qcompiler.torch_graph.TorchGraph` of the fake-quant model:

* each activation ``QuantizeLinear``/``DequantizeLinear`` of a learnable plan group runs
  that group's :class:`ActivationRange` (one per group: tensors sharing parameters keep
  sharing them);
* each weight ``DequantizeLinear`` runs a :class:`ClippedWeight` on the float weight from
  the float reference model (same node name, same input), after the equivalent
  transforms of the step are folded into it, with learned clipping and (optionally)
  learned rounding offsets that start at the calibrated integers;
* constants the transforms change (norm γ/β, biases on the path) are fed from the
  folded values.

:meth:`Learner.write_back` stores the learned values as the model's constants.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from qcompiler import qstate
from qcompiler.graph import NameFactory, add_initializer, const_array, set_initializer_array
from qcompiler.learned_quantizers import ActivationRange, ChannelScale, ClippedWeight
from qcompiler.passes.equalize import Folder, apply_scale, find_pairs
from qcompiler.passes.fake_quant import quantize_biases
from qcompiler.qdq import BOUNDED_RANGES, LINEAR_OPS, input_derived
from qcompiler.quant import QFormat
from qcompiler.torch_graph import TorchGraph, to_torch

#: Integer storage types of weights: (bits, signed).
_WEIGHT_TYPES = {
    ir.DataType.INT4: (4, True), ir.DataType.UINT4: (4, False), ir.DataType.INT8: (8, True),
    ir.DataType.UINT8: (8, False), ir.DataType.INT16: (16, True), ir.DataType.UINT16: (16, False),
}
_ACTIVATION_RANGES = {
    ir.DataType.INT8: (-128, 127), ir.DataType.UINT8: (0, 255), ir.DataType.INT16: (-32768, 32767),
    ir.DataType.UINT16: (0, 65535),
}


class _TorchFolder(Folder):
    """The equalize folder on torch tensors: values keyed by (node name, input index)."""

    def __init__(self, base):
        self.base = base
        self.values: dict[tuple[str, int], torch.Tensor] = {}

    def read(self, node: ir.Node, index: int) -> torch.Tensor:
        key = (node.name, index)
        return self.values[key] if key in self.values else self.base(*key)

    def write(self, node: ir.Node, index: int, array) -> None:
        self.values[(node.name, index)] = array

    def expand(self, array, shape):
        return array.expand(tuple(shape))


def _weight_range(dtype: ir.DataType, zero: np.ndarray) -> tuple[int, int]:
    bits, signed = _WEIGHT_TYPES[dtype]
    symmetric = signed and not np.any(zero)
    return QFormat(bits=bits, signed=signed, symmetric=symmetric).qrange


def plan_quantizers(model: ir.Model, plan: dict) -> dict[str, list[ir.Node]]:
    """Plan group → the QuantizeLinear nodes of its tensors (a graph output's quantized
    value keeps the output's name, so its Q is found through the DQ that took it)."""
    by_name = {v.name: v for n in model.graph for v in n.outputs}
    by_name.update({v.name: v for v in model.graph.inputs})
    groups: dict[str, list[ir.Node]] = {}
    for tensor, entry in plan.items():
        value = by_name.get(tensor)
        if value is None:
            continue
        producer = value.producer()
        if producer is not None and producer.op_type == "DequantizeLinear" and producer.inputs[0].producer() is not None \
                and producer.inputs[0].producer().op_type == "QuantizeLinear":
            quantizers = [producer.inputs[0].producer()]
        else:
            quantizers = [u.node for u in value.uses() if u.node.op_type == "QuantizeLinear" and u.idx == 0]
        for q in quantizers:
            if const_array(q.inputs[1]) is not None and const_array(q.inputs[1]).size == 1:
                groups.setdefault(entry["group"], []).append(q)
    return groups


def frozen_groups(model: ir.Model, plan: dict) -> set[str]:
    """Groups whose range is not learned: bounded outputs (softmax, sigmoid, tanh) and
    tensors computed from integer inputs only (masks)."""
    by_name = {v.name: v for n in model.graph for v in n.outputs}
    derived = input_derived(model)
    frozen = set()
    for tensor, entry in plan.items():
        value = by_name.get(tensor)
        producer = value.producer() if value is not None else None
        if (producer is not None and producer.op_type in BOUNDED_RANGES) or (value is not None and id(value) in derived):
            frozen.add(entry["group"])
    return frozen


class Learner:
    """Learnable quantization of one fake-quant model against its float reference."""

    def __init__(self, model: ir.Model, float_model: ir.Model, plan: dict, *, ranges: bool = True,
                 clipping: bool = True, transforms: bool = True, objective: str = "mse"):
        self.model, self.plan, self.objective = model, plan, objective
        self._float_nodes = {n.name: n for n in float_model.graph}
        self._nodes = {n.name: n for n in model.graph}
        self._base_cache: dict[tuple[str, int], torch.Tensor] = {}
        self.current: dict[tuple[str, int], torch.Tensor] = {}
        self.float_graph = TorchGraph(float_model)
        self.plain_graph = TorchGraph(model)
        node_hooks: dict = {}
        self.weights = self._weights(node_hooks, clipping)
        self.pairs, self.scales, self.refused = self._pairs(float_model) if transforms else ([], [], [])
        self.activations = self._activations(node_hooks) if ranges else {}
        input_hooks = {}
        for key in self._transformed_keys():
            if key not in self._weight_keys:
                input_hooks[key] = (lambda k=key: self.current[k])
        self.graph = TorchGraph(model, node_hooks, input_hooks, share_constants=self.plain_graph)
        self.targets: list[dict[str, torch.Tensor]] = []
        self.masks: list[torch.Tensor | None] = []

    # -- parameters ------------------------------------------------------------------------

    def _base(self, name: str, index: int) -> torch.Tensor:
        key = (name, index)
        if key not in self._base_cache:
            value = self._float_nodes[name].inputs[index]
            shared = self.float_graph.constant(value)
            self._base_cache[key] = shared.float() if shared is not None else \
                to_torch(np.asarray(const_array(value), np.float32))
        return self._base_cache[key]

    def _weight_now(self, key: tuple[str, int]) -> torch.Tensor:
        return self.current[key] if key in self.current else self._base(*key)

    def _weights(self, node_hooks: dict, clipping: bool) -> dict[str, tuple[ClippedWeight, tuple[str, int], ir.Node]]:
        """Every weight DequantizeLinear whose float weight the reference model has."""
        weights = {}
        self._weight_keys: set[tuple[str, int]] = set()
        for node in self.model.graph:
            if node.op_type not in LINEAR_OPS or len(node.inputs) < 2 or node.inputs[1] is None:
                continue
            dq = node.inputs[1].producer()
            if dq is None or dq.op_type != "DequantizeLinear" or dq.name in weights:
                continue
            data, reference = const_array(dq.inputs[0]), self._float_nodes.get(node.name)
            if data is None or dq.inputs[0].dtype not in _WEIGHT_TYPES or reference is None \
                    or reference.op_type != node.op_type:
                continue
            w = const_array(reference.inputs[1])
            if w is None or w.dtype != np.float32 or w.shape != data.shape:
                continue
            scale = np.asarray(const_array(dq.inputs[1]), np.float32)
            zero = const_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else np.zeros(scale.shape, np.int8)
            zero = np.asarray(zero).astype(np.int64)
            qmin, qmax = _weight_range(dq.inputs[0].dtype, zero)
            axis = None if scale.ndim == 0 or scale.size == 1 and "block_size" not in dq.attributes else \
                (dq.attributes["axis"].as_int() if "axis" in dq.attributes else 1) % data.ndim
            block = dq.attributes["block_size"].as_int() if "block_size" in dq.attributes else 0
            key = (node.name, 1)
            clipped = ClippedWeight(self._base(*key), scale.reshape(-1) if axis is not None and not block else scale,
                                    zero.reshape(scale.shape) if axis is None or block else zero.reshape(-1),
                                    qmin, qmax, axis, block)
            clipped.upper.requires_grad_(clipping)
            clipped.lower.requires_grad_(clipping and not clipped.symmetric)
            shared = len({id(u.node) for u in dq.outputs[0].uses()}) > 1
            weights[dq.name] = (clipped, key, dq, shared)
            self._weight_keys.add(key)
            node_hooks[dq.name] = lambda n, inputs, c=clipped, k=key: [c(self._weight_now(k))]
        return weights

    def _pairs(self, float_model: ir.Model):
        pairs, refused = find_pairs(float_model, ("norm", "linear"))
        kept, scales, reasons = [], [], [(p, r) for p, r in refused]
        for pair in pairs:
            folder = _TorchFolder(self._base)
            apply_scale(folder, pair, torch.ones(pair.producer.channels))
            problem = self._pair_problem(pair, folder.values)
            if problem:
                reasons.append((pair.producer.label, problem))
                continue
            kept.append(pair)
            scales.append(ChannelScale(pair.producer.channels))
        return kept, scales, reasons

    def _pair_problem(self, pair, keys) -> str | None:
        if pair.chain.clips:
            return "a ReLU6 on the path"
        for name, index in keys:
            node = self._nodes.get(name)
            if node is None or node.op_type != self._float_nodes[name].op_type:
                return f"node '{name}' is not in the fake-quant model as it is in the float one"
            value = node.inputs[index]
            producer = value.producer() if value is not None else None
            if producer is None or producer.op_type == "Constant":
                continue
            dq = self.weights.get(producer.name)
            if dq is not None:
                if dq[3] or index != 1:
                    return f"weight of '{name}' is shared"
                continue
            if producer.op_type in ("DequantizeLinear", "Reshape") and _is_constant_dq(value):
                continue  # a quantized bias: fed as float while learning, re-quantized after
            return f"input {index} of '{name}' is computed, not a constant"
        return None

    def _activations(self, node_hooks: dict) -> dict[str, tuple[ActivationRange, list[ir.Node], list[ir.Node]]]:
        frozen = frozen_groups(self.model, self.plan)
        formats = {entry["group"]: QFormat.parse(entry["format"]) for entry in self.plan.values()}
        out = {}
        for group, quantizers in plan_quantizers(self.model, self.plan).items():
            if group in frozen:
                continue
            first = quantizers[0]
            zero_value = const_array(first.inputs[2]) if len(first.inputs) > 2 and first.inputs[2] is not None else None
            dtype = first.outputs[0].dtype
            if zero_value is None or dtype not in _ACTIVATION_RANGES:
                continue
            qmin, qmax = _ACTIVATION_RANGES[dtype]
            fmt = formats[group]
            learned = ActivationRange(float(const_array(first.inputs[1]).reshape(())), int(zero_value.reshape(())),
                                      qmin, qmax, symmetric=fmt.symmetric)
            dequantizers = []
            for q in quantizers:
                node_hooks[q.name] = lambda n, inputs, a=learned: [a.quantize(inputs[0])]
                for use in q.outputs[0].uses():
                    if use.node.op_type == "DequantizeLinear":
                        dequantizers.append(use.node)
                        node_hooks[use.node.name] = lambda n, inputs, a=learned: [a.dequantize(inputs[0])]
            out[group] = (learned, quantizers, dequantizers)
        return out

    def _transformed_keys(self) -> set[tuple[str, int]]:
        folder = _TorchFolder(self._base)
        for pair in self.pairs:
            apply_scale(folder, pair, torch.ones(pair.producer.channels))
        return set(folder.values)

    def parameters(self) -> list[torch.nn.Parameter]:
        params = [p for a, _, _ in self.activations.values() for p in a.parameters()]
        params += [p for c, _, _, _ in self.weights.values() for p in c.parameters()]
        params += [p for s in self.scales for p in s.parameters()]
        return params

    def summary(self) -> dict:
        return {
            "activation_ranges": len(self.activations),
            "clipped_weights": sum(1 for c, *_ in self.weights.values() if c.upper.requires_grad),
            "transform_pairs": len(self.pairs),
            "transform_refused": len(self.refused),
        }

    # -- loss ----------------------------------------------------------------------------

    def _fold(self) -> None:
        folder = _TorchFolder(self._base)
        for pair, scale in zip(self.pairs, self.scales, strict=True):
            apply_scale(folder, pair, scale())
        self.current = folder.values

    def set_targets(self, samples: list[dict[str, np.ndarray]], valid_mask: str | None) -> None:
        """The float reference's outputs on ``samples`` (and the loss mask of each)."""
        with torch.no_grad():
            self.targets = [{k: v for k, v in self.float_graph(s).items() if v.is_floating_point()} for s in samples]
        self.masks = [to_torch(np.asarray(s[valid_mask]) != 0) if valid_mask else None for s in samples]

    def loss(self, feeds: dict[str, np.ndarray], index: int, learned: bool = True) -> torch.Tensor:
        """``Σ_outputs ‖Ŷ − Y‖² / ‖Y‖²`` on sample ``index`` (positions where the mask is 0 left out)."""
        if learned:
            self._fold()
            outputs = self.graph(feeds)
        else:
            outputs = self.plain_graph(feeds)
        return self._loss_from(outputs, index)

    def _loss_from(self, outputs: dict[str, torch.Tensor], index: int) -> torch.Tensor:
        """``mse``: ``Σ ‖Ŷ − Y‖² / ‖Y‖²``; ``kl``: the mean over positions of
        ``KL(softmax(Y) ‖ softmax(Ŷ))`` along the last axis (logits: distillation)."""
        total = torch.zeros(())
        mask = self.masks[index]
        for name, target in self.targets[index].items():
            out = outputs[name].float()
            weight = None
            if mask is not None and tuple(target.shape[: mask.dim()]) == tuple(mask.shape):
                weight = mask.reshape(tuple(mask.shape) + (1,) * (target.dim() - mask.dim())).float()
            if self.objective == "kl":
                p = torch.log_softmax(target, dim=-1)
                per_row = (p.exp() * (p - torch.log_softmax(out, dim=-1))).sum(dim=-1, keepdim=True)
                if weight is not None:
                    weight = weight.expand_as(per_row)
                    total = total + (per_row * weight).sum() / torch.clamp(weight.sum(), min=1.0)
                else:
                    total = total + per_row.mean()
                continue
            diff, norm = (out - target) ** 2, target**2
            if weight is not None:
                diff, norm = diff * weight, norm * weight
            total = total + diff.sum() / torch.clamp(norm.sum(), min=1e-30)
        return total

    def mean_loss(self, samples: list, learned: bool) -> float:
        with torch.no_grad():
            return float(np.mean([float(self.loss(s, i, learned)) for i, s in enumerate(samples)]))

    # -- write-back ----------------------------------------------------------------------

    def final_values(self, hessians: dict | None = None) -> dict:
        """What the learned parameters make of the model's constants, by node name:
        ``floats`` (folded norms and biases), ``weights`` (DequantizeLinear name → integers,
        scale, zero point; GPTQ with the learned scales where ``hessians`` of the transformed
        float model's layer inputs are given) and ``activations`` (group → scale, zero point)."""
        floats, weights, activations = {}, {}, {}
        with torch.no_grad():
            self._fold()
            for key, value in self.current.items():
                if key not in self._weight_keys:
                    floats[key] = value.numpy().astype(np.float32)
            for name, (clipped, key, dq, _) in self.weights.items():
                if not clipped.upper.requires_grad and key not in self.current and hessians is None:
                    continue  # nothing learned for it: the calibrated integers stay
                w = self._weight_now(key)
                data_dtype = const_array(dq.inputs[0]).dtype
                float_input = self._float_nodes[key[0]].inputs[0].name
                weights[name] = _gptq(self._nodes[key[0]], float_input, clipped, w, data_dtype, hessians) \
                    or clipped.export(w, data_dtype)
        for group, (learned, quantizers, _) in self.activations.items():
            scale, zero = learned.export()
            activations[group] = (scale, np.asarray(zero).astype(const_array(quantizers[0].inputs[2]).dtype))
        return {"floats": floats, "weights": weights, "activations": activations}

    def apply(self, model: ir.Model, values: dict) -> None:
        """Write :meth:`final_values` into ``model`` (this one or a copy: nodes are found by name)."""
        names = NameFactory(model.graph)
        nodes = {n.name: n for n in model.graph}
        for (name, index), array in values["floats"].items():
            _write_float(model, names, nodes[name], index, array)
        for name, (q, scale, zero) in values["weights"].items():
            _replace_dequantize_data(model, names, nodes[name], q, scale, zero)
        plan = {tensor: dict(entry, ranges=dict(entry["ranges"])) for tensor, entry in self.plan.items()}
        for group, (scale, zero) in values["activations"].items():
            _, quantizers, dequantizers = self.activations[group]
            s = add_initializer(model.graph, names(f"{group}_learned_scale"), np.asarray(scale, np.float32))
            z = add_initializer(model.graph, names(f"{group}_learned_zero_point"), zero)
            for node in quantizers + dequantizers:
                nodes[node.name].replace_input_with(1, s)
                nodes[node.name].replace_input_with(2, z)
            for entry in plan.values():
                if entry["group"] == group:
                    fmt = QFormat.parse(entry["format"])
                    qmin, qmax = fmt.qrange
                    entry["ranges"][fmt.bits] = (float((qmin - int(zero)) * scale), float((qmax - int(zero)) * scale))
        qstate.set_activation_plan(model, plan)
        quantize_biases(model, names)

    def transformed_float_model(self, float_proto) -> ir.Model:
        """The float reference with the learned transforms folded (exact in float)."""
        model = ir.from_proto(float_proto)
        pairs, _ = find_pairs(model, ("norm", "linear"))
        by_producer = {p.producer.node.name: p for p in pairs}
        folder = Folder(model.graph)
        with torch.no_grad():
            for pair, scale in zip(self.pairs, self.scales, strict=True):
                apply_scale(folder, by_producer[pair.producer.node.name], scale().double().numpy())
        return model

    def mean_loss_of(self, model: ir.Model, samples: list) -> float:
        """The loss of ``model`` as it stands (a copy with the values written)."""
        graph = TorchGraph(model)
        with torch.no_grad():
            losses = []
            for index, feeds in enumerate(samples):
                outputs = graph(feeds)
                losses.append(float(self._loss_from(outputs, index)))
        return float(np.mean(losses))


def _gptq(node: ir.Node, float_input: str, clipped: ClippedWeight, w: torch.Tensor, dtype, hessians: dict | None):
    """GPTQ's integers for a per-channel symmetric MatMul/Gemm weight with the learned scales."""
    from qcompiler.gptq import gptq_quantize

    if hessians is None or node.op_type not in ("MatMul", "Gemm") or w.dim() != 2 or clipped.block \
            or clipped.axis is None or not clipped.symmetric:
        return None
    h = hessians.get(float_input)
    if h is None:
        return None
    with torch.no_grad():
        scale, _ = clipped.params(w)
    transposed = clipped.axis == 0  # Gemm transB: channels on axis 0
    matrix = (w.T if transposed else w).double().numpy()
    bits = {np.dtype(np.int8): 8, np.dtype(np.int16): 16}.get(np.dtype(dtype), 4)
    fmt = QFormat(bits=bits, signed=True, granularity="per-channel", symmetric=True)
    qt = gptq_quantize(matrix, h, fmt, scales=(scale.double().numpy(), np.zeros(scale.shape, np.int64)))
    q = qt.data.T if transposed else qt.data
    return np.ascontiguousarray(q).astype(np.int64).astype(dtype), scale.numpy().astype(np.float32), \
        np.zeros(scale.shape, np.int64).astype(dtype)


def _is_constant_dq(value: ir.Value) -> bool:
    """``DequantizeLinear(constant)``, possibly reshaped (a quantized bias)."""
    node = value.producer()
    if node is not None and node.op_type == "Reshape":
        node = node.inputs[0].producer()
    return node is not None and node.op_type == "DequantizeLinear" and const_array(node.inputs[0]) is not None


def _write_float(model: ir.Model, names: NameFactory, node: ir.Node, index: int, array: np.ndarray) -> None:
    """A folded float constant: in place when it is this node's own float initializer,
    else a new initializer (a quantized bias becomes float again: ``quantize_biases``
    re-quantizes it with the learned scales)."""
    value = node.inputs[index]
    current = const_array(value)
    array = np.ascontiguousarray(array, np.float32)
    if current is not None and current.dtype == np.float32 and value.is_initializer() \
            and all(u.node is node for u in value.uses()):
        set_initializer_array(value, array.reshape(current.shape))
        return
    node.replace_input_with(index, add_initializer(model.graph, names(f"{value.name or 'const'}_learned"), array))


def _replace_dequantize_data(model: ir.Model, names: NameFactory, dq: ir.Node, q: np.ndarray, scale: np.ndarray,
                             zero: np.ndarray) -> None:
    base = dq.inputs[0].name or "weight"
    dq.replace_input_with(0, add_initializer(model.graph, names(f"{base}_learned"), q))
    dq.replace_input_with(1, add_initializer(model.graph, names(f"{base}_learned_scale"), scale))
    if len(dq.inputs) > 2 and dq.inputs[2] is not None:
        dq.replace_input_with(2, add_initializer(model.graph, names(f"{base}_learned_zero_point"), zero))


__all__ = ["Learner", "frozen_groups", "plan_quantizers"]
