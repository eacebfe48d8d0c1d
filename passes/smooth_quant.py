"""``smooth-quant``: migrate activation outliers into the next linear weights (SmoothQuant,
extended to every linear→linear pair as in MobileQuant §4.1).

For a producer P whose output reaches linear consumers ``Z_k = X·W_k`` only through ops
that commute with per-channel scaling (:mod:`channel_tracker`), per channel j:

    s_j = max|X_j|^α / max|W_j|^(1−α)
    X' = X·diag(s)⁻¹   (folded into P: LayerNorm/RMSNorm γ, β / s; Mul-by-γ; or —
                        with ``linear_pairs`` — a MatMul/Gemm/Conv's weight columns and bias / s,
                        and every bias/bound added on the way)
    W_k' = diag(s)·W_k (all consumers' rows)

``max|X_j|`` is the calibrated per-channel range at the consumers' input
(:class:`~qcompiler.calibration.ActivationStats`), ``max|W_j|`` the largest weight of
input channel j over all consumers. The model is float-equivalent (Figure 1 of
MobileQuant: ``A·S₀⁻¹``, ``S₀·W₁·S₁⁻¹``, ``S₁·W₂``). Refused, with the reason logged: a
scaled tensor with any other reader (a post-LN residual ``Add``), GELU/SiLU/Softmax/
LayerNorm on the way, graph outputs, shared weights.

With ``search``, α is chosen per chain from ``grid`` to minimise
``Σ_k ‖X·W_k − Q_a(X/s)·Q_w(diag(s)·W_k)‖² / ‖X·W_k‖²`` on a bounded reservoir of
calibration rows, with ``Q_a`` per-tensor asymmetric (``activation_bits``) and ``Q_w``
per-channel symmetric (``weight_bits``).

With ``awq`` (AWQ, activation-aware weight quantization) the scales come from the mean
activation magnitude instead, ``s_j = mean|X_j|^α`` (normalised to geometric mean 1), α
searched on ``grid`` by the weight-only error ``Σ_k ‖X·W_k − X·diag(s)⁻¹·Q_w(diag(s)·W_k)‖²
/ ‖X·W_k‖²``: channels that carry large activations get finer weight steps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.calibration import ActivationStats
from qcompiler.passmanager import Analysis
from qcompiler.pipeline import Pass, option

from qcompiler.passes.equalize import (
    EquivalenceCheck, Folder, Pair, apply_scale, consumer_matrix, consumer_ranges, find_pairs, measured_shapes,
)

DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(21))


def smooth_scales(xmax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """``s = max|X|^α / max|W|^(1−α)``; 1 for dead channels (no activation or no weight)."""
    x, w = np.maximum(xmax, 1e-5), np.maximum(wmax, 1e-5)
    s = x**alpha / w ** (1.0 - alpha)
    return np.where((xmax > 0) & (wmax > 0) & np.isfinite(s) & (s > 0), s, 1.0)


@dataclasses.dataclass(frozen=True)
class ActivationRows(Analysis):
    """A uniform sample of at most ``rows`` rows (positions) of each named tensor, channels
    last: memory is ``rows × channels`` per tensor, whatever the amount of data."""

    name = "activation-rows"
    tensors: tuple[tuple[str, int], ...] = ()  # (tensor name, channel axis)
    rows: int = 512
    max_samples: int | None = None
    seed: int = 0

    def compute(self, model: ir.Model, ctx) -> dict[str, np.ndarray]:
        from qcompiler.calibration import _Runner

        data = ctx.require_calibration("smooth-quant{search=true}")
        runner = _Runner(model, [name for name, _ in self.tensors])
        rng = np.random.default_rng(self.seed)
        buffers: dict[str, np.ndarray] = {}
        seen: dict[str, int] = {}
        for index, feeds in enumerate(data):
            if self.max_samples is not None and index >= self.max_samples:
                break
            outputs = runner(feeds)
            for name, axis in self.tensors:
                x = np.moveaxis(np.asarray(outputs[name], np.float32), axis, -1)
                x = x.reshape(-1, x.shape[-1])
                buffers[name], seen[name] = _reservoir(buffers.get(name), seen.get(name, 0), x, self.rows, rng)
        return buffers


def _reservoir(buffer, seen: int, rows: np.ndarray, size: int, rng: np.random.Generator):
    """Algorithm R over a batch of rows: every row seen so far is kept with probability size/seen."""
    if buffer is None:
        buffer = np.empty((0, rows.shape[1]), np.float32)
    take = min(size - len(buffer), len(rows))
    if take > 0:
        buffer = np.concatenate([buffer, rows[:take]])
    rest = rows[max(take, 0):]
    if len(rest):
        slot = rng.integers(0, seen + max(take, 0) + np.arange(len(rest)) + 1)
        keep = slot < size
        buffer[slot[keep]] = rest[keep]
    return buffer, seen + len(rows)


def fake_quant(x: np.ndarray, lo: float, hi: float, bits: int) -> np.ndarray:
    """Per-tensor asymmetric ``(clamp(round(x/s) + z, 0, 2^b−1) − z)·s`` over ``[lo, hi] ∋ 0``."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (2**bits - 1) or 1.0
    zero = np.round(-lo / scale)
    return ((np.clip(np.round(x / scale) + zero, 0, 2**bits - 1) - zero) * scale).astype(np.float32)


def fake_quant_columns(w: np.ndarray, bits: int) -> np.ndarray:
    """Per-output-channel (column) symmetric fake quantization of ``w`` (in × out)."""
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(w).max(axis=0, keepdims=True) / qmax
    scale = np.where(scale > 0, scale, 1.0)
    return (np.clip(np.round(w / scale), -qmax, qmax) * scale).astype(np.float32)


@dataclass(frozen=True)
class SmoothQuant(Pass):
    """Per-channel scales s = max|X|^α / max|W|^(1−α) from activations into the next linear weights."""

    name = "smooth-quant"
    stages = ("float",)

    alpha: float = option(0.5, "migration strength α in [0, 1]")
    linear_pairs: bool = option(True, "also smooth linear→linear pairs (MobileQuant): through bias, ReLU, reshapes, attention values")
    search: bool = option(False, "choose α per chain from grid by the int8 fake-quant error of the consumers")
    grid: tuple[float, ...] = option(DEFAULT_GRID, "α candidates for search")
    weight_bits: int = option(8, "weight bits of the search's error model (per-channel, symmetric)")
    activation_bits: int = option(8, "activation bits of the search's error model (per-tensor, asymmetric)")
    rows: int = option(512, "calibration rows kept per searched tensor (reservoir sample)")
    samples: int = option(0, "calibration samples to use (0: all)")
    check: bool = option(True, "re-run one calibration sample and fail if outputs moved by more than 1e-4 relative")
    awq: bool = option(False, "AWQ: s = mean|X|^α, α searched by the weight-only error at weight_bits (implies search)")

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0 or not all(0.0 <= a <= 1.0 for a in self.grid) or not self.grid:
            raise ValueError("alpha and the grid values must lie in [0, 1]")
        if self.rows < 1 or min(self.weight_bits, self.activation_bits) < 2:
            raise ValueError("rows must be >= 1 and bits >= 2")

    def run(self, model: ir.Model, ctx) -> bool:
        data = ctx.require_calibration(self.name)
        report = ctx.report.setdefault("smooth_quant", {"chains": [], "refused": []})
        kinds = ("norm", "linear") if self.linear_pairs else ("norm",)
        pairs, refused = find_pairs(model, kinds, shapes=measured_shapes(model, data.first()))
        stats = ctx.analysis(ActivationStats(max_samples=self.samples or None), model) if pairs else {}
        usable = []
        for pair in pairs:
            problem = _stats_problem(pair, stats)
            if problem:
                refused.append((pair.producer.label, problem))
            else:
                usable.append(pair)
        for label, reason in refused:
            ctx.log(f"smooth-quant: not smoothing after {label}: {reason}")
            report["refused"].append({"producer": label, "reason": reason})
        if not usable:
            return False
        rows = None
        if self.search or self.awq:
            tensors = tuple(sorted({(c.input.name, c.axis) for p in usable for c in p.chain.consumers}))
            rows = ctx.analysis(ActivationRows(tensors, self.rows, self.samples or None, ctx.seed), model)
        check = EquivalenceCheck(model, data.first(), self.name) if self.check else None
        folder = Folder(model.graph)
        applied = 0
        for pair in usable:
            xmax = pair.reduce(lambda c: stats[c.input.name].channel_absmax())
            wmax = pair.reduce(consumer_ranges)
            alpha, errors = self.alpha, None
            if self.awq:
                xmean = pair.reduce(lambda c: np.mean(np.abs(rows[c.input.name]), axis=0))
                alpha, errors = self._search(pair, xmean, wmax, stats, rows, awq_scales)
                s = awq_scales(xmean, wmax, alpha)
            else:
                if rows is not None:
                    alpha, errors = self._search(pair, xmax, wmax, stats, rows)
                s = smooth_scales(xmax, wmax, alpha)
            if np.max(np.abs(np.log(s)), initial=0.0) < 1e-4:
                ctx.log(f"smooth-quant: {pair.producer.label} is already smooth (all scales within 1e-4 of 1)")
                continue
            entry = {
                "producer": pair.producer.label, "kind": pair.producer.kind, "method": "awq" if self.awq else "max",
                "consumers": [c.node.name for c in pair.chain.consumers], "channels": pair.producer.channels,
                "alpha": alpha, "activation_absmax": [float(xmax.max()), float((xmax / s).max())],
                "weight_absmax": [float(wmax.max()), float((wmax * s).max())],
            }
            if errors is not None:
                entry["search_error"] = {"alpha": alpha, "best": errors[alpha], "at_default": errors.get(self.alpha)}
            apply_scale(folder, pair, s)
            applied += 1
            report["chains"].append(entry)
            ctx.log(f"smooth-quant: {pair.producer.label} → {len(pair.chain.consumers)} consumer(s), α={alpha:g}, "
                    f"max|X| {entry['activation_absmax'][0]:.3g} → {entry['activation_absmax'][1]:.3g}")
        if not applied:
            return False
        if check is not None:
            report["max_relative_error"] = check.verify(model)
        return True

    def _search(self, pair: Pair, xstat, wmax, stats, rows, scales=None) -> tuple[float, dict | None]:
        """α from the grid with the least fake-quant error of the consumers (weight-only
        when ``scales`` is AWQ's)."""
        matrices = [consumer_matrix(c) for c in pair.chain.consumers]
        if any(m is None for m in matrices):
            return self.alpha, None
        weight_only = scales is awq_scales
        scales = scales or smooth_scales
        errors = {}
        for alpha in self.grid:
            s = scales(xstat, wmax, alpha)
            error = 0.0
            for consumer, m in zip(pair.chain.consumers, matrices):
                x = rows[consumer.input.name]
                st = stats[consumer.input.name]
                sr = s[consumer.rows].astype(np.float32)
                reference = x @ m
                xq = (x / sr) if weight_only else fake_quant(
                    x / sr, float(np.min(st.channel_min / sr)), float(np.max(st.channel_max / sr)), self.activation_bits)
                noise = reference - xq @ fake_quant_columns(m * sr[:, None], self.weight_bits)
                error += float(np.sum(noise.astype(np.float64) ** 2) / max(np.sum(reference.astype(np.float64) ** 2), 1e-30))
            errors[alpha] = error
        best = min(self.grid, key=lambda a: (errors[a], abs(a - self.alpha)))
        return best, errors


def awq_scales(xmean: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """AWQ's ``s = mean|X|^α``, normalised to geometric mean 1 (``wmax`` unused: the
    weight side enters through the searched error)."""
    s = np.power(np.maximum(xmean, 1e-8), alpha)
    s = s / np.exp(np.mean(np.log(s)))
    return np.clip(s, 1e-4, 1e4)


def _stats_problem(pair: Pair, stats) -> str | None:
    for consumer in pair.chain.consumers:
        st = stats.get(consumer.input.name)
        if st is None or st.channel_max is None:
            return f"no calibration statistics for '{consumer.input.name}'"
        if st.channel_axis != consumer.axis or len(st.channel_max) != len(consumer.rows):
            return f"'{consumer.input.name}' has no per-channel statistics along the contraction axis"
    return None
