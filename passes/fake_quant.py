"""``insert-fake-quant``: standard ONNX QDQ for weights and activations from calibrated ranges.

Weights: ``W → DequantizeLinear(q(W))`` per tensor, channel or group. Activations:
every float tensor computed from the inputs gets ``QuantizeLinear → DequantizeLinear``
with a static scale and zero point from the calibration statistics
(``q = clamp(round(x/s) + z)``, ranges by min-max, percentile, MSE or entropy), except
inside linear groups (the accumulator is not rounded between the matmul, its bias
and a fused ReLU). Transparent ops share their input's parameters; bounded ops use
their known range. Biases become int32 with scale ``s_x·s_w``, as integer hardware
adds them. With ``wide_below_db``, an 8-bit activation whose estimated SQNR on the
calibration data is below the threshold gets 16 bits (found from data, not by op type).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_common

from qcompiler.calibration import ActivationStats, activation_values
from qcompiler import qstate
from qcompiler.graph import NameFactory, add_initializer, const_array, ensure_opset, node_label
from qcompiler.histogram import estimate_sqnr_db, estimate_sqnr_through_db
from qcompiler.pipeline import Pass, option
from qcompiler.qdq import (
    BOUNDED_RANGES, input_derived, insert_qdq, is_float, linear_group, moves_values,
)
from qcompiler.quant import QFormat, qparams
from qcompiler.passes.exact_masks import is_mask_select
from qcompiler.passes.weight_quant import quantize_weights

#: A tensor whose most negative value exceeds the other operand's range by this factor
#: is an additive mask: it saturates to qmin instead of setting the range.
MASK_RATIO = 1e3
#: Concat parts whose ranges differ by more than this are checked for a shared 8-bit scale.
PART_RANGE_RATIO = 16.0
#: A part quantized below this SQNR at the shared 8-bit scale widens the Concat to 16 bits.
PART_MIN_SQNR_DB = 20.0


@dataclasses.dataclass(frozen=True)
class Rule:
    """One ``SELECTOR=SPEC`` override: selector is an op type or a node-name glob."""

    selector: str
    float_: bool = False
    activations: QFormat | None = None
    weights: QFormat | None = None

    @classmethod
    def parse(cls, text: str) -> Rule:
        selector, sep, spec = text.partition("=")
        if not sep or not selector.strip() or not spec.strip():
            raise ValueError(f"override {text!r}: expected SELECTOR=SPEC, e.g. Softmax=a:int16 or head*=float")
        rule = cls(selector.strip())
        for part in spec.split("+"):
            part = part.strip()
            if part == "float":
                rule = dataclasses.replace(rule, float_=True)
            elif part.startswith("a:"):
                rule = dataclasses.replace(rule, activations=QFormat.parse(part[2:]))
            elif part.startswith("w:"):
                rule = dataclasses.replace(rule, weights=QFormat.parse(part[2:]))
            else:
                raise ValueError(f"override {text!r}: '{part}' is not float, a:FORMAT or w:FORMAT")
        return rule

    def matches(self, node: ir.Node) -> bool:
        return self.selector == node.op_type or fnmatch.fnmatchcase(node.name or "", self.selector)


def node_config(node: ir.Node | None, rules: list[Rule], default_a: QFormat, default_w: QFormat) -> tuple[bool, QFormat, QFormat]:
    """``(keep_float, activation format, weight format)`` for a node after the overrides."""
    keep, fmt_a, fmt_w = False, default_a, default_w
    if node is None:
        return keep, fmt_a, fmt_w
    for rule in rules:
        if rule.matches(node):
            keep = keep or rule.float_
            fmt_a = rule.activations or fmt_a
            fmt_w = rule.weights or fmt_w
    return keep, fmt_a, fmt_w


@dataclasses.dataclass(frozen=True)
class Assignment:
    """How one activation tensor is quantized; ``group`` names the tensor whose
    parameters it shares (transparent ops, masks), ``ranges`` the range per bit width.
    The plan (tensor name → Assignment) travels with the model (:mod:`qcompiler.qstate`)
    so later passes (allocate-bits) can change bit widths, in this compile or another."""

    tensor: str
    group: str
    fmt: QFormat
    ranges: dict

    def to_json(self) -> dict:
        return {"group": self.group, "format": str(self.fmt),
                "ranges": {str(b): [float(lo), float(hi)] for b, (lo, hi) in sorted(self.ranges.items())}}

    @classmethod
    def from_json(cls, tensor: str, entry: dict) -> Assignment:
        return cls(tensor, entry["group"], QFormat.parse(entry["format"]), dict(entry["ranges"]))

    def qparams(self, bits: int | None = None) -> tuple[float, np.ndarray]:
        fmt = self.fmt if bits is None else dataclasses.replace(self.fmt, bits=bits)
        lo, hi = self.ranges[fmt.bits]
        scale, zero = qparams(np.array(lo), np.array(hi), fmt)
        return float(scale), zero



@dataclass(frozen=True)
class InsertFakeQuant(Pass):
    """Insert QDQ for weights and activations (static ranges from calibration)."""

    name = "insert-fake-quant"
    stages = ("float",)
    produces = "fakequant"
    provides = ("float-reference", "activation-plan")
    preserves_numerics = False

    weights: str = option("int8:per-channel", "weight format (int4|int8|int16 : per-tensor|per-channel|per-group[:size])")
    activations: str = option("int8:per-tensor:asym", "activation format, or 'none' for weight-only")
    weight_method: Literal["mse", "gptq", "pow2"] = option(
        "mse", "weights: MSE-optimal clipping, GPTQ error compensation (MatMul/Gemm, per-channel), or power-of-two values")
    second_moment: bool = option(False, "weights: scale each channel by γ = sqrt(E[W²]/E[Q(W)²]) (seed 003 eq. 18)")
    method: Literal["minmax", "percentile", "mse", "entropy"] = option("mse", "activation range method")
    percentile: float = option(99.99, "percentile for method=percentile")
    wide_below_db: float = option(0.0, "8-bit activations whose estimated SQNR is below this get 16 bits (0: never)")
    wide_outside_products: bool = option(
        False, "16-bit activations except where a tensor only feeds matmul/conv operands (MobileQuant's W8A8: "
        "8-bit products, 16-bit residuals, norms and nonlinear ops)")
    overrides: tuple[str, ...] = option((), "rules SELECTOR=SPEC (op type or node glob = float | a:FMT | w:FMT, joined by +)")
    samples: int = option(0, "calibration samples to use (0: all)")

    def __post_init__(self):
        QFormat.parse(self.weights)
        if self.activations != "none":
            fmt = QFormat.parse(self.activations)
            if fmt.granularity != "per-tensor":
                raise ValueError("activations are per-tensor (static ranges, as NPUs require)")
        for text in self.overrides:
            Rule.parse(text)

    def run(self, model: ir.Model, ctx) -> bool:
        rules = [self._fit(Rule.parse(t), ctx) for t in self.overrides]
        fmt_w = self._fit_weights(QFormat.parse(self.weights), ctx)
        report = ctx.report
        kept = report.setdefault("kept_float", [])
        for node in model.graph:
            keep, _, _ = node_config(node, rules, QFormat(), fmt_w)
            if keep:
                kept.append({"node": node.name, "op": node.op_type, "reason": "configured (override float)"})

        qstate.set_float_reference(model, ir.to_proto(model))
        stats = None
        if self.activations != "none":
            stats = ctx.analysis(ActivationStats(max_samples=self.samples or None), model)

        changed = self._quantize_weights(model, ctx, rules, fmt_w)
        if self.activations == "none":
            return changed
        fmt_a = QFormat.parse(self.activations)
        plan = self._plan_activations(model, stats, rules, fmt_a, report, self._wide_allowed(ctx))
        if any(a.fmt.bits != 8 or not a.fmt.signed for a in plan.values()):
            ensure_opset(model, 21)
        names = NameFactory(model.graph)
        by_name = {v.name: v for v in activation_values(model)}
        for name, assignment in plan.items():
            value = by_name[name]
            scale, zero = assignment.qparams()
            insert_qdq(model.graph, names, value, scale, zero, value.producer())
        qstate.set_activation_plan(model, {name: a.to_json() for name, a in plan.items()})
        quantize_biases(model, names)
        ir_common.RemoveUnusedNodesPass()(model)
        return True

    # -- what the target takes ----------------------------------------------------------

    def _fit_weights(self, fmt: QFormat, ctx) -> QFormat:
        caps = getattr(ctx, "target", None)
        if caps is None:
            return fmt
        fitted, note = caps.fit_weights(fmt)
        if note:
            ctx.warn(f"insert-fake-quant: target '{ctx.target_name}' takes weights as {note}")
        return fitted

    def _fit(self, rule: Rule, ctx) -> Rule:
        if rule.weights is None:
            return rule
        return dataclasses.replace(rule, weights=self._fit_weights(rule.weights, ctx))

    def _wide_allowed(self, ctx) -> bool:
        caps = getattr(ctx, "target", None)
        if caps is not None and 16 not in caps.activation_bits and self.wide_below_db > 0:
            ctx.warn(f"insert-fake-quant: target '{ctx.target_name}' has no 16-bit activations; wide_below_db is ignored")
            return False
        return True

    # -- weights ---------------------------------------------------------------------

    def _quantize_weights(self, model, ctx, rules, fmt_w) -> bool:
        groups: dict[str, list[str]] = {}
        for node in model.graph:
            keep, _, node_fmt = node_config(node, rules, QFormat(), fmt_w)
            if not keep and node.op_type in ("MatMul", "Gemm", "Conv", "ConvTranspose"):
                groups.setdefault(str(node_fmt), []).append(node.name)
        hessians = None
        if self.weight_method == "gptq":
            from qcompiler.gptq import LinearInputHessians

            hessians = ctx.analysis(LinearInputHessians(max_samples=self.samples or 32), model)
        count = 0
        for text, nodes in groups.items():
            count += quantize_weights(model, ctx, QFormat.parse(text), ("MatMul", "Gemm", "Conv", "ConvTranspose"),
                                      keep_float=(), only=set(nodes), hessians=hessians,
                                      method="pow2" if self.weight_method == "pow2" else "mse",
                                      second_moment=self.second_moment)
        return count > 0

    # -- activations -------------------------------------------------------------------

    def _plan_activations(self, model, stats, rules, fmt_a, report, wide_allowed: bool = True) -> dict[str, Assignment]:
        """value name -> its quantization, for every activation to quantize."""
        derived = input_derived(model)
        internal: set[int] = set()
        for node in model.graph:
            group = linear_group(node)
            if group is not None:
                internal.update(id(v) for v in group.internal)
        plan: dict[int, Assignment] = {}
        rows = report.setdefault("activations", [])
        for value in activation_values(model):
            vid = id(value)
            if vid in internal or value.name not in stats:
                continue
            if value.dtype != ir.DataType.FLOAT:
                continue  # QuantizeLinear takes float32 (its DequantizeLinear gives float32): float64/16 stay float
            users = [u.node for u in value.uses()]
            if value.producer() is not None and is_mask_select(value.producer()):
                continue  # an exact mask select: lowered with its softmax (exact-masks)
            if vid in derived and not value.is_graph_output() and all(
                all(id(o) in derived for o in u.outputs) for u in users
            ):
                continue  # inside an input-derived region (e.g. mask arithmetic): lowered as a whole
            producer = value.producer()
            _, fmt, _ = node_config(producer, rules, fmt_a, QFormat())
            source = self._shared_source(producer, plan)
            if source is not None:
                plan[vid] = dataclasses.replace(plan[source], tensor=value.name)
                continue
            tensor_stats = stats[value.name]
            ranges, how = self._ranges(value, producer, fmt, tensor_stats, derived, stats, plan)
            sqnr = estimate_sqnr_db(tensor_stats.hist, *ranges[fmt.bits], 2**fmt.bits)
            through = _sqnr_through_reader(value, tensor_stats.hist, ranges[fmt.bits], fmt.bits)
            if through is not None and through < sqnr:
                how += f" ({through:.1f} dB through its {value.uses()[0].node.op_type})"
                sqnr = through
            conv_input = _read_by_conv(value)  # convolutions take 8-bit inputs only
            if wide_allowed and fmt.bits == 8 and self.wide_outside_products and not _feeds_only_products(value) and not conv_input:
                fmt = dataclasses.replace(fmt, bits=16)
                how += " (16 bits: not only a product operand)"
                sqnr = estimate_sqnr_db(tensor_stats.hist, *ranges[16], 2**16)
            if wide_allowed and fmt.bits == 8 and producer is not None and producer.op_type == "Concat":
                decision = concat_parts_decision(producer, ranges, stats, conv_input)
                if decision is not None:
                    report.setdefault("decisions", []).append(decision)
                    if decision["chosen"] == "16 bits":
                        fmt = dataclasses.replace(fmt, bits=16)
                        how += f" (16 bits: {decision['why']})"
                        sqnr = estimate_sqnr_db(tensor_stats.hist, *ranges[16], 2**16)
            if wide_allowed and self.wide_below_db > 0 and fmt.bits == 8 and sqnr < self.wide_below_db and conv_input:
                how += f" (8 bits although below {self.wide_below_db:g} dB: a convolution reads it)"
            elif wide_allowed and self.wide_below_db > 0 and fmt.bits == 8 and sqnr < self.wide_below_db:
                fmt = dataclasses.replace(fmt, bits=16)
                how += " (widened to 16 bits)"
                sqnr = estimate_sqnr_db(tensor_stats.hist, *ranges[16], 2**16)
            assignment = Assignment(value.name, value.name, fmt, ranges)
            plan[vid] = assignment
            lo, hi = ranges[fmt.bits]
            scale, zero = assignment.qparams()
            rows.append({
                "tensor": value.name,
                "producer": producer.name if producer is not None else "(input)",
                "op": producer.op_type if producer is not None else "input",
                "format": str(fmt),
                "range": [round(float(lo), 6), round(float(hi), 6)],
                "calibrated": [round(float(tensor_stats.min), 6), round(float(tensor_stats.max), 6)],
                "method": how,
                "scale": float(scale),
                "zero_point": int(zero),
                "est_sqnr_db": round(float(sqnr), 2),
            })
        # An additive mask (0 or a huge negative) gets the range [−2·span, 0], span = the widest
        # range of the sums it feeds: masked positions then saturate every sum to its minimum.
        spans: dict[int, tuple[ir.Value, float]] = {}
        for node in model.graph:
            mask = self._mask_operand(node, derived, stats)
            if mask is not None and id(node.outputs[0]) in plan:
                span = max(hi - lo for lo, hi in plan[id(node.outputs[0])].ranges.values())
                spans[id(mask)] = (mask, max(span, spans.get(id(mask), (mask, 0.0))[1]))
        for mask, span in spans.values():
            bottom = (-2.0 * span, 0.0)
            plan[id(mask)] = Assignment(mask.name, mask.name, fmt_a, {8: bottom, 16: bottom})
        return {a.tensor: a for a in plan.values()}

    def _ranges(self, value, producer, fmt, tensor_stats, derived, stats, plan) -> tuple[dict[int, tuple[float, float]], str]:
        """Ranges for 8 and 16 bits (the chosen method at 8 bits, min-max at 16), and how."""
        if producer is not None and producer.op_type in BOUNDED_RANGES:
            bounded = BOUNDED_RANGES[producer.op_type]
            return {8: bounded, 16: bounded}, "bounded"
        mask = self._mask_operand(producer, derived, stats)
        if mask is not None:
            other = producer.inputs[0] if producer.inputs[1] is mask else producer.inputs[1]
            if id(other) in plan:
                return dict(plan[id(other)].ranges), "masked add: range of the unmasked operand"
        narrow = tensor_stats.range(self.method, dataclasses.replace(fmt, bits=8), self.percentile)
        wide = tensor_stats.range("minmax", dataclasses.replace(fmt, bits=16))
        return {8: tuple(map(float, narrow)), 16: tuple(map(float, wide))}, self.method if fmt.bits == 8 else "minmax"

    @staticmethod
    def _shared_source(producer: ir.Node | None, plan) -> int | None:
        guarded = _nan_guarded(producer)
        if guarded is not None:  # Where(IsNaN(p), 0, p): p itself (0 is representable)
            return id(guarded) if id(guarded) in plan else None
        if producer is None or not moves_values(producer) or not producer.inputs:
            return None
        data = producer.inputs[0]
        if producer.op_type == "Gather" and const_array(data) is not None:
            return None  # an embedding lookup: its own range
        return id(data) if data is not None and id(data) in plan else None

    @staticmethod
    def _mask_operand(node: ir.Node | None, derived: set[int], stats) -> ir.Value | None:
        """The input-derived operand of an Add that is an additive attention mask, if any."""
        if node is None or node.op_type != "Add":
            return None
        a, b = node.inputs[0], node.inputs[1]
        for mask, other in ((b, a), (a, b)):
            if id(mask) in derived and id(other) not in derived and mask.name in stats and other.name in stats:
                m, o = stats[mask.name], stats[other.name]
                if m.max <= 0.0 and m.min < -MASK_RATIO * max(o.absmax, 1e-6):
                    return mask
        return None



_PRODUCTS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})


def concat_parts_decision(concat: ir.Node, ranges: dict[int, tuple[float, float]], stats,
                          conv_input: bool = False) -> dict | None:
    """Whether a Concat of parts with very different ranges keeps one 8-bit scale.

    A detector head concatenates boxes (0–640) and class scores (0–1): one int8 scale for
    both (2.5) turns every score into 0. When the parts' ranges differ by more than
    :data:`PART_RANGE_RATIO`, each part's SQNR at the Concat's 8-bit range is estimated from
    its histogram; if the worst is below :data:`PART_MIN_SQNR_DB`, the Concat's output is
    16-bit (its parts keep their own 8-bit scales up to it). Returns the decision for the
    report, or None when the parts' ranges are alike. A Concat that a convolution reads
    stays 8-bit (convolutions take 8-bit inputs; widening would leave the conv in float).
    """
    parts = [v for v in concat.inputs if v is not None and v.name in stats]
    spans = [stats[v.name].max - stats[v.name].min for v in parts]
    if len(parts) < 2 or min(spans) <= 0.0 or max(spans) / min(spans) <= PART_RANGE_RATIO:
        return None
    ratio = max(spans) / min(spans)

    def worst(bits: int) -> tuple[float, str]:
        return min((estimate_sqnr_db(stats[v.name].hist, *ranges[bits], 2**bits), v.name) for v in parts)

    worst8, part = worst(8)
    worst16, _ = worst(16)
    chosen = "16 bits" if worst8 < PART_MIN_SQNR_DB and worst16 > worst8 and not conv_input else "8 bits"
    return {
        "node": concat.name, "op": "Concat", "range_ratio": round(float(ratio), 1), "worst_part": part,
        "worst_part_sqnr_db": {"8": round(float(worst8), 2), "16": round(float(worst16), 2)}, "chosen": chosen,
        "why": f"parts' ranges differ {ratio:.0f}x; part '{part}' at the shared 8-bit scale: {worst8:.1f} dB, at 16 bits {worst16:.1f} dB"
               + ("; a convolution reads it (8-bit inputs only)" if conv_input else ""),
    }


def _nan_guarded(node: ir.Node | None) -> ir.Value | None:
    """``p`` of a NaN guard ``Where(IsNaN(p), 0, p)`` (what SDPA exports after its softmax), else None."""
    if node is None or node.op_type != "Where" or len(node.inputs) != 3:
        return None
    cond, zero, value = node.inputs
    check = cond.producer() if cond is not None else None
    constant = const_array(zero)
    if check is None or check.op_type != "IsNaN" or check.inputs[0] is not value or constant is None:
        return None
    return value if constant.size == 1 and float(constant.reshape(-1)[0]) == 0.0 else None


#: Element-wise readers that magnify quantization steps where their slope is steep.
_STEEP_READERS = {"Sqrt": np.sqrt, "Log": np.log, "Reciprocal": lambda x: 1.0 / x}


def _sqnr_through_reader(value: ir.Value, hist, bounds, bits: int) -> float | None:
    """The estimated SQNR after the tensor's only reader when that reader is steep (√, log,
    1/x): what decides whether 8 bits are enough for it."""
    uses = value.uses()
    if len(uses) != 1 or uses[0].node.op_type not in _STEEP_READERS:
        return None
    return estimate_sqnr_through_db(hist, *bounds, 2**bits, _STEEP_READERS[uses[0].node.op_type])


def _read_by_conv(value: ir.Value, depth: int = 0) -> bool:
    """Whether a convolution reads ``value`` (through data movement)."""
    for use in value.uses():
        node = use.node
        if node.op_type in ("Conv", "ConvTranspose"):
            return True
        if (depth < 16 and moves_values(node) and node.inputs and node.inputs[0] is value
                and any(_read_by_conv(o, depth + 1) for o in node.outputs)):
            return True
    return False


def _feeds_only_products(value: ir.Value, depth: int = 0) -> bool:
    """Whether every reader of ``value`` (through data movement) is a matmul or conv."""
    if value.is_graph_output() or depth > 16:
        return False
    users = [u.node for u in value.uses()]
    if not users:
        return False
    for node in users:
        if node.op_type in _PRODUCTS:
            continue
        if moves_values(node) and node.inputs and node.inputs[0] is value:
            if all(_feeds_only_products(o, depth + 1) for o in node.outputs):
                continue
        return False
    return True


def quantize_biases(model: ir.Model, names: NameFactory | None = None) -> None:
    """Bias of a quantized linear → DequantizeLinear(int32, s_x·s_w): what integer hardware adds.

    Idempotent: an int32 bias whose scale no longer matches ``s_x·s_w`` (after a pass
    changed the activation's parameters) is re-quantized from its value.
    """
    from qcompiler.qdq import constant_value, qdq_source

    names = names or NameFactory(model.graph)
    for node in list(model.graph):
        group = linear_group(node)
        if group is None:
            continue
        x = qdq_source(node.inputs[0])
        w = qdq_source(node.inputs[1])
        if x is None or w is None or w[1].ndim > 1:
            continue
        s_w = np.asarray(w[1], np.float64)
        s_x = float(x[1])
        if group.bias_add is not None:
            add = group.bias_add
            slot = 1 if add.inputs[0] is node.outputs[0] else 0
            bias_value = add.inputs[slot]
        elif node.op_type in ("Gemm", "Conv", "ConvTranspose") and len(node.inputs) > 2 and node.inputs[2] is not None:
            add, slot, bias_value = node, 2, node.inputs[2]
        else:
            continue
        existing = qdq_source(bias_value)
        if existing is not None:
            if existing[0].dtype != ir.DataType.INT32:
                continue
            if np.allclose(np.asarray(existing[1], np.float64).reshape(-1), (s_x * s_w).reshape(-1), rtol=1e-7):
                continue  # already quantized with the current scales
        bias = constant_value(bias_value)
        if bias is None:
            continue
        bias = bias.astype(np.float32)
        channels = bias.shape
        scale = (s_x * s_w).astype(np.float32)
        if scale.size > 1:
            scale = scale.reshape(-1)
        flat = bias.reshape(-1) if bias.size == scale.size or scale.size == 1 else None
        if flat is None:
            continue
        wider = _weight_scale_for_bias(s_w, s_x, flat)
        if wider is not None and _requantize_weight(model, w, wider, names):
            s_w = wider
            scale = (s_x * s_w).astype(np.float32).reshape(-1 if s_w.size > 1 else ())
        q = np.clip(np.round(flat / scale), -(2**31), 2**31 - 1).astype(np.int32)
        base = bias_value.name or "bias"
        qv = add_initializer(model.graph, names(f"{base}_q32"), q)
        sv = add_initializer(model.graph, names(f"{base}_q32_scale"), scale)
        zv = add_initializer(model.graph, names(f"{base}_q32_zero_point"), np.zeros(scale.shape, np.int32))
        attrs = {"axis": 0} if scale.size > 1 else {}
        dq = ir.node("DequantizeLinear", [qv, sv, zv], attrs, name=names(f"{base}_dequantize"))
        dq.outputs[0].name = names(f"{base}_dq")
        dq.outputs[0].dtype = ir.DataType.FLOAT
        dq.outputs[0].shape = ir.Shape([q.size])
        out = dq.outputs[0]
        if channels != (q.size,):
            shape = add_initializer(model.graph, names(f"{base}_shape"), np.array(channels, np.int64))
            reshape = ir.node("Reshape", [out, shape], name=names(f"{base}_reshape"))
            reshape.outputs[0].name = names(f"{base}_dq_shaped")
            reshape.outputs[0].dtype = ir.DataType.FLOAT
            reshape.outputs[0].shape = ir.Shape(channels)
            model.graph.insert_before(add, [dq, reshape])
            out = reshape.outputs[0]
        else:
            model.graph.insert_before(add, dq)
        add.replace_input_with(slot, out)


#: Largest |bias| in steps of s_x·s_w: int32 with room left for the products' sum.
BIAS_LIMIT = 2**29
_WEIGHT_QMAX = {ir.DataType.INT8: 127, ir.DataType.INT16: 32767}


def _weight_scale_for_bias(s_w: np.ndarray, s_x: float, bias: np.ndarray) -> np.ndarray | None:
    """Weight scales large enough that every bias fits :data:`BIAS_LIMIT` steps of
    ``s_x·s_w``, or None when they already do.

    A channel whose weights are all but zero (a folded BatchNorm with a tiny γ) gets a tiny
    weight scale, and its bias then needs more than 2^31 steps: its scale grows to
    ``|b| / (s_x·BIAS_LIMIT)``. Its weights, far below that step, round to (nearly) 0: they
    contributed nothing next to the bias anyway.
    """
    need = np.abs(bias.astype(np.float64)) / (s_x * BIAS_LIMIT)
    if s_w.size == 1:
        need = np.asarray(need.max(initial=0.0)).reshape(s_w.shape)
    if np.all(s_w.reshape(-1) >= need.reshape(-1)):
        return None
    return np.maximum(s_w, need.reshape(s_w.shape))


def _requantize_weight(model: ir.Model, w, scale: np.ndarray, names: NameFactory) -> bool:
    """Point the weight's DequantizeLinear at ``round(W / scale)`` and ``scale`` (new
    initializers: the old ones may be shared)."""
    q_value, old_scale, zero, dq = w
    q = const_array(q_value)
    qmax = _WEIGHT_QMAX.get(q_value.dtype)
    if q is None or qmax is None or np.any(zero != 0):
        return False
    attrs = {k: a.value for k, a in dq.attributes.items()}
    shape = [1] * q.ndim
    if scale.size > 1:
        shape[int(attrs.get("axis", 1)) % q.ndim] = -1
    real = q.astype(np.float64) * np.asarray(old_scale, np.float64).reshape(shape)
    new_q = np.clip(np.round(real / scale.reshape(shape)), -qmax, qmax).astype(q.dtype)
    base = dq.inputs[0].name or "weight"
    dq.replace_input_with(0, add_initializer(model.graph, names(f"{base}_fit"), new_q))
    dq.replace_input_with(1, add_initializer(model.graph, names(f"{base}_fit_scale"), scale.astype(np.float32)))
    return True


def describe_unquantized(model: ir.Model) -> list[str]:
    """Nodes computing in float between quantized tensors (for the report)."""
    return [node_label(n) for n in model.graph if any(is_float(o) for o in n.outputs) and n.op_type != "DequantizeLinear"]
