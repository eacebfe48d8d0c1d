"""``learn-quant``: quantization parameters learned end to end on calibration data.

MobileQuant (seed 004) keeps static per-tensor W8A8/W4A8 activations on an LLM by
*learning* what post-training quantization picks in closed form; OmniQuant's learnable
weight clipping (LWC) and equivalent transformation (LET) are the same idea for weights.
This pass runs on the fake-quant model ``insert-fake-quant`` made and optimises, with
Adam on the calibration samples,

    L = Σ_outputs ‖Ŷ − Y‖² / ‖Y‖²          (masked positions left out with ``valid_mask``;
                                           ``loss=kl``: KL(softmax(Y) ‖ softmax(Ŷ)) for logits)

where ``Y`` is the float reference model's output and ``Ŷ`` the fake-quant model's with

* every per-tensor activation range learned (``s = exp(ℓ)``, ``z = round(ζ)``; ranges a
  transparent op shares stay shared; bounded and input-derived ones stay fixed);
* every weight's clipping learned per scale entry (tensor, channel or group):
  ``s = σ(a)·max|W|/q_max``;
* a per-channel transform ``t`` on every producer/consumer pair
  :func:`~qcompiler.passes.equalize.find_pairs` proves exact (norm → linears, linear →
  linear through data movement, attention's V → O, gated MLP up → down):
  ``Y' = Y/t`` folded into the producer, ``diag(t)·W`` into the consumers, with the
  folding code of :mod:`~qcompiler.passes.equalize` run on torch tensors.

The whole model is optimised at once (MobileQuant's end-to-end training rather than
OmniQuant's block by block). The quantizers are the fake-quant model's own arithmetic
(:mod:`qcompiler.learned_quantizers`) with a straight-through estimator, weights rounded
to nearest while learning. The result is written back as ordinary constants (activation
scales and zero points, integer weights and their scales, folded norms and biases); with
``gptq`` (default) the final integers of per-channel MatMul/Gemm weights come from GPTQ
with the learned scales on the transformed weights (Hessians of the transformed float
model's layer inputs), so GPTQ's error compensation is not lost. Every later pass and
target takes the result as it would a calibrated model. The written model's loss is
measured; if it is not below the calibrated model's, the model is left as it was (with a
warning).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_common

from qcompiler import qstate
from qcompiler.errors import PipelineError
from qcompiler.pipeline import Pass, option

# Learning-loss curve points kept for the report.
CURVE_POINTS = 200


@dataclass(frozen=True)
class LearnQuant(Pass):
    """Learn activation ranges, weight clipping and equivalent transforms end to end."""

    name = "learn-quant"
    stages = ("fakequant",)
    requires = ("float-reference", "activation-plan")
    preserves_numerics = False

    steps: int = option(200, "optimisation steps")
    batch: int = option(2, "calibration samples per step")
    lr: float = option(1e-4, "Adam learning rate of range log-scales, clipping logits and transform log-scales")
    seconds: float = option(0.0, "time budget: stop learning when spent (0: no limit)")
    samples: int = option(32, "calibration samples to learn from (0: all)")
    ranges: bool = option(True, "learn per-tensor activation ranges")
    clipping: bool = option(True, "learn weight clipping per scale entry (LWC)")
    transforms: bool = option(True, "learn per-channel equivalent transforms on exact producer/consumer pairs (LET)")
    gptq: bool = option(True, "final integers of per-channel MatMul/Gemm weights by GPTQ with the learned scales and transforms")
    loss: Literal["mse", "kl"] = option("mse", "mse: ‖Ŷ−Y‖²/‖Y‖² per output; kl: KL(softmax(Y)‖softmax(Ŷ)) over the last axis (logits)")
    valid_mask: str = option("", "model input whose 0 entries mark padded positions, left out of the loss (e.g. attention_mask)")

    def __post_init__(self):
        if self.steps < 0 or self.batch < 1 or self.lr <= 0 or self.seconds < 0 or self.samples < 0:
            raise ValueError("steps ≥ 0, batch ≥ 1, lr > 0, seconds ≥ 0 and samples ≥ 0")

    def run(self, model: ir.Model, ctx) -> bool:
        import torch

        from qcompiler.passes.learning import Learner

        data = ctx.require_calibration(self.name)
        samples = []
        for feeds in data:
            samples.append(feeds)
            if self.samples and len(samples) >= self.samples:
                break
        inputs = [v.name for v in model.graph.inputs]
        if self.valid_mask and self.valid_mask not in inputs:
            raise PipelineError(f"learn-quant: valid_mask names '{self.valid_mask}', which is not a model input; inputs are {inputs}")
        threads = torch.get_num_threads()
        torch.manual_seed(ctx.seed)
        try:
            learner = Learner(model, ir.from_proto(qstate.float_reference(model)), qstate.activation_plan(model),
                              ranges=self.ranges, clipping=self.clipping, transforms=self.transforms,
                              objective=self.loss)
            learner.set_targets(samples, self.valid_mask or None)
            report = self._learn(learner, samples, ctx)
            values = None
            if report["steps"] and not report["diverged"]:
                values = learner.final_values(self._hessians(learner, model, samples, ctx))
                trial = ir.from_proto(ir.to_proto(model))
                learner.apply(trial, values)
                report["loss_after"] = learner.mean_loss_of(trial, samples)
            report["kept"] = values is not None and report["loss_after"] < report["loss_before"]
        finally:
            torch.set_num_threads(threads)
        ctx.report["learning"] = report
        if report["diverged"]:
            ctx.warn(f"learn-quant: learning diverged after {report['steps']} steps (lr={self.lr} is too large); "
                     "the calibrated parameters are kept")
            return False
        if values is None:
            return False
        if not report["kept"]:
            ctx.warn(f"learn-quant: learning did not lower the loss ({report['loss_before']:.4g} → "
                     f"{report['loss_after']:.4g}); the calibrated parameters are kept")
            return False
        learner.apply(model, values)
        ir_common.RemoveUnusedNodesPass()(model)
        ctx.log(f"learn-quant: loss {report['loss_before']:.4g} -> {report['loss_after']:.4g} "
                f"in {report['steps']} steps ({report['seconds']} s)")
        return True

    def _hessians(self, learner, model: ir.Model, samples: list, ctx) -> dict | None:
        """GPTQ's ``H = XᵀX`` of every linear input of the float model with the learned
        transforms folded (what the transformed weights will multiply)."""
        if not self.gptq:
            return None
        from qcompiler.gptq import LinearInputHessians

        transformed = learner.transformed_float_model(qstate.float_reference(model))
        return LinearInputHessians(max_samples=len(samples)).compute(transformed, ctx)

    def _learn(self, learner, samples: list, ctx) -> dict:
        import torch

        params = [p for p in learner.parameters() if p.requires_grad]
        count = sum(p.numel() for p in params)
        before = learner.mean_loss(samples, learned=False)
        curve: list[float] = []
        diverged = False
        start = time.perf_counter()
        steps = 0
        if count and self.steps:
            optimizer = torch.optim.Adam(params, lr=self.lr)
            rng = np.random.default_rng(ctx.seed)
            bar = _bar(self.steps, ctx)
            for step in range(self.steps):
                if self.seconds and time.perf_counter() - start > self.seconds:
                    break
                optimizer.zero_grad(set_to_none=True)
                chosen = rng.choice(len(samples), size=min(self.batch, len(samples)), replace=False)
                total = 0.0
                for index in chosen:
                    loss = learner.loss(samples[index], int(index)) / len(chosen)
                    loss.backward()
                    total += float(loss.detach())
                optimizer.step()
                if not math.isfinite(total) or not all(bool(torch.isfinite(p).all()) for p in params):
                    diverged = True  # a learning rate far too large: keep the calibrated model
                    break
                curve.append(total)
                steps = step + 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{total:.4g}")
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - start
        learned = learner.mean_loss(samples, learned=True) if steps and not diverged else math.inf
        stride = max(1, math.ceil(len(curve) / CURVE_POINTS))
        return {
            "steps": steps, "diverged": diverged, "seconds": round(seconds, 1), "samples": len(samples), "batch": self.batch,
            "lr": self.lr, "loss": self.loss, "parameters": count, "seed": ctx.seed, **learner.summary(),
            "loss_before": float(before), "loss_learning": float(learned), "loss_after": float(learned), "kept": False,
            "curve": [round(float(np.mean(curve[i:i + stride])), 6) for i in range(0, len(curve), stride)],
            "curve_stride": stride,
        }


def _bar(total: int, ctx):
    if not ctx.options.get("progress", False):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="learning", unit="step", file=sys.stderr, leave=False)


__all__ = ["LearnQuant"]
