"""``report.json`` and ``report.html``: what the compile did, per layer, and what to fix.

Per layer: the chosen bits and granularity, the calibrated and chosen range, the
weight SQNR, and the output SQNR of the layer's tensor in the quantized model
against the float model on calibration samples; which ops stayed in float and
why; the whole-model output SQNR; the most sensitive layers with a suggested fix.
Plots (matplotlib) are embedded in the HTML as PNG images. No timestamps: the
report is part of a deterministic artifact.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir

from . import qstate
from .graph import get_stage
from .instruments import sqnr_db

#: Calibration samples used for the per-layer and whole-model SQNR.
REPORT_SAMPLES = 4


def build_report(model: ir.Model, ctx, target) -> dict:
    ops = Counter(
        node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        for node in model.graph
    )
    report = {
        "target": str(target),
        "stage": get_stage(model),
        "passes": [{"pass": str(r.pass_), "changed": r.changed} for r in ctx.results],
        "op_counts": dict(sorted(ops.items())),
    }
    report.update({k: v for k, v in ctx.report.items() if k != "timing"})
    measured = _measure(model, ctx)
    if measured:
        report.update(measured)
    report["layers"] = _layers(report)
    report["sensitive_layers"] = _suggestions(report["layers"], report)
    return report


def _measure(model: ir.Model, ctx) -> dict:
    """Output SQNR of every quantized tensor and of the model outputs, against float."""
    from .interpreter import ReferenceInterpreter

    float_proto = qstate.float_reference(model)
    if float_proto is None or ctx.calibration is None:
        return {}
    fake = qstate.fakequant_snapshot(model)
    fake_model = fake if fake is not None else (ir.to_proto(model) if get_stage(model) == "fakequant" else None)
    samples = ctx.sample_inputs(model, REPORT_SAMPLES)
    float_run = ReferenceInterpreter(float_proto)
    final_run = ReferenceInterpreter(model)
    outputs = [o.name for o in float_proto.graph.output]
    ref_out, got_out, per_tensor = [], [], {}
    fake_run = ReferenceInterpreter(fake_model) if fake_model is not None else None
    for feeds in samples:
        reference = float_run.run_all(feeds)
        final = final_run.run(feeds)
        ref_out.append(np.concatenate([np.ravel(reference[n]) for n in outputs]))
        got_out.append(np.concatenate([np.ravel(final[n]) for n in final_run.output_names]))
        if fake_run is not None:
            quantized = fake_run.run_all(feeds)
            for name, value in reference.items():
                dq = quantized.get(f"{name}_dq")
                if dq is not None and np.asarray(value).dtype.kind == "f" and dq.shape == np.shape(value):
                    finite = np.isfinite(value) & (np.abs(value) < 1e30)
                    per_tensor.setdefault(name, []).append((np.asarray(value)[finite], dq[finite]))
    tensor_sqnr = {
        name: round(sqnr_db(np.concatenate([a for a, _ in pairs]), np.concatenate([b for _, b in pairs])), 2)
        for name, pairs in per_tensor.items()
    }
    return {
        "whole_model": {
            "output_sqnr_db": round(sqnr_db(np.concatenate(ref_out), np.concatenate(got_out)), 2),
            "samples": len(samples),
            "against": "float model, reference interpreter",
        },
        "tensor_sqnr_db": tensor_sqnr,
    }


def _layers(report: dict) -> list[dict]:
    """One row per quantized activation tensor, joined with its weight (if any)."""
    weights = {row["node"]: row for row in report.get("weights", [])}
    bits = {row["node"]: row["bits"] for row in report.get("mixed_precision", {}).get("weights", [])}
    sqnr = report.get("tensor_sqnr_db", {})
    rows = []
    for act in report.get("activations", []):
        weight = weights.get(act["producer"])
        row = {
            "tensor": act["tensor"],
            "node": act["producer"],
            "op": act["op"],
            "activation_format": act["format"],
            "calibrated_range": act["calibrated"],
            "range": act["range"],
            "range_method": act["method"],
            "output_sqnr_db": sqnr.get(act["tensor"]),
        }
        if weight is not None:
            row["weight_format"] = weight["format"]
            row["weight_sqnr_db"] = weight["sqnr_db"]
            if weight["node"] in bits:
                row["weight_bits"] = bits[weight["node"]]
        rows.append(row)
    for row in report.get("weights", []):  # weights whose output is not a quantized tensor (e.g. inside a group)
        if not any(r["node"] == row["node"] for r in rows):
            rows.append({"tensor": None, "node": row["node"], "op": row["op"], "weight_format": row["format"],
                         "weight_sqnr_db": row["sqnr_db"], "weight_bits": bits.get(row["node"]),
                         "output_sqnr_db": None})
    return rows


def _suggestions(layers: list[dict], report: dict, count: int = 10) -> list[dict]:
    """The layers with the lowest output SQNR and what would most likely help."""
    scored = [r for r in layers if r.get("output_sqnr_db") is not None]
    scored.sort(key=lambda r: r["output_sqnr_db"])
    out = []
    for row in scored[:count]:
        fmt = row.get("activation_format", "")
        if row.get("weight_bits") == 4 or "int4" in row.get("weight_format", ""):
            fix = f"keep the weights of '{row['node']}' at 8 bits (insert-fake-quant overrides=\"{row['node']}=w:int8:per-channel\")"
        elif fmt.startswith("int8") or fmt.startswith("uint8"):
            fix = f"give '{row['tensor']}' 16 bits (overrides=\"{row['node']}=a:int16:per-tensor:asym\"), or raise wide_below_db"
        elif row.get("weight_sqnr_db") is not None and row["weight_sqnr_db"] < 30:
            fix = "equalize the weights first (cross-layer-equalization / smooth-quant)"
        else:
            fix = f"keep '{row['node']}' in float (overrides=\"{row['node']}=float\") if the target allows"
        out.append({"tensor": row["tensor"], "node": row["node"], "op": row["op"], "output_sqnr_db": row["output_sqnr_db"], "suggestion": fix})
    return out


def write_report(out_dir: Path, model: ir.Model, ctx, target) -> None:
    report = build_report(model, ctx, target)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=_default) + "\n")
    (out_dir / "report.html").write_text(render_html(report))


def _default(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# -- HTML -----------------------------------------------------------------------------------


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _plots(report: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    layers = [r for r in report["layers"] if r.get("output_sqnr_db") is not None]
    if layers:
        fig, ax = plt.subplots(figsize=(10, 3))
        colors = ["tab:orange" if r.get("activation_format", "").startswith(("int16", "uint16")) else "tab:blue" for r in layers]
        ax.bar(range(len(layers)), [min(r["output_sqnr_db"], 80) for r in layers], color=colors)
        ax.set_xlabel("quantized tensor (graph order); orange = 16-bit")
        ax.set_ylabel("output SQNR (dB)")
        ax.set_title("Per-tensor SQNR against float")
        plots.append(("Per-tensor SQNR", _png(fig)))
    weights = report.get("mixed_precision", {}).get("weights", [])
    if weights:
        fig, ax = plt.subplots(figsize=(10, 3))
        ax.bar(range(len(weights)), [w["bits"] for w in weights], color="tab:green", label="chosen bits")
        ax.plot(range(len(weights)), [w["theorem8_bits"] for w in weights], "k.", label="Theorem 8 closed form")
        ax.set_ylabel("weight bits")
        ax.set_xlabel("weight layer (graph order)")
        ax.legend()
        plots.append(("Mixed-precision allocation", _png(fig)))
    learning = report.get("learning", {})
    if learning.get("curve"):
        fig, ax = plt.subplots(figsize=(10, 3))
        stride = learning.get("curve_stride", 1)
        ax.plot([i * stride for i in range(len(learning["curve"]))], learning["curve"], color="tab:purple")
        ax.axhline(learning["loss_before"], color="k", linestyle="--", label="calibrated (before learning)")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss ‖Ŷ−Y‖²/‖Y‖²")
        ax.legend()
        plots.append(("Learning (learn-quant)", _png(fig)))
    return plots


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = "".join(f"<td>{html.escape(_cell(row.get(c)))}</td>" for c in columns)
        body.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return str(value)


def render_html(report: dict) -> str:
    whole = report.get("whole_model", {})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>qcompiler report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px}th{background:#eee}</style></head><body>",
        "<h1>qcompiler report</h1>",
        f"<p>Target <b>{html.escape(report['target'])}</b>, stage <b>{html.escape(report['stage'])}</b>. "
        f"Pipeline: <code>{html.escape(', '.join(p['pass'] for p in report['passes']))}</code></p>",
    ]
    if whole:
        parts.append(f"<p>Whole model: output SQNR <b>{whole['output_sqnr_db']} dB</b> against the float model "
                     f"on {whole['samples']} calibration samples.</p>")
    for title, image in _plots(report):
        parts.append(f"<h2>{html.escape(title)}</h2><img src='data:image/png;base64,{image}'>")
    if report.get("sensitive_layers"):
        parts.append("<h2>Most sensitive layers</h2>")
        parts.append(_table(report["sensitive_layers"], ["tensor", "node", "op", "output_sqnr_db", "suggestion"]))
    kept = report.get("kept_float", [])
    parts.append("<h2>Ops kept in float</h2>")
    parts.append(_table(kept, ["node", "op", "reason"]) if kept else "<p>None.</p>")
    variants = report.get("integer_lowering", {}).get("variants", [])
    if variants:
        parts.append("<h2>Integer nonlinear ops (error as a fraction of the output range)</h2>")
        parts.append(_table([{**v, "errors": json.dumps(v["errors"])} for v in variants], ["node", "op", "errors", "chosen"]))
    parts.append("<h2>Layers</h2>")
    parts.append(_table(report["layers"], ["tensor", "node", "op", "activation_format", "calibrated_range", "range",
                                           "range_method", "weight_format", "weight_bits", "weight_sqnr_db", "output_sqnr_db"]))
    parts.append("</body></html>\n")
    return "".join(parts)


__all__ = ["build_report", "render_html", "write_report"]
