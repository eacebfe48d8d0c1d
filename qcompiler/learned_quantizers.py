"""The quantizers the learning stage trains, in torch, with a straight-through estimator.

Each computes exactly what the fake-quant model computes for the same parameters
(ONNX QuantizeLinear: ``q = clamp(round_half_even(x / s) + z)`` in float32) and exports
those parameters as the constants the model stores; only the gradient is approximated:
``∂round(v)/∂v := 1`` (STE, seed 003 Alg. 2), so the scale gets the LSQ gradient
``∂x̂/∂s = round(x/s) − x/s`` inside the range and ``q_max − z`` (or ``q_min − z``) where
``x`` clips.

* :class:`ActivationRange`: a per-tensor range (MobileQuant's activation range learning):
  ``s = exp(ℓ)``, ``z = clamp(round(ζ))`` (asymmetric formats; 0 for symmetric ones).
* :class:`ClippedWeight`: OmniQuant's learnable weight clipping (LWC): per scale entry
  (tensor, channel or group) ``s = σ(a)·max|W|/q_max`` (symmetric), or
  ``s = (σ(b)·max W − σ(a)·min W)/(q_max − q_min)`` with ``z = q_min − round(σ(a)·min W/s)``
  (asymmetric); ``W`` is read each step, so it follows an equivalent transform applied
  before it. It starts at the calibrated model's scales; while learning it rounds to
  nearest (the model's final integers may come from GPTQ with the learned scales).
* :class:`ChannelScale`: a per-channel equivalent transform ``t = exp(τ)`` (LET,
  MobileQuant's learnable transforms), folded by :mod:`qcompiler.passes.equalize`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .torch_graph import round_ste


class ActivationRange(nn.Module):
    """A learned per-tensor activation quantizer; ``qmin``/``qmax`` are the storage type's."""

    def __init__(self, scale: float, zero: int, qmin: int, qmax: int, symmetric: bool):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale), dtype=torch.float32))
        self.zero = nn.Parameter(torch.tensor(float(zero)), requires_grad=not symmetric)
        self.qmin, self.qmax, self.symmetric = qmin, qmax, symmetric

    def params(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.exp(self.log_scale)
        z = self.zero if self.symmetric else torch.clamp(round_ste(self.zero), self.qmin, self.qmax)
        return s, z

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        s, z = self.params()
        return torch.clamp(round_ste(x / s) + z, self.qmin, self.qmax)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        s, z = self.params()
        return (q - z) * s

    def export(self) -> tuple[np.ndarray, int]:
        """``(scale as float32, zero point)``: the constants the Q/DQ pair gets."""
        with torch.no_grad():
            s, z = self.params()
        return np.float32(s.item()), round(z.item())


def _entries(w: torch.Tensor, axis: int | None, block: int, reduce) -> torch.Tensor:
    """``reduce`` over the elements of each scale entry: all (per-tensor), all but ``axis``
    (per-channel), or blocks of ``block`` along ``axis`` (per-group, shaped like the scales)."""
    if axis is None:
        return reduce(w.reshape(-1), 0)
    if not block:
        return reduce(w.movedim(axis, 0).reshape(w.shape[axis], -1), 1)
    moved = w.movedim(axis, -1)
    length = moved.shape[-1]
    groups = -(-length // block)
    pad = groups * block - length
    if pad:
        moved = torch.cat([moved, moved[..., -1:].expand(*moved.shape[:-1], pad)], dim=-1)
    out = reduce(moved.reshape(*moved.shape[:-1], groups, block), -1)
    return out.movedim(-1, axis)


def _spread(entries: torch.Tensor, like: torch.Tensor, axis: int | None, block: int) -> torch.Tensor:
    """Scale entries broadcast over the weight (the DequantizeLinear axis/block_size rule)."""
    if axis is None:
        return entries
    if block:
        return entries.repeat_interleave(block, dim=axis).narrow(axis, 0, like.shape[axis])
    shape = [1] * like.dim()
    shape[axis] = -1
    return entries.reshape(shape)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 0.01, 0.999)
    return np.log(p / (1 - p))


class ClippedWeight(nn.Module):
    """LWC for one weight: learns where each scale entry clips."""

    def __init__(self, w: torch.Tensor, scale: np.ndarray, zero: np.ndarray, qmin: int, qmax: int,
                 axis: int | None, block: int):
        super().__init__()
        self.axis, self.block, self.qmin, self.qmax = axis, block, qmin, qmax
        self.symmetric = not np.any(zero) and qmin == -qmax
        scale = np.asarray(scale, np.float64)
        with torch.no_grad():
            hi = _entries(w, axis, block, lambda t, d: t.amax(dim=d)).double().numpy()
            lo = _entries(w, axis, block, lambda t, d: t.amin(dim=d)).double().numpy()
        tiny = np.finfo(np.float32).tiny
        if self.symmetric:
            amax = np.maximum(np.abs(lo), np.abs(hi))
            upper = _logit(scale * qmax / np.maximum(amax, tiny))
            lower = np.zeros_like(upper)
        else:
            # the fake-quant model's range [(qmin - z)·s, (qmax - z)·s] as fractions of [min W, max W]
            zero = np.asarray(zero, np.float64)
            upper = _logit((qmax - zero) * scale / np.maximum(hi, tiny))
            lower = _logit((qmin - zero) * scale / np.minimum(lo, -tiny))
        self.upper = nn.Parameter(torch.tensor(upper, dtype=torch.float32))
        self.lower = nn.Parameter(torch.tensor(lower, dtype=torch.float32), requires_grad=not self.symmetric)

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tiny = torch.finfo(torch.float32).tiny
        if self.symmetric:
            amax = _entries(w.abs(), self.axis, self.block, lambda t, d: t.amax(dim=d))
            s = torch.clamp(torch.sigmoid(self.upper) * amax / self.qmax, min=tiny)
            return s, torch.zeros_like(s)
        hi = torch.sigmoid(self.upper) * torch.clamp(_entries(w, self.axis, self.block, lambda t, d: t.amax(dim=d)), min=0)
        lo = torch.sigmoid(self.lower) * torch.clamp(_entries(w, self.axis, self.block, lambda t, d: t.amin(dim=d)), max=0)
        s = torch.clamp((hi - lo) / (self.qmax - self.qmin), min=tiny)
        z = torch.clamp(round_ste(self.qmin - lo / s), self.qmin, self.qmax)
        return s, z

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s, z = self.params(w)
        s_w, z_w = _spread(s, w, self.axis, self.block), _spread(z, w, self.axis, self.block)
        q = torch.clamp(round_ste(w / s_w) + z_w, self.qmin, self.qmax)
        return (q - z_w) * s_w

    def export(self, w: torch.Tensor, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(integers, scale, zero point)`` for the DequantizeLinear, as the fake-quant computes them."""
        with torch.no_grad():
            s, z = self.params(w)
            s = s.float()
            s_w, z_w = _spread(s, w, self.axis, self.block), _spread(z, w, self.axis, self.block)
            q = torch.clamp(torch.round(w.float() / s_w) + z_w, self.qmin, self.qmax)
        zero = z.numpy().astype(np.int64)
        return q.numpy().astype(np.int64).astype(dtype), s.numpy().astype(np.float32), zero.astype(dtype)


class ChannelScale(nn.Module):
    """A per-channel equivalent transform ``t = exp(τ)`` (starts at the identity)."""

    def __init__(self, channels: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(channels, dtype=torch.float32))

    def forward(self) -> torch.Tensor:
        return torch.exp(self.log_scale)


__all__ = ["ActivationRange", "ChannelScale", "ClippedWeight", "round_ste"]
