"""Named pipelines (``--preset``). Each is plain pipeline text that ``--pipeline`` accepts."""

from __future__ import annotations

import dataclasses

from .errors import PipelineError
from .pipeline import _suggest

_CLEANUP = "fold-constants,remove-identity,fold-batchnorm,eliminate-dead-code"
#: Static per-tensor activations (int16 where the calibration data says int8 loses too
#: much), integer softmax/GELU/LayerNorm, lowered to the integer stage.
_QUANTIZE = "fuse-layernorm,fuse-rmsnorm,exact-masks,insert-fake-quant{{{w}wide_below_db=30.0}},{learn}settle-qdq,lower-integer"
#: The learning stage (activation ranges, weight clipping, equivalent transforms learned end
#: to end on the calibration data; kept only where it lowers the loss).
_LEARN = "learn-quant{steps=200},"
_W4 = "weights=int4:per-channel,weight_method=gptq,"


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    spec: str
    summary: str
    needs_calibration: bool


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("float", _CLEANUP, "no quantization: cleanup only", False),
        Preset(
            "weights-int8",
            f"{_CLEANUP},quantize-weights",
            "data-free weight-only int8 (per-channel, symmetric), float activations; "
            "the default without --calib",
            False,
        ),
        Preset(
            "w8a8",
            f"{_CLEANUP},{_QUANTIZE.format(w='', learn='')}",
            "int8 per-channel weights, static per-tensor int8 activations (int16 where needed), "
            "integer-only graph",
            True,
        ),
        Preset(
            "w4a8",
            f"{_CLEANUP},{_QUANTIZE.format(w=_W4, learn='')}",
            "int4 per-channel weights (GPTQ), static per-tensor int8 activations (int16 where needed), "
            "integer-only graph",
            True,
        ),
        Preset(
            "w8a8-learned",
            f"{_CLEANUP},{_QUANTIZE.format(w='', learn=_LEARN)}",
            "w8a8, then learn-quant: activation ranges, weight clipping and equivalent transforms learned "
            "end to end on the calibration data (minutes)",
            True,
        ),
        Preset(
            "w4a8-learned",
            f"{_CLEANUP},{_QUANTIZE.format(w=_W4, learn=_LEARN)}",
            "w4a8, then learn-quant (as w8a8-learned; final int4 weights by GPTQ with the learned scales)",
            True,
        ),
    )
}

#: Used when neither --preset nor --pipeline is given and there is no calibration data.
DATA_FREE_DEFAULT = "weights-int8"


def for_stage(spec: str, stage: str):
    """The passes of a preset that apply to a model already at ``stage`` (a saved stage
    compiled again, e.g. ``model.qdq.onnx``): passes for earlier stages are left out."""
    from .pipeline import Pipeline

    kept = []
    for p in Pipeline.parse(spec):
        if stage in p.stages:
            kept.append(p)
            stage = p.produces or stage
    return Pipeline(kept)


def choose(preset: str | None, pipeline: str | None, stage: str, has_calibration: bool):
    """``(Pipeline, note)`` from ``--pipeline``/``--preset`` and what the model is. Without
    either: ``w8a8`` with calibration data, else data-free ``weights-int8``, for a float
    model; the rest of ``w8a8`` (cleanup and lowering) for a fake-quant one; cleanup for an
    integer one. A preset meets a later-stage model with the passes that apply to it."""
    from .pipeline import Pipeline

    if pipeline is not None:
        return Pipeline.parse(pipeline), None
    if preset is None:
        name = {"fakequant": "w8a8", "integer": "float"}.get(stage) or ("w8a8" if has_calibration else DATA_FREE_DEFAULT)
    else:
        name = preset
    chosen = get_preset(name)
    if stage == "float":
        if chosen.needs_calibration and not has_calibration:
            raise PipelineError(f"preset '{chosen.name}' needs calibration data: pass --calib DATA")
        note = None if preset else f"no --preset given: using '{chosen.name}' ({chosen.summary})"
        return Pipeline.parse(chosen.spec), note
    trimmed = for_stage(chosen.spec, stage)
    return trimmed, f"the model is at the {stage} stage: running '{trimmed}' of preset '{chosen.name}'"


def stop_at(pipeline, stage: str, stop: str):
    """The passes of ``pipeline`` up to the last one that runs while the model is not past
    ``stop`` (stages in order float → fakequant → integer); refuses a stage already passed."""
    from .graph import STAGES
    from .pipeline import Pipeline

    if STAGES.index(stage) > STAGES.index(stop):
        raise PipelineError(f"the model is already at the {stage} stage, past --stop-stage {stop}")
    kept = []
    for p in pipeline:
        after = p.produces or stage
        if STAGES.index(after) > STAGES.index(stop):
            break
        kept.append(p)
        stage = after
    return Pipeline(kept)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise PipelineError(
            f"unknown preset '{name}'{_suggest(name, PRESETS)} (presets: {', '.join(PRESETS)})"
        ) from None
