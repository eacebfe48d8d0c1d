"""``ConvInteger`` on the TVM targets: im2col + the scheduled int8 dense kernel where it
applies, else Relax's conv1d/conv2d on zero-point-corrected operands."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from qcompiler.errors import TargetError
from qcompiler.graph import node_label

from ..common import node_attr
from ..registry import lowers

if TYPE_CHECKING:
    from ..lowering import Lowerer
from .matmul import _int8_dense, _signed8, _sub_narrow, _unsigned8


@lowers("ConvInteger")
def conv_integer(lo: Lowerer, node: ir.Node):
    R = lo.R
    x = lo.expr(node.inputs[0])
    w = lo.expr(node.inputs[1])
    za = lo.const(node.inputs[2]) if len(node.inputs) > 2 else None
    zw = lo.const(node.inputs[3]) if len(node.inputs) > 3 else None
    for i in (2, 3):
        if len(node.inputs) > i and node.inputs[i] is not None and lo.const(node.inputs[i]) is None:
            raise TargetError(f"{node_label(node)}: zero points must be compile-time constants")
    spatial = len(lo.shape(x)) - 2
    if spatial not in (1, 2):
        raise TargetError(f"{node_label(node)}: only 1-D and 2-D ConvInteger are supported")
    if lo.int8_dot and lo.dtype(x) in ("int8", "uint8"):
        scheduled = _int8_conv(lo, node, x, lo.const(node.inputs[1]), za, zw)
        if scheduled is not None:
            return scheduled
        lo.int8_fallback.append(lo.node_name)
    if zw is not None and np.ndim(zw) == 1 and zw.size > 1:
        zw = zw.reshape((-1,) + (1,) * (spatial + 1))
    x = _sub_narrow(lo, x, za)  # subtract first: padding is the real zero
    w = _sub_narrow(lo, w, zw)
    if lo.dtype(x) != lo.dtype(w):
        common = "int32" if "int32" in (lo.dtype(x), lo.dtype(w)) else "int16"
        x = lo.emit(R.astype(x, common)) if lo.dtype(x) != common else x
        w = lo.emit(R.astype(w, common)) if lo.dtype(w) != common else w
    conv = _conv_attrs(node, lo.shape(x), lo.shape(w))
    if spatial == 1:
        return lo.emit(R.nn.conv1d(x, w, out_dtype="int32", **conv))
    return lo.emit(R.nn.conv2d(x, w, out_dtype="int32", **conv))


def _int8_conv(lo: Lowerer, node: ir.Node, x, w: np.ndarray | None, za, zw):
    """A 1-D/2-D ``ConvInteger`` (group 1, 8-bit input, scalar input zero point, constant
    weights that fit int8 once their zero points are subtracted) as im2col + the scheduled
    int8 dense kernel of :func:`_int8_dense`: the input is gathered into patches
    [N·OH·OW, C·KH·KW] (padded taps hold the input zero point, so they contribute exactly
    zero after the zero-point correction, as the reference's zero padding of ``x − za``),
    multiplied by the weights [OC, C·KH·KW] pre-packed at compile time, and laid back out
    as NCHW int32. None where it does not apply (the caller falls back to ``conv2d``)."""
    R = lo.R
    x_shape = lo.shape(x)
    if w is None or w.ndim != len(x_shape) or (za is not None and np.size(za) > 1):
        return None
    conv = _conv_attrs(node, x_shape, w.shape)
    if conv["groups"] != 1 or w.shape[1] != x_shape[1]:
        return None
    wk = w.astype(np.int64)
    if zw is not None and np.any(zw):
        zw = np.asarray(zw).astype(np.int64)
        wk = wk - (zw.reshape((-1,) + (1,) * (w.ndim - 1)) if zw.size > 1 else zw.reshape(()))
    if wk.size == 0 or wk.min() < -128 or wk.max() > 127:
        return None
    if len(x_shape) == 3:  # 1-D: a 2-D conv of height 1
        x = lo.emit(R.reshape(x, (x_shape[0], x_shape[1], 1, x_shape[2])))
        wk = wk[:, :, None, :]
        conv = {
            "strides": [1, *conv["strides"]], "dilation": [1, *conv["dilation"]],
            "padding": [0, conv["padding"][0], 0, conv["padding"][1]], "groups": 1,
        }
    view = (_unsigned8 if lo.int8_dot == "vnni" else _signed8)(lo, x, za)
    if view is None:
        return None
    x, z = view
    n, c, h, wd = lo.shape(x)
    oc, _, kh, kw = wk.shape
    (sh, sw), (dh, dw) = conv["strides"], conv["dilation"]
    top, left, bottom, right = conv["padding"]
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + left + right - dw * (kw - 1) - 1) // sw + 1
    if oh <= 0 or ow <= 0:
        return None
    k = c * kh * kw
    k4 = -(-k // 4) * 4  # the dense kernel's K; the extra columns meet zero weights
    patches = lo.emit_te(_im2col_te(n, c, h, wd, oh, ow, kh, kw, sh, sw, dh, dw, top, left, k4, z), x)
    w_nk = np.zeros((oc, k4), np.int8)
    w_nk[:, :k] = wk.reshape(oc, k)
    y = _int8_dense(lo, patches, w_nk, z)
    if y is None:  # pragma: no cover - the checks above cover _int8_dense's
        return None
    y = lo.emit(R.permute_dims(lo.emit(R.reshape(y, (n, oh, ow, oc))), [0, 3, 1, 2]))
    return lo.emit(R.reshape(y, (n, oc, ow))) if len(x_shape) == 3 else y


def _im2col_te(n, c, h, w, oh, ow, kh, kw, sh, sw, dh, dw, top, left, k4, pad_value):
    """TE patches of an NCHW 8-bit tensor: ``P[(b, i, j), (ch, p, q)] = x[b, ch, i·sh + p·dh − top,
    j·sw + q·dw − left]``, ``pad_value`` outside the input and in the columns past C·KH·KW."""
    from tvm import te, tirx

    k = c * kh * kw

    def im2col(x):  # the kernel's name: not "conv" (the arm-neon manifest's "other matmul" test)
        def patch(row, col):
            b, rest = row // (oh * ow), row % (oh * ow)
            ch, tap = col // (kh * kw), col % (kh * kw)
            y = rest // ow * sh + tap // kw * dh - top
            xx = rest % ow * sw + tap % kw * dw - left
            inside = tirx.all(col < k, y >= 0, y < h, xx >= 0, xx < w)
            value = x[b, tirx.min(ch, c - 1), tirx.max(tirx.min(y, h - 1), 0), tirx.max(tirx.min(xx, w - 1), 0)]
            return tirx.if_then_else(inside, value, tirx.const(pad_value, x.dtype))

        return te.compute((n * oh * ow, k4), patch, name="im2col")

    return im2col


def _conv_attrs(node: ir.Node, x_shape, w_shape) -> dict:
    spatial = len(x_shape) - 2
    kernel = list(node_attr(node, "kernel_shape", w_shape[2:]))
    strides = list(node_attr(node, "strides", [1] * spatial))
    dilations = list(node_attr(node, "dilations", [1] * spatial))
    pads = list(node_attr(node, "pads", [0] * (2 * spatial)))
    auto_pad = node_attr(node, "auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * spatial)
        for i in range(spatial):
            out = -(-x_shape[2 + i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - x_shape[2 + i])
            small, big = total // 2, total - total // 2
            pads[i], pads[i + spatial] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
    elif auto_pad == "VALID":
        pads = [0] * (2 * spatial)
    return {"strides": strides, "padding": pads, "dilation": dilations, "groups": int(node_attr(node, "group", 1))}
