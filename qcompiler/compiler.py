"""The compile driver: pipeline → target legalisation → check → build → manifest."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import onnx_ir as ir

from . import qstate
from .artifact import atomic_output_dir, tool_versions, write_manifest
from .calibdata import CalibrationData, input_specs
from .errors import TargetError
from .graph import get_stage, index_input_ranges
from .instruments import default_instruments
from .io_quantization import integer_io
from .passmanager import Instrument, PassContext, run_pipeline
from .pipeline import Pipeline
from .target import Target


@dataclasses.dataclass
class CompileResult:
    out_dir: Path
    manifest: dict
    context: PassContext
    model: ir.Model


def _io(values, ranges: dict[str, tuple[int, int, str]] | None = None, quantization: dict | None = None) -> list[dict]:
    entries = []
    for v in values:
        entry = {
            "name": v.name,
            "shape": [d if isinstance(d, int) else str(d) for d in (v.shape or [])],
            "dtype": str(v.dtype.numpy()),
        }
        if ranges and v.name in ranges:
            lo, hi, reason = ranges[v.name]
            entry["valid_range"] = {"min": lo, "max": hi, "reason": reason}
        if quantization and v.name in quantization:
            entry["quantization"] = quantization[v.name]
        entries.append(entry)
    return entries


def _write_qdq_model(out_dir: Path, model: ir.Model) -> None:
    """``model.qdq.onnx``: the fake-quant (QDQ) model that onnxruntime runs, when the pipeline
    made one, with its float reference beside it (``model.qdq.float.onnx``) so it can be
    compiled again from that stage (see :mod:`qcompiler.qstate`)."""
    proto = qstate.fakequant_snapshot(model)
    if proto is None and get_stage(model) == "fakequant":
        proto = ir.to_proto(model)
    if proto is not None:
        qstate.save_fakequant(proto, qstate.float_reference(model), out_dir / "model.qdq.onnx")


def _verify(model: ir.Model, target: Target, folder: Path, ctx: PassContext, count: int) -> dict:
    """Run the artifact in ``folder`` against the reference interpreter (see :mod:`.verification`)."""
    from .artifact import read_manifest
    from .verification import verify_build

    samples = ctx.sample_inputs(model, count)
    source = "calibration" if ctx.calibration is not None else "generated"

    def build_probe(probe: ir.Model, where: Path):
        info = target.build(probe, where, None) or {}
        manifest = {"inputs": _io(probe.graph.inputs), "outputs": _io(probe.graph.outputs), "target_info": info}
        return target.load(where, manifest)

    return verify_build(
        model, target, lambda: target.load(folder, read_manifest(folder)), samples,
        build_probe=build_probe, sample_source=source, artifact=folder,
    )


def compile_model(
    model: ir.Model,
    target: Target,
    out_dir: str | os.PathLike,
    *,
    pipeline: Pipeline,
    calibration: CalibrationData | None = None,
    seed: int = 0,
    instruments: list[Instrument] | None = None,
    force: bool = False,
    report: bool = False,
    log=lambda message: None,
    tuning=None,
    verify: bool = True,
    verify_samples: int = 2,
    cluster=None,
) -> CompileResult:
    """Compile ``model`` (modified in place) for ``target`` into ``out_dir``.

    Nothing is written unless everything succeeds; ``out_dir`` then holds the
    target's files and ``manifest.json`` (and ``report.json`` with ``report``).

    ``verify`` (default): run the artifact on ``verify_samples`` inputs (calibration samples,
    else generated ones) against the reference interpreter; the manifest's ``verified``
    says how it went, and a build that disagrees raises
    :class:`~qcompiler.verification.VerificationError` (see :mod:`qcompiler.verification`).

    ``tuning`` (a :class:`qcompiler.targets.tvm_bridge.tuning.TuningOptions`): tune the kernels with
    MetaSchedule and keep the results in a database; only targets with ``tunable`` take it
    (others raise :class:`TargetError`). The manifest's ``tuning`` says what was done.

    ``cluster`` (``"local:N"``, ``"ray://HOST:PORT"`` or a connected
    :class:`qcompiler.cluster.Cluster`): calibration statistics are computed in shards on
    it and merged exactly; every output file is the same as without it.
    """
    if tuning is not None and not target.tunable:
        from .target import default_targets

        tunable = sorted(cls.name for cls in default_targets() if cls.tunable)
        raise TargetError(
            f"target '{target.name}' cannot be tuned (--tune works for: {', '.join(tunable) or 'no target'})"
        )
    if calibration is not None:
        calibration.bind(input_specs(model))
    ctx = PassContext(
        seed=seed,
        calibration=calibration,
        instruments=default_instruments() + list(instruments or []),
        log=log,
        target=target.capabilities,
        target_name=target.name,
    )
    ctx.options["progress"] = sys.stderr.isatty()  # calibration and learning show a bar on a terminal
    if tuning is not None:
        ctx.options["tuning"] = tuning
    if isinstance(cluster, str):  # a spec: connect for this compile only
        from .cluster import connect

        with connect(cluster) as connected:
            return compile_model(model, target, out_dir, pipeline=pipeline, calibration=calibration, seed=seed,
                                 instruments=instruments, force=force, report=report, log=log, tuning=tuning,
                                 verify=verify, verify_samples=verify_samples, cluster=connected)
    if cluster is not None:
        ctx.options["cluster"] = cluster
    full = pipeline
    if target.legalize:
        full = pipeline + Pipeline.parse(target.legalize)
    with atomic_output_dir(out_dir, force=force) as tmp:
        run_pipeline(full, model, ctx)
        target.check(model)
        target_info = target.build(model, tmp, ctx) or {}
        _write_qdq_model(tmp, model)
        manifest = {
            "target": target.name,
            "target_spec": str(target),
            "pipeline": str(pipeline),
            "legalize": target.legalize,
            "stage": get_stage(model),
            "seed": seed,
            "inputs": _io(model.graph.inputs, index_input_ranges(model), integer_io(model)),
            "outputs": _io(model.graph.outputs, quantization=integer_io(model)),
            "versions": tool_versions(),
            "target_info": target_info,
            "tuning": target_info.pop("tuning", None) if tuning is not None else None,
        }
        write_manifest(tmp, manifest)  # the runner reads it
        if verify:
            manifest["verified"] = _verify(model, target, tmp, ctx, verify_samples)
        else:
            manifest["verified"] = {"status": "not-run", "reason": "verification was turned off (--no-verify)"}
        ctx.report["verified"] = manifest["verified"]
        if report:
            from .report import write_report

            write_report(tmp, model, ctx, target)
        write_manifest(tmp, manifest)
    return CompileResult(Path(out_dir), json.loads((Path(out_dir) / "manifest.json").read_text()), ctx, model)
