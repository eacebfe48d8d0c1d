"""Cleanup passes: constant folding, dead code, no-op removal, BatchNorm folding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_common

from qcompiler.folding import fold_constants
from qcompiler.graph import const_array, node_label
from qcompiler.pipeline import Pass, option
from qcompiler.rewriter import MatchResult, PatternRewriter, Rule


@dataclass(frozen=True)
class FoldConstants(Pass):
    """Evaluate nodes whose inputs are all constant (and shapes that are static); see
    :mod:`qcompiler.folding` for what is never folded."""

    name = "fold-constants"
    max_elements: int = option(1 << 22, "largest tensor (elements) folding may create or read")

    def run(self, model: ir.Model, ctx) -> bool:
        return fold_constants(model, self.max_elements)


@dataclass(frozen=True)
class EliminateDeadCode(Pass):
    """Remove nodes and initializers that no graph output depends on."""

    name = "eliminate-dead-code"

    def run(self, model: ir.Model, ctx) -> bool:
        changed = ir_common.RemoveUnusedNodesPass()(model).modified
        changed |= ir_common.RemoveUnusedOpsetsPass()(model).modified
        return changed


# -- no-op removal ------------------------------------------------------------------


def _same_static_shape(a: ir.Value, b: ir.Value) -> bool:
    if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return False
    return all(isinstance(x, int) and x == y for x, y in zip(a.shape, b.shape))


class _DropIdentity(Rule):
    def pattern(self, op, x):
        return op.Identity(x)

    def rewrite(self, op, x):
        return x


class _DropDropout(Rule):
    """Dropout is the identity at inference (qcompiler never compiles for training)."""

    def pattern(self, op, x):
        return op.Dropout(x, _allow_other_inputs=True, _outputs=["y"])

    def check(self, context, x, y):
        if len(y.producer().outputs) > 1 and y.producer().outputs[1].uses():
            return MatchResult().fail("the dropout mask is used")
        return True

    def rewrite(self, op, x, y):
        return x


class _DropSameTypeCast(Rule):
    def pattern(self, op, x):
        return op.Cast(x, _outputs=["y"])

    def check(self, context, x, y):
        if x.dtype is None or x.dtype != y.dtype:
            return MatchResult().fail("the cast changes the type")
        return True

    def rewrite(self, op, x, y):
        return x


class _DropSameShapeReshape(Rule):
    def pattern(self, op, x, shape):
        return op.Reshape(x, shape, _outputs=["y"])

    def check(self, context, x, shape, y):
        if not _same_static_shape(x, y):
            return MatchResult().fail("the reshape changes the shape (or shapes are unknown)")
        return True

    def rewrite(self, op, x, shape, y):
        return x


class _DropIdentityTranspose(Rule):
    def pattern(self, op, x):
        return op.Transpose(x, _outputs=["y"])

    def check(self, context, x, y):
        perm = y.producer().attributes.get("perm")
        if perm is None or list(perm.as_ints()) != list(range(len(perm.as_ints()))):
            return MatchResult().fail("the permutation is not the identity")
        return True

    def rewrite(self, op, x, y):
        return x


@dataclass(frozen=True)
class RemoveIdentity(Pass):
    """Remove ops that return their input: Identity, Dropout, same-type Cast, no-op Reshape/Transpose."""

    name = "remove-identity"

    def run(self, model: ir.Model, ctx) -> bool:
        rules = [_DropIdentity, _DropDropout, _DropSameTypeCast, _DropSameShapeReshape, _DropIdentityTranspose]
        stats = PatternRewriter(rules).apply(model)
        ctx.log(f"remove-identity: {dict(stats.counts)}")
        return stats.total > 0


# -- BatchNorm folding ----------------------------------------------------------------


def _bn_scale_shift(bn: ir.Node) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm as ``y = s·x + t`` with ``s = γ/√(σ²+ε)`` and ``t = β − μ·s``."""
    gamma, beta, mean, var = (const_array(v).astype(np.float64) for v in bn.inputs[1:5])
    eps_attr = bn.attributes.get("epsilon")
    eps = eps_attr.as_float() if eps_attr is not None else 1e-5
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


class _FoldBatchNormBase(Rule):
    """``BN(Op(x, W, b))`` → ``Op(x, W·s, b·s + t)`` with s, t from :func:`_bn_scale_shift`."""

    producer_op = ""

    def pattern(self, op, x):
        inner = getattr(op, self.producer_op)(x, _allow_other_inputs=True, _outputs=["z"])
        return op.BatchNormalization(inner, _allow_other_inputs=True, _outputs=["y"])

    def check(self, context, x, z, y):
        result = MatchResult()
        bn, producer = y.producer(), z.producer()
        if len(bn.outputs) > 1 and any(o.uses() for o in bn.outputs[1:]):
            return result.fail("BatchNorm running-stat outputs are used (training graph)")
        if bn.attributes.get("training_mode") is not None and bn.attributes["training_mode"].as_int():
            return result.fail("BatchNorm is in training mode")
        for value in list(bn.inputs[1:5]) + list(producer.inputs[1:]):
            if value is not None and const_array(value) is None:
                return result.fail(f"'{value.name}' is not a constant")
        weight = producer.inputs[1]
        if any(use.node is not producer for use in weight.uses()):
            return result.fail(f"weight '{weight.name}' is shared with another node")
        if len(producer.inputs) > 2 and producer.inputs[2] is not None:
            if any(use.node is not producer for use in producer.inputs[2].uses()):
                return result.fail("bias is shared with another node")
        return self.check_producer(producer, result)

    def check_producer(self, producer: ir.Node, result: MatchResult):
        return result

    def rewrite(self, op, x, z, y):
        producer, bn = z.producer(), y.producer()
        scale, shift = _bn_scale_shift(bn)
        weight = const_array(producer.inputs[1])
        bias_value = producer.inputs[2] if len(producer.inputs) > 2 else None
        bias = const_array(bias_value) if bias_value is not None else np.zeros(scale.shape)
        new_weight, new_bias, attributes = self.fold(producer, weight.astype(np.float64), bias.astype(np.float64), scale, shift)
        dtype = weight.dtype
        w = op.initializer(ir.tensor(new_weight.astype(dtype)), name=producer.inputs[1].name + "_bnfold")
        b = op.initializer(ir.tensor(new_bias.astype(dtype)), name=producer.inputs[1].name + "_bnfold_bias")
        return getattr(op, self.producer_op)(x, w, b, **attributes)


class _FoldBatchNormIntoConv(_FoldBatchNormBase):
    producer_op = "Conv"

    def fold(self, conv, weight, bias, scale, shift):
        shape = (-1,) + (1,) * (weight.ndim - 1)
        return weight * scale.reshape(shape), bias * scale + shift, _attrs(conv)


class _FoldBatchNormIntoConvTranspose(_FoldBatchNormBase):
    producer_op = "ConvTranspose"

    def check_producer(self, producer, result):
        group = producer.attributes.get("group")
        if group is not None and group.as_int() != 1:
            return result.fail("grouped ConvTranspose")
        return result

    def fold(self, conv, weight, bias, scale, shift):
        shape = (1, -1) + (1,) * (weight.ndim - 2)  # weight is (C_in, C_out, k...)
        return weight * scale.reshape(shape), bias * scale + shift, _attrs(conv)


class _FoldBatchNormIntoGemm(_FoldBatchNormBase):
    producer_op = "Gemm"

    def check_producer(self, producer, result):
        if producer.inputs[2] is not None and const_array(producer.inputs[2]).ndim > 1:
            return result.fail("Gemm bias C is not a vector")
        return result

    def fold(self, gemm, weight, bias, scale, shift):
        attributes = _attrs(gemm)
        alpha = attributes.pop("alpha", 1.0)
        beta = attributes.pop("beta", 1.0)
        trans_b = attributes.get("transB", 0)
        weight = weight * alpha * (scale[:, None] if trans_b else scale[None, :])
        return weight, beta * bias * scale + shift, attributes


def _attrs(node: ir.Node) -> dict:
    return {name: attr.value for name, attr in node.attributes.items()}


class _BiasAddIntoConv(Rule):
    """``Add(Conv(x, W[, b]), c)`` with a per-output-channel constant ``c`` (shape ``(1, C, 1, …)``,
    as paddle2onnx writes conv biases) → ``Conv(x, W, b + c)``, so that a BatchNorm after it
    folds like any other (one rule per producer op and operand order)."""

    def __init__(self, producer_op: str, swapped: bool):
        super().__init__(name=f"BiasAddInto{producer_op}{'[swapped]' if swapped else ''}")
        self.producer_op, self.swapped = producer_op, swapped

    def pattern(self, op, x, c):
        conv = getattr(op, self.producer_op)(x, _allow_other_inputs=True, _outputs=["z"])
        return op.Add(c, conv) if self.swapped else op.Add(conv, c)

    def check(self, context, x, c, z):
        result = MatchResult()
        producer = z.producer()
        added = const_array(c)
        if added is None or z.shape is None or len(z.uses()) != 1:
            return result.fail("not a constant added to the conv's only use")
        channels = z.shape[1]
        rank = len(z.shape)
        if not isinstance(channels, int) or added.ndim > rank:
            return result.fail("unknown channels")
        shape = (1,) * (rank - added.ndim) + added.shape
        if added.size != channels or shape[1] != channels:
            return result.fail("not one value per output channel")
        if const_array(producer.inputs[1]) is None:
            return result.fail("weights are not constant")
        if len(producer.inputs) > 2 and producer.inputs[2] is not None and const_array(producer.inputs[2]) is None:
            return result.fail("the conv's bias is not constant")
        return result

    def rewrite(self, op, x, c, z):
        producer = z.producer()
        added = const_array(c).reshape(-1).astype(np.float64)
        old = producer.inputs[2] if len(producer.inputs) > 2 else None
        bias = added + (const_array(old).astype(np.float64) if old is not None else 0.0)
        dtype = const_array(producer.inputs[1]).dtype
        b = op.initializer(ir.tensor(bias.astype(dtype)), name=producer.inputs[1].name + "_bias_added")
        return getattr(op, self.producer_op)(x, producer.inputs[1], b, **_attrs(producer))


@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    """Fold inference BatchNormalization into the preceding Conv, ConvTranspose or Gemm; one
    that follows anything else (a ReLU, an Add: tf2onnx writes them) becomes the per-channel
    affine ``x·s + t`` it computes (``Mul`` and ``Add`` by constants, which lower to integer
    ops where a BatchNormalization has no integer form)."""

    name = "fold-batchnorm"

    def run(self, model: ir.Model, ctx) -> bool:
        if not any(n.op_type == "BatchNormalization" for n in model.graph):
            return False
        rules = [_FoldBatchNormIntoConv, _FoldBatchNormIntoConvTranspose, _FoldBatchNormIntoGemm]
        moved = PatternRewriter([_BiasAddIntoConv.rule(op, swapped) for op in ("Conv", "ConvTranspose")
                                 for swapped in (False, True)]).apply(model)
        stats = PatternRewriter(rules).apply(model)
        affine = PatternRewriter([_BatchNormAsAffine.rule()]).apply(model)
        remaining = [n for n in model.graph if n.op_type == "BatchNormalization"]
        if remaining:
            ctx.log(f"fold-batchnorm: {len(remaining)} BatchNorm left (e.g. {node_label(remaining[0])})")
        return stats.total + moved.total + affine.total > 0


class _BatchNormAsAffine(Rule):
    """``BN(x)`` (inference, constant parameters) → ``Add(Mul(x, s), t)`` with ``s, t`` from
    :func:`_bn_scale_shift`, shaped ``(1, C, 1, …)`` for the channel axis 1."""

    def pattern(self, op, x):
        return op.BatchNormalization(x, _allow_other_inputs=True, _outputs=["y"])

    def check(self, context, x, y):
        result = MatchResult()
        bn = y.producer()
        if len(bn.outputs) > 1 and any(o.uses() for o in bn.outputs[1:]):
            return result.fail("BatchNorm running-stat outputs are used (training graph)")
        if bn.attributes.get("training_mode") is not None and bn.attributes["training_mode"].as_int():
            return result.fail("BatchNorm is in training mode")
        if any(v is None or const_array(v) is None for v in bn.inputs[1:5]):
            return result.fail("BatchNorm parameters are not constant")
        if x.shape is None or len(x.shape) < 2 or x.dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE):
            return result.fail("input rank or type unknown")
        return result

    def rewrite(self, op, x, y):
        scale, shift = _bn_scale_shift(y.producer())
        shape = (1, -1) + (1,) * (len(x.shape) - 2)
        dtype = x.dtype.numpy()
        s = op.initializer(ir.tensor(scale.reshape(shape).astype(dtype)), name=(y.name or "bn") + "_scale")
        t = op.initializer(ir.tensor(shift.reshape(shape).astype(dtype)), name=(y.name or "bn") + "_shift")
        scaled = op.Mul(x, s)
        scaled.dtype, scaled.shape = x.dtype, x.shape  # typed: insert-fake-quant plans float tensors only
        return op.Add(scaled, t)
