"""Quantization arithmetic shared by every pass and target.

Affine quantization (as ONNX ``QuantizeLinear``/``DequantizeLinear`` define it)::

    q = clamp(round_half_even(x / s) + z, qmin, qmax)        x̂ = (q − z) · s

Symmetric means ``z = 0`` and a signed type with the restricted range
``[−(2^(b−1) − 1), 2^(b−1) − 1]`` (so negation never overflows);
asymmetric uses the full range of an unsigned type for activations and of a signed
type for weights. Granularity: per-tensor, per-channel (one ``s, z`` per index
of ``axis``) or per-group (blocks of ``group_size`` along ``axis``, ONNX's
``block_size``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir

Granularity = Literal["per-tensor", "per-channel", "per-group"]

_NUMPY_TYPES = {
    (4, True): np.dtype(ml_dtypes.int4),
    (4, False): np.dtype(ml_dtypes.uint4),
    (8, True): np.dtype(np.int8),
    (8, False): np.dtype(np.uint8),
    (16, True): np.dtype(np.int16),
    (16, False): np.dtype(np.uint16),
}


def storage_dtype(bits: int, signed: bool) -> np.dtype:
    try:
        return _NUMPY_TYPES[(bits, signed)]
    except KeyError:
        raise ValueError(f"unsupported bit width {bits} (supported: 4, 8, 16)") from None


@dataclasses.dataclass(frozen=True)
class QFormat:
    """How one tensor is quantized: ``int8:per-channel``, ``uint8:per-tensor:asym``, ``int4:per-group:32``."""

    bits: int = 8
    signed: bool = True
    granularity: Granularity = "per-tensor"
    symmetric: bool = True
    group_size: int = 32

    def __post_init__(self):
        storage_dtype(self.bits, self.signed)
        if self.granularity not in ("per-tensor", "per-channel", "per-group"):
            raise ValueError(f"unknown granularity {self.granularity!r}")
        if self.group_size < 1:
            raise ValueError("group size must be positive")

    @property
    def dtype(self) -> np.dtype:
        return storage_dtype(self.bits, self.signed)

    @property
    def qrange(self) -> tuple[int, int]:
        """(qmin, qmax); symmetric formats use the restricted signed range."""
        if self.signed:
            hi = 2 ** (self.bits - 1) - 1
            return (-hi if self.symmetric else -hi - 1), hi
        return 0, 2**self.bits - 1

    def __str__(self) -> str:
        text = f"{'int' if self.signed else 'uint'}{self.bits}:{self.granularity}"
        if self.granularity == "per-group":
            text += f":{self.group_size}"
        if not self.symmetric:
            text += ":asym"
        return text

    _PATTERN = re.compile(r"^(u?int)(4|8|16)(?::(per-tensor|per-channel|per-group))?(?::(\d+))?(?::(sym|asym))?$")

    @classmethod
    def parse(cls, text: str) -> QFormat:
        match = cls._PATTERN.match(text.strip())
        if not match:
            raise ValueError(
                f"bad quantization format {text!r}; expected e.g. int8:per-channel, "
                "uint8:per-tensor:asym, int4:per-group:32"
            )
        kind, bits, granularity, group, sym = match.groups()
        signed = kind == "int"
        symmetric = sym != "asym" if sym else signed
        return cls(
            bits=int(bits),
            signed=signed,
            granularity=granularity or "per-tensor",
            symmetric=symmetric,
            group_size=int(group) if group else 32,
        )


def qparams(lo: np.ndarray, hi: np.ndarray, fmt: QFormat) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point mapping ``[lo, hi]`` (arrays, one per channel/group) onto ``fmt``.

    The range is first widened to include 0 so that 0 is exactly representable. An empty
    range (an all-zero channel, a tensor that was 0 on every calibration sample) gets scale
    1: every scale represents it exactly, and products with it (a bias scale ``s_x·s_w``)
    stay representable instead of underflowing to 0.
    """
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    qmin, qmax = fmt.qrange
    tiny = np.finfo(np.float32).tiny
    if fmt.symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi))
        half = qmax if fmt.signed else (qmax - qmin) // 2  # uint8 symmetric: z = 128, q in [1, 255]
        scale = np.where(amax > 0, np.maximum(amax / half, tiny), 1.0)
        zero = np.full_like(scale, 0 if fmt.signed else (qmax + 1) // 2)
    else:
        span = hi - lo
        scale = np.where(span > 0, np.maximum(span / (qmax - qmin), tiny), 1.0)
        zero = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    return scale.astype(np.float32), zero.astype(fmt.dtype)


def quantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, fmt: QFormat) -> np.ndarray:
    """``clamp(round_half_even(x / s) + z)`` as ONNX QuantizeLinear computes it (float32 division)."""
    qmin, qmax = fmt.qrange
    q = np.rint(np.asarray(x, np.float32) / np.asarray(scale, np.float32)) + np.asarray(zero).astype(np.float32)
    return np.clip(q, qmin, qmax).astype(fmt.dtype)


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    return ((q.astype(np.int32) - np.asarray(zero).astype(np.int32)).astype(np.float32) * np.asarray(scale, np.float32))


@dataclasses.dataclass
class QuantizedTensor:
    """Integer data with the scale/zero point to feed ``DequantizeLinear``."""

    data: np.ndarray
    scale: np.ndarray  # scalar, 1-D (per-channel) or blocked (per-group)
    zero_point: np.ndarray
    axis: int | None = None
    block_size: int | None = None

    def dequantize(self) -> np.ndarray:
        scale, zero = self.scale, self.zero_point
        if self.block_size:
            scale = np.repeat(scale, self.block_size, axis=self.axis)
            zero = np.repeat(zero, self.block_size, axis=self.axis)
            index = [slice(None)] * self.data.ndim
            index[self.axis] = slice(0, self.data.shape[self.axis])
            scale, zero = scale[tuple(index)], zero[tuple(index)]
        elif self.axis is not None and scale.ndim == 1:
            shape = [1] * self.data.ndim
            shape[self.axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        return dequantize(self.data, scale, zero)


#: Clipping ratios searched for the MSE-optimal weight range (seed 003, Theorem 4: the
#: scale minimising E[(W − Ŵ)²]; found numerically per channel/group).
CLIP_RATIOS = np.linspace(0.5, 1.0, 26)


def _rows_qparams(rows: np.ndarray, fmt: QFormat, search: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per row of a 2-D array, optionally MSE-optimal over clip ratios."""
    lo, hi = rows.min(axis=1), rows.max(axis=1)
    best_scale, best_zero = qparams(lo, hi, fmt)
    if not search:
        return best_scale, best_zero
    best_err = np.full(rows.shape[0], np.inf)
    for ratio in CLIP_RATIOS:
        scale, zero = qparams(lo * ratio, hi * ratio, fmt)
        q = quantize(rows, scale[:, None], zero[:, None], fmt)
        err = np.sum((dequantize(q, scale[:, None], zero[:, None]) - rows) ** 2, axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
    return best_scale.astype(np.float32), best_zero.astype(fmt.dtype)


def quantize_weight(w: np.ndarray, fmt: QFormat, channel_axis: int, reduce_axis: int, search: bool = True) -> QuantizedTensor:
    """Quantize a constant weight.

    ``channel_axis`` indexes output channels (per-channel scales); ``reduce_axis`` is
    the accumulation axis along which per-group blocks run. With ``search`` each
    scale is the one minimising the squared weight error over clipping ratios in
    [0.5, 1] (min-max when nothing clips better).
    """
    w = np.asarray(w, dtype=np.float32)
    channel_axis %= max(w.ndim, 1)
    reduce_axis %= max(w.ndim, 1)
    if fmt.granularity == "per-tensor" or w.ndim == 0:
        scale, zero = _rows_qparams(w.reshape(1, -1), fmt, search)
        scale, zero = scale.reshape(()), zero.reshape(())
        return QuantizedTensor(quantize(w, scale, zero, fmt), scale, zero)
    if fmt.granularity == "per-channel":
        rows = np.moveaxis(w, channel_axis, 0).reshape(w.shape[channel_axis], -1)
        scale, zero = _rows_qparams(rows, fmt, search)
        shape = [1] * w.ndim
        shape[channel_axis] = -1
        q = quantize(w, scale.reshape(shape), zero.reshape(shape), fmt)
        return QuantizedTensor(q, scale, zero, axis=channel_axis)
    size = fmt.group_size
    length = w.shape[reduce_axis]
    groups = -(-length // size)
    pad = groups * size - length
    moved = np.moveaxis(w, reduce_axis, -1)
    padded = np.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(0, pad)], mode="edge")
    blocks = padded.reshape(-1, size)
    scale, zero = _rows_qparams(blocks, fmt, search)
    q = quantize(blocks, scale[:, None], zero[:, None], fmt).reshape(padded.shape)[..., :length]
    block_shape = moved.shape[:-1] + (groups,)
    scale = np.moveaxis(scale.reshape(block_shape), -1, reduce_axis)
    zero = np.moveaxis(zero.reshape(block_shape), -1, reduce_axis)
    return QuantizedTensor(np.moveaxis(q, -1, reduce_axis), scale, zero, axis=reduce_axis, block_size=size)


def pow2_quantize_weight(w: np.ndarray, fmt: QFormat, channel_axis: int) -> QuantizedTensor:
    """Power-of-two (log) weights: every value is 0 or ``±s·2^e`` with ``e ∈ [0, E]``, so a
    product by it is a shift. With ``b`` bits (one for the sign) there are ``2^(b−1)``
    magnitudes, ``0`` and ``2^0 … 2^E`` with ``E = 2^(b−1) − 2``; per output channel ``s =
    max|W|/2^E`` and ``e = round(log2(|w|/s))`` (rounded in the log domain), clamped to
    ``[0, E]``, ``0`` where ``|w| < s/√2``. Stored as integers ``±2^e`` on the format's
    type (int8 holds ``2^6``, so 8-bit formats are capped at ``E = 6``), they lower like any
    symmetric per-channel weight."""
    w = np.asarray(w, dtype=np.float32)
    top = min(2 ** (fmt.bits - 1) - 2, 6 if fmt.bits <= 8 else 14)
    channel_axis %= max(w.ndim, 1)
    rows = np.moveaxis(w, channel_axis, 0).reshape(w.shape[channel_axis], -1).astype(np.float64)
    amax = np.abs(rows).max(axis=1)
    scale = np.where(amax > 0, amax / 2.0**top, 1.0)
    with np.errstate(divide="ignore"):
        exponent = np.round(np.log2(np.abs(rows) / scale[:, None]))
    magnitude = np.where(exponent < 0, 0.0, 2.0 ** np.clip(exponent, 0, top))
    q = (np.sign(rows) * magnitude).reshape(np.moveaxis(w, channel_axis, 0).shape)
    q = np.moveaxis(q, 0, channel_axis).astype(np.dtype(np.int16) if fmt.bits > 8 else np.dtype(np.int8))
    return QuantizedTensor(q, scale.astype(np.float32), np.zeros(scale.shape, q.dtype), axis=channel_axis)


def second_moment_scaled(qt: QuantizedTensor, w: np.ndarray) -> QuantizedTensor:
    """The dequantized weights scaled by ``γ = sqrt(E[W²] / E[Q(W)²])`` per scale entry
    (seed 003, eq. 18: quantization keeps each channel's second moment); the integers are
    unchanged, only the dequantization scales move."""
    w = np.asarray(w, np.float64)
    dq = qt.dequantize().astype(np.float64)
    if qt.block_size or qt.axis is None or np.asarray(qt.scale).ndim == 0:
        if qt.block_size:
            return qt  # per-group: left as it is (a γ per block would need the block layout)
        energy, quantized = float(np.sum(w * w)), float(np.sum(dq * dq))
        gamma = np.sqrt(energy / quantized) if quantized > 0 else 1.0
    else:
        axis = qt.axis % w.ndim
        energy = np.sum(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1) ** 2, axis=1)
        quantized = np.sum(np.moveaxis(dq, axis, 0).reshape(w.shape[axis], -1) ** 2, axis=1)
        gamma = np.where(quantized > 0, np.sqrt(energy / np.where(quantized > 0, quantized, 1.0)), 1.0)
    scale = (np.asarray(qt.scale, np.float64) * gamma).astype(np.float32)
    return QuantizedTensor(qt.data, scale, qt.zero_point, qt.axis, qt.block_size)


def onnx_dtype(dtype: np.dtype) -> ir.DataType:
    return ir.DataType.from_numpy(np.dtype(dtype))
