"""Run a pipeline on a model: the pass context, analyses and instrument hooks.

The :class:`PassContext` carries what passes share: options, a seed, the calibration
data, a cache of analyses (recomputed only after a pass changes the model), a
report that passes fill, and instruments that watch every pass (timing, IR dumps,
verification, numeric checks, provenance, reproducers: see ``instruments.py``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from .calibdata import CalibrationData, input_specs
from .errors import PassFailure, PipelineError, QCompilerError
from .graph import get_stage, set_stage
from .pipeline import Pass, Pipeline


class Analysis:
    """A cached, recomputable fact about the model (ranges, sensitivities, costs).

    Subclasses are frozen dataclasses (their fields are the parameters, so different
    parameters are cached separately) with a ``name`` and ``compute(model, ctx)``.
    """

    name: ClassVar[str] = ""

    def compute(self, model: ir.Model, ctx: PassContext) -> Any:  # pragma: no cover
        raise NotImplementedError


class Instrument:
    """Hooks around every pass. Override what you need."""

    def before_pipeline(self, pipeline: Pipeline, model: ir.Model, ctx: PassContext) -> None: ...

    def before_pass(self, p: Pass, model: ir.Model, ctx: PassContext) -> None: ...

    def after_pass(self, p: Pass, model: ir.Model, ctx: PassContext, result: PassResult) -> None: ...

    def after_pipeline(self, pipeline: Pipeline, model: ir.Model, ctx: PassContext) -> None: ...

    def on_failure(self, p: Pass, model: ir.Model, ctx: PassContext, error: BaseException) -> str | None:
        """Called when ``p`` raised; may return a path (e.g. of a reproducer)."""
        return None


@dataclasses.dataclass
class PassResult:
    pass_: Pass
    changed: bool
    seconds: float
    stage_before: str
    stage_after: str


@dataclasses.dataclass
class PassContext:
    """What every pass of one pipeline run shares."""

    seed: int = 0
    calibration: CalibrationData | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    instruments: list[Instrument] = dataclasses.field(default_factory=list)
    report: dict[str, Any] = dataclasses.field(default_factory=dict)
    log: Callable[[str], None] = lambda message: None
    results: list[PassResult] = dataclasses.field(default_factory=list)
    #: Things the user should know that do not stop the compile (the CLI prints them).
    warnings: list[str] = dataclasses.field(default_factory=list)
    #: What the target being compiled for executes (None outside a compile): quantizing
    #: passes plan formats it takes instead of leaving it something to refuse.
    target: Any = None
    target_name: str = ""
    _analyses: dict[Any, Any] = dataclasses.field(default_factory=dict)
    _samples: list[dict[str, np.ndarray]] | None = None

    def warn(self, message: str) -> None:
        """Record a warning: kept in ``warnings`` and ``report["warnings"]``, printed by the CLI."""
        self.warnings.append(message)
        self.report.setdefault("warnings", []).append(message)

    # -- analyses ------------------------------------------------------------------

    def analysis(self, analysis: Analysis, model: ir.Model) -> Any:
        """The result of ``analysis`` on ``model``, computed once until the model changes."""
        key = analysis
        if key not in self._analyses:
            self._analyses[key] = analysis.compute(model, self)
        return self._analyses[key]

    def invalidate(self, keep: frozenset[str] = frozenset()) -> None:
        self._analyses = {k: v for k, v in self._analyses.items() if k.name in keep}

    # -- data ----------------------------------------------------------------------

    def require_calibration(self, who: str) -> CalibrationData:
        if self.calibration is None:
            raise PipelineError(f"{who} needs calibration data; pass --calib DATA")
        return self.calibration

    def sample_inputs(self, model: ir.Model, count: int = 1) -> list[dict[str, np.ndarray]]:
        """Inputs for numeric checks: calibration samples if any, else seeded random data."""
        if self._samples is None or len(self._samples) < count:
            if self.calibration is not None:
                samples = []
                for sample in self.calibration:
                    samples.append(sample)
                    if len(samples) >= count:
                        break
            else:
                rng = np.random.default_rng(self.seed)
                samples = [_random_feeds(model, rng) for _ in range(count)]
            self._samples = samples
        from .io_quantization import quantize_feeds

        return [quantize_feeds(model, s) for s in self._samples[:count]]


def _random_feeds(model: ir.Model, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Seeded inputs that stay in range: normal floats; integer inputs that index a
    table (token ids into an embedding, possibly through casts and reshapes) uniform over
    its rows; 8- and 16-bit integers (quantized data) uniform over their type; other
    integers and bools (masks, flags) ones."""
    from .graph import index_input_ranges

    ranges = index_input_ranges(model)
    feeds = {}
    for spec in input_specs(model):
        if spec.dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(spec.dtype)
        elif spec.name in ranges:
            feeds[spec.name] = rng.integers(0, ranges[spec.name][1] + 1, spec.shape).astype(spec.dtype)
        elif spec.dtype.kind in "iu" and spec.dtype.itemsize <= 2:
            info = np.iinfo(spec.dtype)
            feeds[spec.name] = rng.integers(info.min, info.max, spec.shape, endpoint=True).astype(spec.dtype)
        else:
            feeds[spec.name] = np.ones(spec.shape, dtype=spec.dtype)
    return feeds


def check_pipeline(pipeline: Pipeline, model: ir.Model) -> None:
    """Refuse, before anything runs, a pipeline whose passes meet a model at a stage they do
    not take, or need a fact (:data:`qcompiler.qstate.FACTS`) neither the model nor an
    earlier pass provides; the message names the pass that provides it."""
    from . import qstate

    stage = get_stage(model)
    facts = qstate.model_facts(model)
    for p in pipeline:
        if stage not in p.stages:
            raise PipelineError(
                f"pass '{p.name}' works on the {' or '.join(p.stages)} stage, but the model is at "
                f"the {stage} stage here"
            )
        missing = [fact for fact in p.requires if fact not in facts]
        if missing:
            fact = missing[0]
            raise PipelineError(f"pass '{p.name}' needs {qstate.FACTS.get(fact, fact)}, which {_providers(fact)}")
        facts |= set(p.provides)
        if p.produces:
            stage = p.produces


def _providers(fact: str) -> str:
    from .pipeline import default_registry

    names = [f"'{cls.name}'" for cls in default_registry() if fact in cls.provides]
    if not names:
        return "no installed pass provides"
    return (f"{' or '.join(names)} provides: run it earlier in the pipeline, or compile a fake-quant model "
            "saved with it (model.qdq.onnx with model.qdq.float.onnx beside it)")


def run_pipeline(
    pipeline: Pipeline | Sequence[Pass], model: ir.Model, ctx: PassContext | None = None
) -> ir.Model:
    """Run every pass of ``pipeline`` on ``model`` in place; returns the model."""
    ctx = ctx or PassContext()
    if not isinstance(pipeline, Pipeline):
        pipeline = Pipeline(list(pipeline))
    check_pipeline(pipeline, model)
    for instrument in ctx.instruments:
        instrument.before_pipeline(pipeline, model, ctx)
    for p in pipeline:
        stage = get_stage(model)
        if stage not in p.stages:
            raise PipelineError(
                f"pass '{p.name}' works on the {' or '.join(p.stages)} stage, but the model is at "
                f"the {stage} stage here"
            )
        for instrument in ctx.instruments:
            instrument.before_pass(p, model, ctx)
        start = time.perf_counter()
        try:
            changed = bool(p.run(model, ctx))
        except QCompilerError:
            raise
        except Exception as exc:  # a bug in the pass: keep what is needed to reproduce it
            reproducer = None
            for instrument in ctx.instruments:
                reproducer = instrument.on_failure(p, model, ctx, exc) or reproducer
            raise PassFailure(p.name, exc, reproducer) from exc
        seconds = time.perf_counter() - start
        if changed:
            ctx.invalidate(keep=p.preserves_analyses)
        if p.produces and changed:
            set_stage(model, p.produces)
        result = PassResult(p, changed, seconds, stage, get_stage(model))
        ctx.results.append(result)
        for instrument in ctx.instruments:
            instrument.after_pass(p, model, ctx, result)
    for instrument in ctx.instruments:
        instrument.after_pipeline(pipeline, model, ctx)
    return model
