"""GPTQ: weight quantization that compensates each column's rounding error (Frantar et al.).

For a linear layer ``y = x·W`` (``W`` is ``K × N``) and calibration inputs ``X``, the
layer's output error for a weight perturbation ``ΔW`` is ``tr(ΔWᵀ H ΔW)`` with
``H = XᵀX``. Quantizing the input rows of ``W`` one at a time, the error of row
``k`` is spread over the rows not yet quantized:

    δ = (w_k − q(w_k)) / [H⁻¹]_kk,        w_j ← w_j − [H⁻¹]_kj · δ   for j > k

(with ``H⁻¹`` taken from the upper Cholesky factor, and a small damping added to
``H``). Scales are fixed beforehand per output channel (MSE-optimal clipping); only
the integer values change, so the result is an ordinary per-channel quantized weight.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from .calibration import _Runner
from .graph import const_array
from .passmanager import Analysis, PassContext
from .quant import QFormat, QuantizedTensor, quantize, quantize_weight

#: Damping added to H's diagonal, relative to its mean.
DAMPING = 0.01
BLOCK = 128


def gptq_quantize(weight: np.ndarray, hessian: np.ndarray, fmt: QFormat,
                  scales: tuple[np.ndarray, np.ndarray] | None = None) -> QuantizedTensor:
    """Per-channel GPTQ of ``weight`` (``K × N``, channels on axis 1) given ``H`` (``K × K``);
    ``scales``: fixed (scale, zero point) per channel instead of the activation-aware search
    (the learning stage's learned clipping)."""
    if fmt.granularity != "per-channel":
        raise ValueError("GPTQ here produces per-channel weights")
    w = np.asarray(weight, np.float64).copy()
    k_dim = w.shape[0]
    h = np.asarray(hessian, np.float64).copy()
    if scales is None:
        base = quantize_weight(weight, fmt, channel_axis=1, reduce_axis=0)
        scale, zero = _activation_aware_scales(w, np.diag(h), fmt)
    else:
        scale, zero = np.asarray(scales[0], np.float64).reshape(-1), np.asarray(scales[1]).astype(fmt.dtype).reshape(-1)
        base = QuantizedTensor(quantize(weight, scale[None, :].astype(np.float32), zero[None, :], fmt),
                               scale.astype(np.float32), zero, axis=1)
    # Rows with the largest input energy first ("act order"): their error is compensated
    # by the most remaining rows.
    order = np.argsort(-np.diag(h), kind="stable")
    inverse = np.argsort(order)
    w, h = w[order], h[np.ix_(order, order)]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0
    h += np.eye(k_dim) * DAMPING * float(np.mean(np.diag(h)))
    try:
        upper = np.linalg.cholesky(np.linalg.inv(h)).T  # H⁻¹ = Uᵀ U, U upper triangular
    except np.linalg.LinAlgError:
        return base
    q = np.zeros(w.shape, dtype=fmt.dtype)
    for start in range(0, k_dim, BLOCK):
        end = min(start + BLOCK, k_dim)
        block = w[start:end].copy()
        errors = np.zeros_like(block)
        u = upper[start:end, start:end]
        for i in range(end - start):
            row = block[i]
            q_row = quantize(row.astype(np.float32), scale.astype(np.float32), zero, fmt)
            q[start + i] = q_row
            deq = (q_row.astype(np.float64) - zero.astype(np.float64)) * scale
            err = (row - deq) / u[i, i]
            block[i + 1 :] -= np.outer(u[i, i + 1 :], err)
            errors[i] = err
        w[end:] -= upper[start:end, end:].T @ errors
    return QuantizedTensor(q[inverse], scale.astype(np.float32), zero, axis=1)


def _activation_aware_scales(w: np.ndarray, energy: np.ndarray, fmt: QFormat):
    """Per-channel scales minimising Σ_k H_kk (w_kj − q(w_kj))² over clipping ratios:
    the weight error weighted by how strongly each input row is driven."""
    from .quant import CLIP_RATIOS, dequantize, qparams

    lo, hi = w.min(axis=0), w.max(axis=0)
    best = None
    for ratio in CLIP_RATIOS:
        scale, zero = qparams(lo * ratio, hi * ratio, fmt)
        q = quantize(w.astype(np.float32), scale[None, :], zero[None, :], fmt)
        err = (energy[:, None] * (dequantize(q, scale[None, :], zero[None, :]) - w) ** 2).sum(axis=0)
        if best is None:
            best = (err, scale, zero)
        else:
            better = err < best[0]
            best = (np.where(better, err, best[0]), np.where(better, scale, best[1]), np.where(better, zero, best[2]))
    return best[1].astype(np.float64), best[2].astype(fmt.dtype)


def gptq_for_node(node: ir.Node, weight: np.ndarray, hessians: dict, fmt: QFormat) -> QuantizedTensor | None:
    """GPTQ of a MatMul/Gemm weight in the node's own layout, or None if not applicable."""
    h = hessians.get(node.inputs[0].name)
    if h is None or fmt.granularity != "per-channel" or weight.ndim != 2:
        return None
    transposed = node.op_type == "Gemm" and "transB" in node.attributes and node.attributes["transB"].as_int()
    qt = gptq_quantize(weight.T if transposed else weight, h, fmt)
    if transposed:
        return QuantizedTensor(qt.data.T.copy(), qt.scale, qt.zero_point, axis=0)
    return qt


def linear_inputs(model: ir.Model) -> dict[str, int]:
    """Input name → contraction size K of every MatMul/Gemm with a constant weight (static K)."""
    inputs: dict[str, int] = {}
    for node in model.graph:
        if node.op_type in ("MatMul", "Gemm") and const_array(node.inputs[1]) is not None:
            if node.op_type == "Gemm" and "transA" in node.attributes and node.attributes["transA"].as_int():
                continue
            k = node.inputs[0].shape[-1] if node.inputs[0].shape is not None else None
            if isinstance(k, int):
                inputs[node.inputs[0].name] = k
    return inputs


def _input_rows(model: ir.Model, ctx: PassContext, what: str, max_samples: int):
    """``(name, rows)`` for each linear input of each calibration sample: rows are (positions, K) float64."""
    data = ctx.require_calibration(what)
    inputs = linear_inputs(model)
    runner = _Runner(model, list(inputs))
    for index, feeds in enumerate(data):
        if index >= max_samples:
            break
        for name, value in runner(feeds).items():
            yield name, np.asarray(value, np.float64).reshape(-1, inputs[name])


@dataclasses.dataclass(frozen=True)
class LinearInputHessians(Analysis):
    """``H = XᵀX`` of the input of every MatMul/Gemm with a constant weight, over calibration rows."""

    name = "linear-input-hessians"
    max_samples: int = 32

    def compute(self, model: ir.Model, ctx: PassContext) -> dict[str, np.ndarray]:
        hessians = {name: np.zeros((k, k)) for name, k in linear_inputs(model).items()}
        for name, rows in _input_rows(model, ctx, "GPTQ", self.max_samples):
            hessians[name] += rows.T @ rows
        return hessians


@dataclasses.dataclass(frozen=True)
class LinearInputMeans(Analysis):
    """Mean row ``x̄`` of the input of every MatMul/Gemm with a constant weight."""

    name = "linear-input-means"
    max_samples: int = 32

    def compute(self, model: ir.Model, ctx: PassContext) -> dict[str, np.ndarray]:
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        for name, rows in _input_rows(model, ctx, "bias correction", self.max_samples):
            sums[name] = sums.get(name, 0.0) + rows.sum(axis=0)
            counts[name] = counts.get(name, 0) + rows.shape[0]
        return {name: sums[name] / counts[name] for name in sums}
