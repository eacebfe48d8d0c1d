"""``fuse-rmsnorm``: decomposed RMSNorm subgraphs → one ``RMSNormalization`` node (opset 23).

``RMSNorm(x) = x / √(mean(x², last axis) + ε) · γ``, as LLaMA-family exports write it:
``x²`` as ``Pow(x, 2)`` or ``x·x``; ``ReduceMean`` over the last axis (``axes`` input or
attribute, kept); ``+ ε``; ``√``; then ``x · Reciprocal(√·)``, ``x · (1 / √·)`` or
``x / √·``; then ``· γ`` (either operand order; without it γ = 1). The fused node is
float-equal to the subgraph. One op is what the integer lowering needs: ``IntRMSNorm``
instead of ``x²``, its mean and the reciprocal root each getting a per-tensor scale
(which made a 135 M decoder's W8A8 perplexity explode).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter._pattern_ir import Constant, OrValue

from qcompiler.graph import const_array, ensure_opset
from qcompiler.pipeline import Pass
from qcompiler.rewriter import MatchResult, PatternRewriter, Rule, matches

RMSNORM_OPSET = 23
_FLOAT = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)


def _either(fn, a, b):
    return OrValue([fn(a, b), fn(b, a)])


def _const(value: float):
    return OrValue([Constant(value, rel_tol=1e-6), Constant([value], rel_tol=1e-6)])


class _RMSNorm(Rule):
    """``x / √(mean(x²) + ε)`` in one of its exported ``form``s (``mul``: ``x · inverse``,
    ``mul_swapped``: ``inverse · x``, ``div``: ``x / √·``), times γ on the ``left``, the
    ``right`` or not at all (``gamma=None``). The root of a pattern must be a node, so each
    combination is a rule of its own."""

    def __init__(self, form: str, gamma: str | None):
        super().__init__(name=f"RMSNorm[{form},{gamma or 'no-scale'}]")
        self.form, self.gamma_side = form, gamma

    def normed(self, op, x, axes, eps):
        square = OrValue([op.Pow(x, _const(2.0)), op.Mul(x, x)])
        mean = op.ReduceMean(square, axes, _outputs=["mean"])
        root = op.Sqrt(_either(op.Add, mean, eps))
        if self.form == "div":
            return op.Div(x, root)
        inverse = OrValue([op.Reciprocal(root), op.Div(_const(1.0), root)])
        return op.Mul(inverse, x) if self.form == "mul_swapped" else op.Mul(x, inverse)

    def pattern(self, op, x, axes, eps, gamma):
        normed = self.normed(op, x, axes, eps)
        if self.gamma_side == "left":
            return op.Mul(gamma, normed)
        if self.gamma_side == "right":
            return op.Mul(normed, gamma)
        return normed

    def check(self, context, x, axes, eps, mean, gamma=None, **_):
        if x.dtype not in _FLOAT or x.shape is None or len(x.shape) == 0:
            return MatchResult().fail("not a float tensor of known rank")
        rank = len(x.shape)
        producer = mean.producer()
        keep = producer.attributes.get_int("keepdims", 1)
        axes_value = const_array(axes)
        if axes_value is None or keep != 1 or [int(a) % rank for a in np.ravel(axes_value)] != [rank - 1]:
            return MatchResult().fail("not a mean over the last axis (kept)")
        eps_value = const_array(eps)
        if eps_value is None or eps_value.size != 1 or not 0 <= float(eps_value.reshape(-1)[0]) < 1:
            return MatchResult().fail("epsilon is not a small constant scalar")
        if self.gamma_side is not None:
            channels = x.shape[-1]
            g = const_array(gamma)
            if g is None or not isinstance(channels, int) or g.size not in (1, channels) or (
                g.ndim > 1 and g.shape[:-1] != (1,) * (g.ndim - 1)
            ):
                return MatchResult().fail("the scale is not a constant per-channel vector")
        return True

    def rewrite(self, op, x, eps, gamma=None, **_):
        channels = x.shape[-1]
        g = np.ones(channels) if self.gamma_side is None else np.broadcast_to(const_array(gamma).reshape(-1), (channels,))
        epsilon = float(const_array(eps).reshape(-1)[0])
        weight = op.initializer(ir.tensor(np.ascontiguousarray(g, dtype=x.dtype.numpy()), name="rmsnorm_scale"))
        return op.RMSNormalization(x, weight, axis=-1, epsilon=epsilon, stash_type=1)


def rmsnorm_rules(scaled: bool = True) -> list:
    """The scaled forms, or the unscaled ones (a scaled RMSNorm contains an unscaled one:
    the scaled rules run first, on the whole graph)."""
    forms = ("mul", "mul_swapped", "div")
    return [_RMSNorm.rule(f, side) for side in (("left", "right") if scaled else (None,)) for f in forms]


@dataclass(frozen=True)
class FuseRMSNorm(Pass):
    """Fuse decomposed RMSNorm subgraphs into one RMSNormalization node (opset 23; float-exact)."""

    name = "fuse-rmsnorm"
    stages = ("float",)

    def run(self, model: ir.Model, ctx) -> bool:
        if not any(node.op_type == "ReduceMean" for node in model.graph):
            return False
        if not matches(model, rmsnorm_rules(True) + rmsnorm_rules(False), ("Mul", "Div")):
            return False
        ensure_opset(model, RMSNORM_OPSET)
        total = sum(PatternRewriter(rmsnorm_rules(scaled)).apply(model).total for scaled in (True, False))
        ctx.report["fuse_rmsnorm"] = ctx.report.get("fuse_rmsnorm", 0) + total
        ctx.log(f"fuse-rmsnorm: {total} RMSNorm(s) fused")
        return total > 0
