"""Convolution kernels of the reference interpreter.

``onnx.reference`` convolves through a Python-level im2col: minutes per image for a
detector backbone, which made calibration and build verification the slowest part of
compiling a CNN. Here a convolution is a sum over kernel offsets of one batched matrix
product each::

    y[n, g, m, p] = Σ_k  W[g, m, :, k] · X_pad[n, g, :, p·s + k·d]

(``g`` groups, ``p`` output positions, ``s`` strides, ``d`` dilations), so every product
runs in BLAS and memory stays at one shifted view of the input. Integer convolutions
(``ConvInteger``) run the same sum in float64, exact while every partial sum stays below
2^53, which the operand bounds check (int8/int16 operands are far inside it).
"""

from __future__ import annotations

import itertools

import numpy as np
from onnx.reference.op_run import OpRun

#: float64 represents every integer below this exactly.
_EXACT_FLOAT64 = 2.0**53


def _pads(auto_pad, pads, in_shape, kernel, strides, dilations) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial axis, from ``pads`` or ``auto_pad``."""
    auto = auto_pad.decode() if isinstance(auto_pad, bytes) else (auto_pad or "NOTSET")
    rank = len(in_shape)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for size, k, s, d in zip(in_shape, kernel, strides, dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            out.append((small, large) if auto == "SAME_UPPER" else (large, small))
        return out
    if auto == "VALID" or pads is None:
        return [(0, 0)] * rank
    return [(int(pads[i]), int(pads[i + rank])) for i in range(rank)]


def convolve(x: np.ndarray, w: np.ndarray, *, group: int = 1, strides=None, pads=None, dilations=None,
             auto_pad=None, accumulate=np.float32) -> np.ndarray:
    """``Conv`` without bias: ``x`` is (N, C, *spatial), ``w`` is (M, C/group, *kernel);
    products and sums in ``accumulate``."""
    spatial = x.ndim - 2
    kernel = w.shape[2:]
    strides = list(strides) if strides else [1] * spatial
    dilations = list(dilations) if dilations else [1] * spatial
    padding = _pads(auto_pad, pads, x.shape[2:], kernel, strides, dilations)
    xp = np.pad(x.astype(accumulate, copy=False), [(0, 0), (0, 0), *padding])
    out_shape = [(xp.shape[2 + i] - ((kernel[i] - 1) * dilations[i] + 1)) // strides[i] + 1 for i in range(spatial)]
    n, channels = x.shape[:2]
    m = w.shape[0]
    g = int(group)
    cg, mg = channels // g, m // g
    positions = int(np.prod(out_shape)) if out_shape else 1
    y = np.zeros((n, g, mg, positions), accumulate)
    wg = w.astype(accumulate, copy=False).reshape(g, mg, cg, *kernel)
    for offset in itertools.product(*(range(k) for k in kernel)):
        window = tuple(
            slice(o * d, o * d + (size - 1) * s + 1, s)
            for o, d, s, size in zip(offset, dilations, strides, out_shape)
        )
        patch = xp[(slice(None), slice(None), *window)].reshape(n, g, cg, positions)
        y += np.matmul(wg[(..., *offset)], patch)
    return y.reshape(n, m, *out_shape)


class Conv(OpRun):
    """``Conv`` as a sum of per-offset matrix products (float32, as runtimes accumulate)."""

    def _run(self, x, w, b=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, pads=None, strides=None):
        y = convolve(x, w, group=group or 1, strides=strides, pads=pads, dilations=dilations, auto_pad=auto_pad,
                     accumulate=np.float64 if x.dtype == np.float64 else np.float32)
        if b is not None:
            y += b.reshape((1, -1) + (1,) * (y.ndim - 2)).astype(y.dtype)
        return (y.astype(x.dtype),)


class ConvInteger(OpRun):
    """``ConvInteger``: int32 sums of ``(x − x_zero)·(w − w_zero)`` (per-output-channel
    weight zero points allowed), exact."""

    def _run(self, x, w, x_zero_point=None, w_zero_point=None, auto_pad=None, dilations=None, group=None,
             kernel_shape=None, pads=None, strides=None):
        xs = x.astype(np.int64) - (0 if x_zero_point is None else np.asarray(x_zero_point, np.int64))
        wz = 0 if w_zero_point is None else np.asarray(w_zero_point, np.int64)
        if np.ndim(wz) == 1 and np.size(wz) > 1:
            wz = wz.reshape((-1,) + (1,) * (w.ndim - 1))
        ws = w.astype(np.int64) - wz
        terms = int(np.prod(w.shape[1:]))
        bound = float(np.abs(xs).max(initial=0)) * float(np.abs(ws).max(initial=0)) * terms
        options = {"group": group or 1, "strides": strides, "pads": pads, "dilations": dilations, "auto_pad": auto_pad}
        # float64 BLAS while every sum is an integer below 2^53; else int64 products (slow)
        y = convolve(xs, ws, accumulate=np.float64 if bound < _EXACT_FLOAT64 else np.int64, **options)
        return (y.astype(np.int32),)
