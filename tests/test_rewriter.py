"""The pattern rewriter: per-rule counts, refusals with reasons, capped fixed point."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from builders import make_model, run, tensor, to_ir
from qcompiler.errors import RewriteDidNotConverge
from qcompiler.rewriter import RULE_KEY, MatchResult, PatternRewriter, Rule


class NegNeg(Rule):
    """Neg(Neg(x)) -> x"""

    def pattern(self, op, x):
        return op.Neg(op.Neg(x))

    def rewrite(self, op, x):
        return x


class AbsToNegNeg(Rule):
    """A rule that undoes NegToAbs: together they never converge."""

    def pattern(self, op, x):
        return op.Abs(x)

    def rewrite(self, op, x):
        return op.Relu(x)


class ReluToAbs(Rule):
    def pattern(self, op, x):
        return op.Relu(x)

    def rewrite(self, op, x):
        return op.Abs(x)


class RefuseAll(Rule):
    def pattern(self, op, x):
        return op.Neg(x)

    def check(self, context, x):
        return MatchResult().fail("refused on purpose")

    def rewrite(self, op, x):  # pragma: no cover - never reached
        return op.Identity(x)


def chain_model(ops):
    nodes, prev = [], "x"
    for i, op in enumerate(ops):
        out = "y" if i == len(ops) - 1 else f"t{i}"
        nodes.append(helper.make_node(op, [prev], [out], name=f"n{i}"))
        prev = out
    return to_ir(make_model(nodes, [tensor("x", [2, 3])], [tensor("y", [2, 3])]))


def test_counts_and_fixed_point():
    model = chain_model(["Neg", "Neg", "Neg", "Neg", "Relu"])
    x = np.arange(6, dtype=np.float32).reshape(2, 3) - 3
    before = run(model, {"x": x})["y"]
    stats = PatternRewriter([NegNeg]).apply(model)
    assert stats.counts["NegNeg"] == 2
    assert [n.op_type for n in model.graph] == ["Relu"]
    np.testing.assert_array_equal(run(model, {"x": x})["y"], before)


def test_graph_output_is_not_aliased_to_graph_input():
    model = chain_model(["Neg", "Neg"])  # y = Neg(Neg(x)): removing both would make y = x
    stats = PatternRewriter([NegNeg]).apply(model)
    assert stats.total == 0
    assert len(list(model.graph)) == 2


def test_new_nodes_record_the_rule():
    model = chain_model(["Abs", "Neg"])
    PatternRewriter([AbsToNegNeg]).apply(model)
    relu = next(n for n in model.graph if n.op_type == "Relu")
    assert relu.metadata_props[RULE_KEY] == "AbsToNegNeg"


def test_refusal_leaves_graph_alone():
    model = chain_model(["Neg", "Neg", "Relu"])
    assert PatternRewriter([RefuseAll]).apply(model).total == 0
    assert [n.op_type for n in model.graph] == ["Neg", "Neg", "Relu"]


def test_cap_names_the_last_rule():
    model = chain_model(["Neg", "Relu"])
    with pytest.raises(RewriteDidNotConverge, match="after 5 sweeps.*'(ReluToAbs|AbsToNegNeg)'"):
        PatternRewriter([ReluToAbs, AbsToNegNeg], max_sweeps=5).apply(model)
