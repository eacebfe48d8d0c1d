"""Helpers every part of the TVM backend shares: dtypes, attributes, constants, markers.

Nothing here imports TVM at module level (``import qcompiler`` stays fast).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler import intops
from qcompiler.errors import TargetError
from qcompiler.graph import node_label


def tvm():
    """``(tvm, relax)``, imported on first use."""
    import tvm as _tvm
    from tvm import relax

    return _tvm, relax


def relax_dtype(dtype: ir.DataType) -> str:
    """The Relax dtype holding an IR type (int4/uint4 are held unpacked in 8 bits)."""
    if dtype == ir.DataType.INT4:
        return "int8"
    if dtype == ir.DataType.UINT4:
        return "uint8"
    if dtype == ir.DataType.BOOL:
        return "bool"
    return str(dtype.numpy())


def host_array(array: np.ndarray) -> np.ndarray:
    """A numpy array TVM can hold (int4/uint4 widened to 8 bits)."""
    array = np.asarray(array)
    name = array.dtype.name
    if name == "int4":
        return array.astype(np.int8)
    if name == "uint4":
        return array.astype(np.uint8)
    return array


#: PrimFunc attribute of the kernels this module schedules itself (left alone by _schedule_cpu).
SCHEDULED = "qcompiler.scheduled"


#: PrimFunc attribute of kernels that are element-wise although TVM's pattern analysis cannot
#: tell (a table lookup reads at a data-dependent index): fused like any element-wise op.
ELEMENT_WISE = "qcompiler.element_wise"


#: Block annotation naming the int8 product a fused kernel's schedule tensorizes (its value:
#: the kernel kind); set on the reduction block of the VNNI dense kernels, which are
#: scheduled after Relax has fused their element-wise consumers into them.
DOT_BLOCK = "qcompiler.dot"


#: Name of the block of an ``IntLookup`` kernel (FuseTIR keeps it; the schedules look for it).
LOOKUP_BLOCK = "lookup"


def extents(*dims) -> tuple:
    """int64 extents for TE kernels, as Relax's legalized kernels use: FuseTIR matches the
    buffers of fused kernels exactly, extent types included."""
    from tvm import tirx

    return tuple(tirx.const(d, "int64") for d in dims)


def float64_division_exact(a_bound: int, b_bound: int) -> bool:
    """Whether ``⌊float64(a) / float64(b)⌋ = ⌊a / b⌋`` for ``|a| ≤ a_bound``, ``1 ≤ b ≤ b_bound``
    (see :meth:`Lowerer.floor_div`)."""
    return a_bound < 2**53 and b_bound < 2**53


def const_divisor(divisor: int, a_max: int) -> tuple[int, int] | None:
    """``(M, S)`` with ``⌊a·M / 2^S⌋ = ⌊a / divisor⌋`` for every ``0 ≤ a ≤ a_max``
    (``M = ⌈2^S / divisor⌉``, checked exhaustively at compile time, ``a·M < 2^62``); None if
    the range is too large to check or no such pair is exact."""
    if not (0 <= a_max <= 1 << 20 and divisor >= 1):
        return None
    span = np.arange(a_max + 1, dtype=np.int64)
    shift = a_max.bit_length() + (divisor - 1).bit_length()
    multiplier = -(-(1 << shift) // divisor)
    if a_max * multiplier < 2**62 and np.array_equal((span * multiplier) >> shift, span // divisor):
        return multiplier, shift
    return None


def sanitize(name: str, index: int) -> str:
    clean = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)
    return clean if clean and (clean[0].isalpha() or clean[0] == "_") else f"input_{index}_{clean}"


def constant_node_value(node: ir.Node) -> np.ndarray:
    for key, attr in node.attributes.items():
        if key in ("value", "sparse_value"):
            return attr.value.numpy()
        if key in ("value_float", "value_int"):
            return np.array(attr.value, np.float32 if key == "value_float" else np.int64)
        if key in ("value_floats", "value_ints"):
            return np.array(list(attr.value), np.float32 if key == "value_floats" else np.int64)
    raise TargetError(f"{node_label(node)}: unsupported Constant attribute")


def node_attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    if attr is None:
        return default
    value = attr.value
    return value.decode() if isinstance(value, bytes) else value


def out_dtype_of_zp(zp: np.ndarray) -> str:
    return str(np.asarray(zp).dtype)


def channel(param: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    return np.asarray(intops.channel_view(np.asarray(param).astype(np.int64), ndim, axis))


def column_view(zp, ndim: int) -> np.ndarray:
    zp = np.asarray(zp)
    return zp.reshape((1,) * (ndim - 1) + (-1,)) if zp.size > 1 else zp.reshape(())


def narrowest(array: np.ndarray) -> np.dtype:
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if array.size == 0 or (array.min() >= info.min and array.max() <= info.max):
            return np.dtype(dtype)
    return np.dtype(np.int64)
