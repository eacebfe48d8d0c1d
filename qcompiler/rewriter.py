"""The one pattern rewriter every rewriting pass goes through.

Rules are written with onnxscript's pattern language over the IR's own builder
(subclass :class:`Rule`: ``pattern`` builds the graph to match, ``check`` returns a
failing :class:`MatchResult` with a reason to refuse, ``rewrite`` builds the
replacement). :class:`PatternRewriter` sweeps the graph until no rule fires, up to
a cap; when the cap is hit it raises naming the last rule that fired, since a
rule set that never converges is a bug.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

import onnx_ir as ir
import onnx_ir.passes.common as ir_common
from onnxscript.rewriter import MatchResult, RewriteRule, RewriteRuleClassBase

from .errors import RewriteDidNotConverge
from .graph import NameFactory

__all__ = ["MatchResult", "PatternRewriter", "RewriteStats", "Rule", "RULE_KEY", "matches"]

#: Base class for rules (onnxscript's class-based rewrite rule).
Rule = RewriteRuleClassBase

#: Node metadata key naming the rule that created the node.
RULE_KEY = "qcompiler.rule"


@dataclasses.dataclass
class RewriteStats:
    counts: Counter
    sweeps: int

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def matches(model: ir.Model, rules: Sequence[RewriteRule], op_types: Sequence[str]) -> bool:
    """Whether some rule would fire on a node of ``op_types``, without changing the model.

    (A rule's ``try_rewrite`` builds its replacement nodes; those are disconnected again here,
    so that they leave no uses behind on the values they read.)"""
    for node in model.graph:
        if node.op_type not in op_types:
            continue
        for rule in rules:
            delta = rule.try_rewrite(model, model.graph, node)
            if delta is not None:
                for new in delta.new_nodes:
                    for index in range(len(new.inputs)):
                        new.replace_input_with(index, None)
                return True
    return False


class PatternRewriter:
    """Apply ``rules`` to a graph until a fixed point, at most ``max_sweeps`` sweeps."""

    def __init__(self, rules: Sequence[Rule | RewriteRule | type[Rule]], max_sweeps: int = 16):
        self.rules: list[RewriteRule] = []
        for rule in rules:
            if isinstance(rule, type):
                rule = rule.rule()
            elif isinstance(rule, RewriteRuleClassBase):
                rule = type(rule).rule()
            self.rules.append(rule)
        self.max_sweeps = max_sweeps

    def apply(self, model: ir.Model) -> RewriteStats:
        graph = model.graph
        counts: Counter = Counter()
        last_rule = None
        for sweep in range(1, self.max_sweeps + 1):
            fired = 0
            for node in list(graph):  # new nodes wait for the next sweep
                if node.graph is not graph:
                    continue  # removed by an earlier rewrite of this sweep
                for rule in self.rules:
                    delta = rule.try_rewrite(model, graph, node)
                    if delta is None or not self._commit(graph, node, delta, rule):
                        continue
                    counts[str(rule)] += 1
                    last_rule = str(rule)
                    fired += 1
                    break
            if not fired:
                if counts:
                    ir_common.RemoveUnusedNodesPass()(model)
                    ir_common.NameFixPass()(model)
                return RewriteStats(counts, sweep)
        raise RewriteDidNotConverge(
            f"pattern rewriter: no fixed point after {self.max_sweeps} sweeps; "
            f"the last rule applied was '{last_rule}'"
        )

    def _commit(self, graph: ir.Graph, node: ir.Node, delta, rule: RewriteRule) -> bool:
        match = delta.match
        new_nodes = list(delta.new_nodes)
        created = set(map(id, new_nodes))
        for old, new in zip(match.outputs, delta.new_outputs):
            reused = new.producer() is None or id(new.producer()) not in created
            if reused and old.is_graph_output() and (
                new.is_graph_input() or new.is_initializer() or new.is_graph_output()
            ):
                return False  # cannot alias a graph output to another graph-level value
        names = NameFactory(graph)
        for init in delta.new_initializers:
            if init.name in graph.initializers and graph.initializers[init.name] is not init:
                init.name = names(init.name)
            if init.name not in graph.initializers:
                graph.register_initializer(init)
        for old, new in zip(match.outputs, delta.new_outputs):
            reused = new.producer() is None or id(new.producer()) not in created
            if reused:
                if old.is_graph_output():
                    new.name = old.name if not (new.is_graph_input() or new.is_initializer()) else new.name
                old.replace_all_uses_with(new, replace_graph_outputs=True)
            else:
                new.name = old.name
                if new.type is None:
                    new.type = old.type
                if new.shape is None:
                    new.shape = old.shape
                old.replace_all_uses_with(new, replace_graph_outputs=True)
        graph.insert_after(node, new_nodes)
        graph.remove(list(match.nodes), safe=True)
        for new_node in new_nodes:
            new_node.metadata_props[RULE_KEY] = str(rule)
        return True
