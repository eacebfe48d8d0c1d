"""``allocate-bits``: mixed precision from measured sensitivity under a budget.

On the fake-quant model, for each weight layer ``l`` the output noise ``N_l(4)`` is
measured with only that layer at 4 bits (every other layer as it is), on calibration
samples, against the float model. Under the uniform-noise model
``N_l(b) ≈ α_l σ_l² · 2^(−2b)``, so ``α_l σ_l² ≈ N_l(4) · 2^8``, and seed 003's
Theorem 8 gives the closed-form allocation

    b_l = ½ · log2(α_l σ_l² / (λ · n_l))

(``n_l`` parameters of layer ``l``; ``λ`` chosen by bisection so the parameter-weighted
average meets the budget). That continuous solution ranks the layers; they are then
rounded to {4, 8}: the layers with the lowest closed-form ``b_l`` go to 4 bits until
the budget is met, and the result is measured. With ``bias_correction`` the mean output
shift of each 4-bit layer, ``x̄·(W_q − W)`` (``x̄`` the mean float input on calibration
data), is removed from its bias.

Activations: each quantized activation (group of tensors sharing parameters) is
measured at 8 bits with every other activation at 16 (added output noise ``ΔN_t``);
the most harmful get 16 bits until the 8-bit ones add at most
``act_noise_ratio`` × the all-16-bit noise. This finds the
tensors that need int16 (norm inputs, residual sums with outlier channels, softmax
inputs) from data rather than by op type.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir

from qcompiler import qstate
from qcompiler.graph import const_array, ensure_opset, set_initializer_array
from qcompiler.instruments import sqnr_db
from qcompiler.pipeline import Pass, option
from qcompiler.quant import QFormat, quantize_weight
from qcompiler.passes.fake_quant import quantize_biases


class _Evaluator:
    """Runs variants of a QDQ model on a few samples (onnxruntime) and scores them
    against the float model's outputs (SQNR over all outputs, in dB).

    With ``mask_input`` (a model input of 0/1 values, e.g. a padding mask), output
    positions where it is 0 are left out: an output whose leading dimensions have the
    mask's shape keeps only the unmasked positions."""

    def __init__(self, model: ir.Model, float_proto: onnx.ModelProto, samples: list[dict], mask_input: str | None = None):
        self.samples = samples
        self.mask_input = mask_input
        reference = self._session(float_proto)
        self.outputs = [o.name for o in float_proto.graph.output]
        self.reference = [self._select(reference.run(None, s), s) for s in samples]
        self.model = model
        self._emulator = None
        self.cluster = None  # set by the pass when a cluster is given

    def _select(self, outputs, sample: dict) -> np.ndarray:
        return _select(outputs, sample, self.mask_input)

    @staticmethod
    def _session(proto: onnx.ModelProto):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def variants(self, apply_revert: list) -> list[tuple[float, float]]:
        """``score()`` of each variant; a variant is ``(apply, revert)``, callables that edit
        the model's parameters. On a cluster (``cluster``) the variants' parameter feeds
        are scored by workers that hold the emulation session (one task per variant)."""
        if self.cluster is None or len(apply_revert) < 2:
            scores = []
            for apply, revert in apply_revert:
                apply()
                scores.append(self.score())
                revert()
            return scores
        emulator = self._emulator_now()
        base = emulator._parameters()
        changes = []
        for apply, revert in apply_revert:
            apply()
            params = emulator._parameters()
            changes.append({k: v for k, v in params.items() if v is not base[k] and not np.array_equal(v, base[k])})
            revert()
        state = (emulator.emulation_bytes, base, self.samples, self.reference, self.mask_input)
        return self.cluster.map_with_state(_SweepState, state, _score_variant, changes)

    def _emulator_now(self):
        if self._emulator is None:
            from qcompiler.qdq_emulation import QDQEmulator

            self._emulator = QDQEmulator(self.model)
        return self._emulator

    def score(self) -> tuple[float, float]:
        """``(SQNR dB, noise power)`` of the current model against float (one emulation
        session for every variant: :class:`qcompiler.qdq_emulation.QDQEmulator`)."""
        emulator = self._emulator_now()
        outs = [self._select(emulator.run(s), s) for s in self.samples]
        return _noise(self.reference, outs)


def _select(outputs, sample: dict, mask_input: str | None) -> np.ndarray:
    """The outputs as one vector, without the positions ``mask_input`` marks 0."""
    mask = None if mask_input is None else np.asarray(sample[mask_input]) != 0
    parts = []
    for array in outputs:
        array = np.asarray(array)
        if mask is not None and array.shape[: mask.ndim] == mask.shape:
            parts.append(array[mask].ravel())
        else:
            parts.append(array.ravel())
    return np.concatenate(parts)


def _noise(reference: list[np.ndarray], outs: list[np.ndarray]) -> tuple[float, float]:
    ref = np.concatenate(reference)
    got = np.concatenate(outs)
    return sqnr_db(ref, got), float(np.mean((ref.astype(np.float64) - got) ** 2))


class _SweepState:
    """A cluster worker's copy of the evaluator: the emulation session and the samples."""

    def __init__(self, emulation_bytes: bytes, base: dict, samples: list, reference: list, mask_input):
        import onnxruntime as ort

        from qcompiler.qdq_emulation import session_options

        self.session = ort.InferenceSession(emulation_bytes, session_options(), providers=["CPUExecutionProvider"])
        self.base, self.samples, self.reference, self.mask_input = base, samples, reference, mask_input


def _score_variant(state: _SweepState, change: dict) -> tuple[float, float]:
    params = {**state.base, **change}
    outs = [_select(state.session.run(None, {**params, **s}), s, state.mask_input) for s in state.samples]
    return _noise(state.reference, outs)


@dataclasses.dataclass
class _WeightLayer:
    node: ir.Node
    dq: ir.Node
    slot: tuple[int, int, int]
    float_weight: np.ndarray
    params: int
    bits: int = 8


class _ActivationGroup:
    """QuantizeLinear nodes that share one set of parameters (and its range per bit width)."""

    def __init__(self, name: str, quantizes: list[ir.Node], assignment):
        self.name = name
        self.quantizes = quantizes
        self.ranges = assignment.ranges
        self.fmt = QFormat.parse(str(assignment.fmt))
        dtype = quantizes[0].outputs[0].dtype
        if dtype is not None and dtype.numpy().itemsize == 2:
            self.fmt = dataclasses.replace(self.fmt, bits=16)

    @property
    def bits(self) -> int:
        return self.fmt.bits

    def set_bits(self, bits: int) -> None:
        """Switch every Q/DQ of the group to ``bits`` (new scale, zero point and types)."""
        from qcompiler.quant import qparams

        fmt = dataclasses.replace(self.fmt, bits=bits)
        lo, hi = self.ranges[bits]
        scale, zero = qparams(np.array(lo), np.array(hi), fmt)
        for q in self.quantizes:
            set_initializer_array(q.inputs[1], np.array(scale, np.float32))
            set_initializer_array(q.inputs[2], np.asarray(zero).reshape(()))
            q.outputs[0].dtype = ir.DataType.from_numpy(fmt.dtype)
            for use in q.outputs[0].uses():
                dq = use.node
                if dq.op_type == "DequantizeLinear" and dq.inputs[1] is not q.inputs[1]:
                    set_initializer_array(dq.inputs[1], np.array(scale, np.float32))
                    set_initializer_array(dq.inputs[2], np.asarray(zero).reshape(()))
        self.fmt = fmt


@dataclass(frozen=True)
class AllocateBits(Pass):
    """Mixed precision: weight bits in {4, 8} under a budget, int16 activations where data needs them."""

    name = "allocate-bits"
    stages = ("fakequant",)
    requires = ("float-reference",)
    preserves_numerics = False

    budget: float = option(6.0, "average weight bits (parameter-weighted); 8 = no 4-bit layers")
    max_bytes: int = option(0, "budget as total weight bytes instead (0: use budget)")
    act_noise_ratio: float = option(1.0, "8-bit activations may add at most this × the all-16-bit output noise (negative: leave activations as they are)")
    samples: int = option(8, "calibration samples used to measure sensitivity")
    weight_method: Literal["mse", "gptq"] = option("gptq", "how 4-bit weights are quantized (GPTQ needs the float model's layer inputs)")
    valid_mask: str = option("", "model input whose 0 entries mark padded positions, left out of the sensitivity metric (e.g. attention_mask)")
    bias_correction: bool = option(True, "fold the mean output shift of each 4-bit layer, x̄·(W_q − W), into its bias")

    def __post_init__(self):
        if not 4.0 <= self.budget <= 8.0:
            raise ValueError("budget is an average weight bit width between 4 and 8")

    def run(self, model: ir.Model, ctx) -> bool:
        data = ctx.require_calibration(self.name)
        float_proto = qstate.float_reference(model)
        samples = []
        for feeds in data:
            samples.append(feeds)
            if len(samples) >= self.samples:
                break
        inputs = [v.name for v in model.graph.inputs if v.const_value is None]
        if self.valid_mask and self.valid_mask not in inputs:
            raise ValueError(f"valid_mask names '{self.valid_mask}', which is not a model input; inputs are {inputs}")
        ensure_opset(model, 21)  # int16 activations and int4 weights
        evaluator = _Evaluator(model, float_proto, samples, self.valid_mask or None)
        evaluator.cluster = ctx.options.get("cluster")
        report = ctx.report.setdefault("mixed_precision", {})
        report["start_sqnr_db"] = round(evaluator.score()[0], 2)
        changed = False
        plan = qstate.activation_plan(model)
        caps = getattr(ctx, "target", None)
        if caps is not None and 16 not in caps.activation_bits:
            plan = None  # the target has no 16-bit activations
        if self.act_noise_ratio >= 0 and plan is not None:
            changed |= self._activations(model, evaluator, report, plan)
        if caps is None or 4 in caps.weight_bits:
            changed |= self._weights(model, evaluator, report, ctx, float_proto)
        else:
            ctx.warn(f"allocate-bits: target '{ctx.target_name}' has no 4-bit weights; weights stay at 8 bits")
        quantize_biases(model)
        report["final_sqnr_db"] = round(evaluator.score()[0], 2)
        ctx.log(f"allocate-bits: SQNR {report['start_sqnr_db']} -> {report['final_sqnr_db']} dB")
        return changed

    # -- activations ------------------------------------------------------------------------

    def _activations(self, model, evaluator: _Evaluator, report, plan: dict) -> bool:
        from qcompiler.passes.fake_quant import Assignment

        groups: dict[str, list[ir.Node]] = {}
        assignments = {}
        for node in model.graph:
            entry = plan.get(node.inputs[0].name) if node.op_type == "QuantizeLinear" else None
            assignment = None if entry is None else Assignment.from_json(node.inputs[0].name, entry)
            if assignment is not None:
                groups.setdefault(assignment.group, []).append(node)
                assignments.setdefault(assignment.group, assignment)
        candidates = [_ActivationGroup(name, nodes, assignments[name]) for name, nodes in groups.items()]
        candidates = [g for g in candidates if 8 in g.ranges and 16 in g.ranges]
        original = {g.name: g.bits for g in candidates}
        for group in candidates:
            group.set_bits(16)
        _, base_noise = evaluator.score()
        scores = evaluator.variants([(lambda g=g: g.set_bits(8), lambda g=g: g.set_bits(16)) for g in candidates])
        added = [(max(noise - base_noise, 0.0), sqnr, group) for (sqnr, noise), group in zip(scores, candidates)]
        # Most harmful first: 16 bits until the 8-bit tensors add at most act_noise_ratio × the
        # noise of the all-16-bit configuration.
        added.sort(key=lambda item: -item[0])
        remaining = sum(n for n, _, _ in added)
        allowance = self.act_noise_ratio * base_noise
        wide = []
        for noise, sqnr, group in added:
            if remaining > allowance:
                remaining -= noise
                wide.append({"tensor": group.name, "added_noise": noise, "sqnr_db_at_8_bits": round(sqnr, 2)})
            else:
                group.set_bits(8)
        report["int16_activations"] = wide
        report["activation_sensitivity"] = [
            {"tensor": g.name, "added_noise": n, "sqnr_db_at_8_bits": round(s, 2)} for n, s, g in added
        ]
        return any(original[g.name] != g.bits for g in candidates)

    # -- weights ----------------------------------------------------------------------------

    def _weights(self, model, evaluator: _Evaluator, report, ctx, float_proto) -> bool:
        layers = self._weight_layers(model)
        if not layers:
            return False
        if self.budget >= 8.0 and self.max_bytes <= 0:  # no room for 4-bit layers: nothing to measure
            report["weights"] = [{"node": l.node.name, "params": l.params, "bits": 8} for l in layers]
            report["average_weight_bits"] = 8.0
            return False
        if self.weight_method == "gptq":
            self._attach_gptq(layers, ctx, float_proto)
        _, base_noise = evaluator.score()
        scores = evaluator.variants([(lambda l=l: self._set_weight_bits(l, 4), lambda l=l: self._set_weight_bits(l, 8))
                                     for l in layers])
        for layer, (_, noise) in zip(layers, scores):
            layer.noise4 = max(noise - base_noise, 1e-30)
        # Theorem 8: b_l = ½·log2(α_l σ_l² / (λ n_l)), α_l σ_l² ≈ N_l(4)·2^8.
        strength = np.array([l.noise4 * 2.0**8 for l in layers])
        params = np.array([l.params for l in layers], dtype=np.float64)
        target = self.budget * params.sum() if self.max_bytes <= 0 else min(8.0 * self.max_bytes, 8.0 * params.sum())

        def bits_for(lam: float) -> np.ndarray:
            return np.clip(0.5 * np.log2(strength / (lam * params)), 4.0, 8.0)

        lo, hi = 1e-40, 1e40
        for _ in range(200):
            mid = math.sqrt(lo * hi)
            if float((bits_for(mid) * params).sum()) > target:
                lo = mid
            else:
                hi = mid
        continuous = bits_for(hi)
        order = np.argsort(continuous, kind="stable")
        total = 8.0 * params.sum()
        for index in order:
            if total <= target + 1e-9:
                break
            layers[index].bits = 4
            total -= 4.0 * params[index]
        for layer in layers:
            self._set_weight_bits(layer, layer.bits)
        if self.bias_correction and any(l.bits == 4 for l in layers):
            report["bias_corrected"] = self._correct_biases([l for l in layers if l.bits == 4], ctx, float_proto)
        for layer in layers:  # 4-bit weights stored as INT4 so the model really is smaller
            if layer.bits == 4:
                for value in layer.dq.inputs[0], layer.dq.inputs[2]:
                    set_initializer_array(value, const_array(value).astype(ml_dtypes.int4))
        average = float(sum(l.bits * l.params for l in layers) / params.sum())
        report["weights"] = [
            {"node": l.node.name, "params": l.params, "noise_at_4_bits": l.noise4, "theorem8_bits": round(float(c), 3), "bits": l.bits}
            for l, c in zip(layers, continuous)
        ]
        report["average_weight_bits"] = round(average, 3)
        report["budget"] = self.budget if self.max_bytes <= 0 else {"max_bytes": self.max_bytes}
        report["weight_bytes"] = int(sum(l.bits * l.params for l in layers) // 8)
        return any(l.bits != 8 for l in layers)

    @staticmethod
    def _weight_layers(model) -> list[_WeightLayer]:
        layers = []
        for node in model.graph:
            slots = weight_slots_dq(node)
            for slot in slots:
                dq = node.inputs[slot[0]].producer()
                data = const_array(dq.inputs[0])
                scale = const_array(dq.inputs[1])
                if data is None or scale is None or "block_size" in dq.attributes:
                    continue
                if QFormat().dtype != data.dtype:  # only 8-bit weights are re-planned
                    continue
                axis = dq.attributes["axis"].as_int() if "axis" in dq.attributes else 1
                shape = [1] * data.ndim
                if scale.size > 1:
                    shape[axis] = -1
                weight = data.astype(np.float32) * scale.reshape(shape)
                layers.append(_WeightLayer(node, dq, slot, weight, int(data.size)))
        return layers

    def _attach_gptq(self, layers: list[_WeightLayer], ctx, float_proto) -> None:
        """Float weights and layer-input Hessians from the float model, for GPTQ at 4 bits."""
        from qcompiler.gptq import LinearInputHessians

        float_model = ir.from_proto(float_proto)
        hessians = LinearInputHessians(max_samples=max(self.samples, 16)).compute(float_model, ctx)
        nodes = {n.name: n for n in float_model.graph}
        for layer in layers:
            original = nodes.get(layer.node.name)
            if original is not None and const_array(original.inputs[1]) is not None:
                layer.float_node, layer.hessians = original, hessians
                layer.float_weight = const_array(original.inputs[1]).astype(np.float32)

    def _correct_biases(self, layers: list[_WeightLayer], ctx, float_proto) -> list[str]:
        """Bias correction (Nagel et al., 2019): ``E[x·W_q] − E[x·W] = x̄·(W_q − W)``, with
        ``x̄`` the mean float input row on calibration data, is subtracted from the bias."""
        from qcompiler.gptq import LinearInputMeans
        from qcompiler.qdq import linear_group, qdq_source

        float_model = ir.from_proto(float_proto)
        means = ctx.analysis(LinearInputMeans(max_samples=max(self.samples, 16)), float_model)
        float_nodes = {n.name: n for n in float_model.graph}
        corrected = []
        for layer in layers:
            original = float_nodes.get(layer.node.name)
            group = linear_group(layer.node)
            mean = means.get(original.inputs[0].name) if original is not None else None
            if mean is None or group is None or group.bias_add is None or layer.float_weight.ndim != 2:
                continue
            add = group.bias_add
            bias_value = add.inputs[1] if add.inputs[0] is (group.linear.outputs[0]) else add.inputs[0]
            _, _, reduce_axis = layer.slot
            shift = np.tensordot(mean, self._dequantized(layer) - layer.float_weight, axes=([0], [reduce_axis % 2]))
            quantized = qdq_source(bias_value)
            if quantized is not None and quantized[0].dtype == ir.DataType.INT32:
                data, scale = const_array(quantized[0]), np.asarray(quantized[1], np.float64)
                value = data.astype(np.float64) * scale - shift.reshape(data.shape)
                set_initializer_array(quantized[0], np.clip(np.round(value / scale), -(2**31), 2**31 - 1).astype(np.int32))
            elif const_array(bias_value) is not None and bias_value.const_value is not None:
                bias = const_array(bias_value)
                set_initializer_array(bias_value, (bias - shift.reshape(bias.shape)).astype(bias.dtype))
            else:
                continue
            corrected.append(layer.node.name)
        return corrected

    @staticmethod
    def _dequantized(layer: _WeightLayer) -> np.ndarray:
        data, scale = const_array(layer.dq.inputs[0]), const_array(layer.dq.inputs[1])
        axis = layer.dq.attributes["axis"].as_int() if "axis" in layer.dq.attributes else 1
        shape = [1] * data.ndim
        if scale.size > 1:
            shape[axis] = -1
        return data.astype(np.float64) * scale.reshape(shape)

    @staticmethod
    def _set_weight_bits(layer: _WeightLayer, bits: int) -> None:
        _, channel_axis, reduce_axis = layer.slot
        fmt = QFormat(bits=bits, granularity="per-channel")
        qt = None
        if bits == 4 and getattr(layer, "hessians", None) is not None:
            from qcompiler.gptq import gptq_for_node

            qt = gptq_for_node(layer.float_node, layer.float_weight, layer.hessians, fmt)
        if qt is None:
            qt = quantize_weight(layer.float_weight, fmt, channel_axis, reduce_axis)
        dq = layer.dq
        # Keep int8 storage: 4-bit values fit and the graph's types stay the same.
        set_initializer_array(dq.inputs[0], qt.data.astype(np.int8))
        set_initializer_array(dq.inputs[1], np.asarray(qt.scale, np.float32))
        dq.metadata_props["qcompiler.weight_bits"] = str(bits)


def weight_slots_dq(node: ir.Node) -> list[tuple[int, int, int]]:
    """Weight slots of ``node`` whose weight is a DequantizeLinear of a constant."""
    from qcompiler.qdq import qdq_source

    if node.op_type not in ("MatMul", "Gemm", "Conv"):
        return []
    out = []
    for index, channel_axis, reduce_axis in _dq_slots(node):
        source = qdq_source(node.inputs[index])
        if source is not None and const_array(source[0]) is not None:
            out.append((index, channel_axis, reduce_axis))
    return out


def _dq_slots(node: ir.Node):
    """Like ``weight_slots`` but for weights that are already dequantized constants."""
    op = node.op_type
    if op == "MatMul":
        return [(1, -1, -2)]
    if op == "Gemm":
        trans_b = node.attributes["transB"].as_int() if "transB" in node.attributes else 0
        return [(1, 0, 1) if trans_b else (1, 1, 0)]
    if op == "Conv":
        return [(1, 0, 1)]
    return []


__all__ = ["AllocateBits"]
