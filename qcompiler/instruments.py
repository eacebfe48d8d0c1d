"""Instruments: observers that run around every pass of a pipeline."""

from __future__ import annotations

import io
import sys
import tempfile
import traceback
from pathlib import Path
from typing import TextIO

import numpy as np
import onnx_ir as ir

from .errors import QCompilerError
from .graph import CREATED_BY_KEY
from .passmanager import Instrument, PassContext, PassResult
from .pipeline import Pass, Pipeline
from .verify import VerificationError, verify


class NumericCheckFailed(QCompilerError):
    """A pass that should keep outputs equal changed them beyond the tolerance."""


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(Σ ref² / Σ (ref − test)²)`` in dB."""
    reference = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((reference - np.asarray(test, dtype=np.float64)) ** 2))
    signal = float(np.sum(reference**2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * np.log10(signal / noise)


def max_relative_error(reference: np.ndarray, test: np.ndarray) -> float:
    """``max|ref − test| / max|ref|``: error relative to the output's magnitude."""
    reference = np.asarray(reference, dtype=np.float64)
    diff = float(np.max(np.abs(reference - np.asarray(test, dtype=np.float64)), initial=0.0))
    scale = float(np.max(np.abs(reference), initial=0.0))
    return diff / scale if scale > 0 else diff


class Timing(Instrument):
    """Wall time per pass; ``table()`` formats it."""

    def __init__(self):
        self.rows: list[tuple[str, float, bool]] = []

    def after_pass(self, p: Pass, model, ctx, result: PassResult) -> None:
        self.rows.append((str(p), result.seconds, result.changed))

    def after_pipeline(self, pipeline, model, ctx) -> None:
        ctx.report["timing"] = [{"pass": n, "seconds": round(s, 6), "changed": c} for n, s, c in self.rows]

    def table(self) -> str:
        total = sum(s for _, s, _ in self.rows) or 1e-12
        lines = [f"{'seconds':>9}  {'%':>5}  changed  pass"]
        for name, seconds, changed in self.rows:
            lines.append(f"{seconds:9.3f}  {100 * seconds / total:5.1f}  {'yes' if changed else 'no':>7}  {name}")
        lines.append(f"{total:9.3f}  100.0           total")
        return "\n".join(lines)


class PrintIRAfterChange(Instrument):
    """Write the IR as text after every pass that changed it."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr

    def after_pass(self, p: Pass, model, ctx, result: PassResult) -> None:
        if result.changed:
            self.stream.write(f"// ----- IR after {p} -----\n{model.graph}\n")


class VerifyEach(Instrument):
    """Check the IR's invariants after every pass; fail naming the pass that broke them."""

    def __init__(self, check_schemas: bool = True):
        self.check_schemas = check_schemas

    def before_pipeline(self, pipeline, model, ctx) -> None:
        self._verify(model, "before the pipeline")

    def after_pass(self, p: Pass, model, ctx, result: PassResult) -> None:
        if result.changed:
            self._verify(model, f"after pass '{p}'")

    def _verify(self, model, when: str) -> None:
        try:
            verify(model, check_schemas=self.check_schemas)
        except VerificationError as exc:
            raise QCompilerError(f"invalid IR {when}: {exc}") from None


class NumericCheck(Instrument):
    """Run the reference interpreter before and after each pass on sample inputs.

    Float-equivalent passes (``preserves_numerics``) must keep every output within
    ``tolerance`` (max relative error); other passes get their SQNR against the
    pipeline's input model reported. Results go to ``ctx.report["numeric_check"]``.
    """

    def __init__(self, tolerance: float = 1e-5, samples: int = 1, strict: bool = True):
        self.tolerance = tolerance
        self.samples = samples
        self.strict = strict
        self._baseline: list[dict[str, np.ndarray]] | None = None
        self._previous: list[dict[str, np.ndarray]] | None = None

    def _outputs(self, model, ctx: PassContext) -> list[list[np.ndarray]]:
        """Float outputs (in graph-output order) for each sample input."""
        from .interpreter import ReferenceInterpreter

        interpreter = ReferenceInterpreter(model)
        runs = [interpreter.run(feeds) for feeds in ctx.sample_inputs(model, self.samples)]
        return [[out for out in r.values() if np.asarray(out).dtype.kind == "f"] for r in runs]

    def before_pipeline(self, pipeline, model, ctx) -> None:
        self._baseline = self._previous = self._outputs(model, ctx)
        ctx.report.setdefault("numeric_check", [])

    def after_pass(self, p: Pass, model, ctx, result: PassResult) -> None:
        if not result.changed:
            return
        current = self._outputs(model, ctx)
        entry: dict = {"pass": str(p)}
        if p.preserves_numerics:
            error = max(
                (max_relative_error(a, b) for prev, cur in zip(self._previous, current) for a, b in zip(prev, cur)),
                default=0.0,
            )
            entry["max_relative_error"] = error
            if self.strict and error > self.tolerance:
                raise NumericCheckFailed(
                    f"pass '{p}' should keep outputs equal but changed them by {error:.3g} "
                    f"(relative; tolerance {self.tolerance:g})"
                )
        entry["sqnr_db"] = min(
            (sqnr_db(a, b) for base, cur in zip(self._baseline, current) for a, b in zip(base, cur)),
            default=float("inf"),
        )
        ctx.report["numeric_check"].append(entry)
        ctx.log(f"numeric check after {p}: " + ", ".join(f"{k}={v:.4g}" for k, v in entry.items() if k != "pass"))
        self._previous = current


class Provenance(Instrument):
    """Tag each node a pass creates with ``qcompiler.created_by = <pass name>``."""

    def before_pass(self, p, model, ctx) -> None:
        self._known = {id(node) for node in model.graph}

    def after_pass(self, p: Pass, model, ctx, result: PassResult) -> None:
        if result.changed:
            for node in model.graph:
                if id(node) not in self._known:
                    node.metadata_props.setdefault(CREATED_BY_KEY, p.name)


class Reproducer(Instrument):
    """On a pass failure, save the pipeline's input model, the spec and the traceback."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory else None

    def before_pipeline(self, pipeline: Pipeline, model, ctx) -> None:
        self._pipeline = pipeline
        self._model_bytes = ir.to_proto(model).SerializeToString()

    def on_failure(self, p: Pass, model, ctx, error: BaseException) -> str | None:
        directory = self.directory or Path(tempfile.mkdtemp(prefix="qcompiler-repro-"))
        directory.mkdir(parents=True, exist_ok=True)
        passes = self._pipeline.passes
        spec = str(Pipeline(passes[: passes.index(p) + 1]))
        (directory / "model.onnx").write_bytes(self._model_bytes)
        (directory / "pipeline.txt").write_text(spec + "\n")
        trace = io.StringIO()
        traceback.print_exception(error, file=trace)
        (directory / "error.txt").write_text(trace.getvalue())
        (directory / "README.md").write_text(
            "Reproduce with:\n\n"
            f"    qcompile model.onnx --target reference -o out --pipeline \"$(cat pipeline.txt)\" "
            f"--seed {ctx.seed} --debug\n\n"
            "(add the same --calib DATA if the failing run used one)\n"
        )
        return str(directory)


def default_instruments() -> list[Instrument]:
    return [Provenance()]
