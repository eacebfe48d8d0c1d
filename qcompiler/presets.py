"""Named pipelines (``--preset``). Each is plain pipeline text that ``--pipeline`` accepts."""

from __future__ import annotations

import dataclasses

from .errors import PipelineError
from .pipeline import _suggest

_CLEANUP = "fold-constants,remove-identity,fold-batchnorm,eliminate-dead-code"
#: Static per-tensor activations (int16 where the calibration data says int8 loses too
#: much), integer softmax/GELU/LayerNorm, lowered to the integer stage.
_QUANTIZE = "insert-fake-quant{{{w}wide_below_db=30.0}},lower-integer"


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
            f"{_CLEANUP},{_QUANTIZE.format(w='')}",
            "int8 per-channel weights, static per-tensor int8 activations (int16 where needed), "
            "integer-only graph",
            True,
        ),
        Preset(
            "w4a8",
            f"{_CLEANUP},{_QUANTIZE.format(w='weights=int4:per-channel,weight_method=gptq,')}",
            "int4 per-channel weights (GPTQ), static per-tensor int8 activations (int16 where needed), "
            "integer-only graph",
            True,
        ),
    )
}

#: Used when neither --preset nor --pipeline is given and there is no calibration data.
DATA_FREE_DEFAULT = "weights-int8"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise PipelineError(
            f"unknown preset '{name}'{_suggest(name, PRESETS)} (presets: {', '.join(PRESETS)})"
        ) from None
