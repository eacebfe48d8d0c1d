"""``report.json``: what the compile did, per pass and per layer."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx_ir as ir

from .graph import get_stage


def build_report(model: ir.Model, ctx, target) -> dict:
    ops = Counter(
        node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        for node in model.graph
    )
    report = {
        "target": str(target),
        "stage": get_stage(model),
        "passes": [
            {"pass": str(r.pass_), "changed": r.changed, "seconds": round(r.seconds, 4)}
            for r in ctx.results
        ],
        "op_counts": dict(sorted(ops.items())),
    }
    report.update(ctx.report)
    return report


def write_report(out_dir: Path, model: ir.Model, ctx, target) -> None:
    report = build_report(model, ctx, target)
    for entry in report.get("passes", []):
        entry.pop("seconds", None)  # keep the artifact deterministic; timing goes to --time-passes
    report.pop("timing", None)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
