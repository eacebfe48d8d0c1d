"""``merge-transposes``: ``Transpose(Transpose(x, p), q)`` → ``Transpose(x, p∘q)``.

Composition: output axis ``i`` of the outer transpose reads axis ``q[i]`` of the inner
result, which reads axis ``p[q[i]]`` of ``x``; so the merged permutation is
``r[i] = p[q[i]]``. When ``r`` is the identity both transposes vanish.
"""

from __future__ import annotations

from dataclasses import dataclass

from qcompiler.pipeline import Pass, option
from qcompiler.rewriter import MatchResult, PatternRewriter, Rule


class _MergeTransposes(Rule):
    def pattern(self, op, x):
        return op.Transpose(op.Transpose(x, _outputs=["inner"]), _outputs=["outer"])

    def check(self, context, x, inner, outer):
        if len(inner.uses()) != 1:
            return MatchResult().fail("the inner transpose has other readers")
        for value in (inner, outer):
            if value.producer().attributes.get("perm") is None:
                return MatchResult().fail("a transpose without an explicit perm")
        return True

    def rewrite(self, op, x, inner, outer):
        p = list(inner.producer().attributes["perm"].as_ints())
        q = list(outer.producer().attributes["perm"].as_ints())
        merged = [p[i] for i in q]
        if merged == sorted(merged):
            return op.Identity(x)
        return op.Transpose(x, perm=merged)


@dataclass(frozen=True)
class MergeTransposes(Pass):
    """Merge chains of Transpose nodes into one (or none)."""

    name = "merge-transposes"
    max_sweeps: int = option(8, "rewriter sweep cap")

    def run(self, model, ctx) -> bool:
        stats = PatternRewriter([_MergeTransposes], max_sweeps=self.max_sweeps).apply(model)
        ctx.log(f"merge-transposes: merged {stats.total} pairs")
        return stats.total > 0
