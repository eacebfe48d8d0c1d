"""``cross-layer-equalization``: equalize per-channel weight ranges of consecutive linear
layers (Nagel et al. 2019, "Data-Free Quantization", §4.1).

For a producer ``W₁`` (Conv, Gemm, MatMul; grouped and depthwise convs included) whose
output channel i reaches the consumers ``W₂`` through ReLU, identity, bias adds and
reshapes (:mod:`channel_tracker`), with ``r₁ᵢ = max|W₁[i]|`` (output channel i) and
``r₂ᵢ = max|W₂[:, i]|`` (input channel i, over all consumers):

    sᵢ = √(r₁ᵢ·r₂ᵢ) / r₂ᵢ,   W₁[i] ← W₁[i]/sᵢ,  b₁[i] ← b₁[i]/sᵢ,  W₂[:, i] ← sᵢ·W₂[:, i]

after which both ranges equal ``√(r₁ᵢ·r₂ᵢ)``. ``ReLU(x/s) = ReLU(x)/s`` for ``s > 0``,
so the float model is unchanged. Chains ``W₁ → W₂ → W₃`` share layers, so all pairs are
swept until every scale of a sweep is within ``tolerance`` of 1 (or ``iterations``).

ReLU6 (``Clip(0, 6)``) is not homogeneous: ``relu6=refuse`` (default) skips such pairs
with a logged reason; ``relu6=per-channel`` keeps the model exact by rewriting the
clip as ``Min(Relu(x), 6/sᵢ)`` with a per-channel bound (a float op that the integer
lowering does not fuse). BatchNorm must be folded first (``fold-batchnorm``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.pipeline import Pass, option

from qcompiler.passes.equalize import EquivalenceCheck, Folder, apply_scale, consumer_ranges, find_pairs, measured_shapes, producer_ranges


def equalizing_scales(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """``s = √(r₁·r₂)/r₂ = √(r₁/r₂)``; 1 where either range is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.sqrt(r1 / r2)
    return np.where((r1 > 0) & (r2 > 0) & np.isfinite(s), s, 1.0)


@dataclass(frozen=True)
class CrossLayerEqualization(Pass):
    """Equalize per-channel weight ranges of consecutive linear layers (data-free, exact)."""

    name = "cross-layer-equalization"
    stages = ("float",)

    iterations: int = option(20, "maximum sweeps over all pairs")
    tolerance: float = option(1e-3, "stop when every scale of a sweep is within this of 1")
    relu6: Literal["refuse", "per-channel"] = option("refuse", "ReLU6 between layers: skip the pair, or rewrite it with per-channel bounds")
    check: bool = option(True, "run one sample before and after and fail if outputs moved by more than 1e-4 relative")

    def __post_init__(self):
        if self.iterations < 1 or self.tolerance <= 0:
            raise ValueError("iterations must be >= 1 and tolerance > 0")

    def run(self, model: ir.Model, ctx) -> bool:
        report = ctx.report.setdefault("cross_layer_equalization", {"pairs": [], "refused": []})
        sample = ctx.sample_inputs(model)[0]
        check = EquivalenceCheck(model, sample, self.name) if self.check else None
        shapes = measured_shapes(model, sample)
        relu6 = self.relu6 == "per-channel"
        pairs, refused = find_pairs(model, ("linear",), relu6=relu6, shapes=shapes)
        for label, reason in refused:
            ctx.log(f"cross-layer-equalization: not equalizing after {label}: {reason}")
            report["refused"].append({"producer": label, "reason": reason})
        folder = Folder(model.graph)
        total: dict[str, np.ndarray] = {}
        sweeps = 0
        for sweep in range(self.iterations):
            if sweep:  # the first sweep may have rewritten ReLU6 clips
                pairs, _ = find_pairs(model, ("linear",), relu6=relu6, shapes=shapes)
            moved = False
            for pair in pairs:
                s = equalizing_scales(producer_ranges(pair.producer), pair.reduce(consumer_ranges))
                if np.max(np.abs(np.log(s)), initial=0.0) < np.log1p(self.tolerance):
                    continue  # already equal within tolerance
                apply_scale(folder, pair, s)
                total[pair.producer.label] = total.get(pair.producer.label, 1.0) * s
                moved = True
            if not moved:
                break
            sweeps = sweep + 1
        report["sweeps"] = sweeps
        for pair in pairs:
            if pair.producer.label in total:
                r1, r2 = producer_ranges(pair.producer), pair.reduce(consumer_ranges)
                scale = total[pair.producer.label]
                report["pairs"].append({
                    "producer": pair.producer.label, "consumers": [c.node.name for c in pair.chain.consumers],
                    "channels": pair.producer.channels, "scale_range": [float(scale.min()), float(scale.max())],
                    "range_ratio_after": float(np.max(np.maximum(r1, r2) / np.maximum(np.minimum(r1, r2), 1e-30))),
                })
        if not total:
            return False
        ctx.log(f"cross-layer-equalization: {len(total)} pair(s) equalized in {sweeps} sweep(s)")
        if check is not None:
            report["max_relative_error"] = check.verify(model)
        return True
