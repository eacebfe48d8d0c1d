"""The ``npu-sim`` target: a simulated mobile NPU, bit-exact through TVM, with a cost model.

It accepts what mobile NPUs accept: integer-only graphs, static per-tensor activation
scales, per-tensor or per-channel int4/int8 weights, int8/int16 activations, int32
accumulators and fixed-point requantization. Like TOSA's 16×8 mode (Arm Ethos-U), a
matmul with 16-bit activations may accumulate in 48 bits (``int64`` in the IR) when its
bound fits: option ``acc48`` (default on; off: int32 accumulators only). :meth:`NpuSimTarget.check` rejects
anything else naming the node. Execution: TVM's LLVM backend for a generic x86-64
CPU, run in process (bit-exact with the reference interpreter). ``cost.json`` holds
the per-layer cycles, bytes and energy of :func:`estimate_cost` (see ``npu_cost``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qcompiler.errors import TargetError
from qcompiler.graph import const_array, node_label
from qcompiler.integer import get_op
from qcompiler.opset import QC_DOMAIN
from qcompiler.pipeline import option
from qcompiler.qdq import is_nearest_resize
from qcompiler.target import Capabilities

from .tvm_target import TVMTarget
from .npu_cost import NpuSpec, estimate_cost, value_info

__all__ = ["NpuSimTarget", "NpuSpec", "estimate_cost", "npu_violation"]

COST_FILE = "cost.json"

_ACCUMULATE = {("", "MatMulInteger"), ("", "ConvInteger"), (QC_DOMAIN, "IntMatMul")}
#: Standard ops of the vector unit (every integer op other than the matmul is one too:
#: its decomposition is fixed-point vector arithmetic).
_VECTOR = {("", op) for op in "Add ReduceSum Cast MaxPool Max Min ReduceMax ReduceMin GlobalMaxPool".split()}
_MOVE = {("", op) for op in (
    "Reshape Transpose Squeeze Unsqueeze Flatten Concat Split Slice Gather GatherElements GatherND "
    "Expand Where Pad Equal Less Greater And Or Not Identity Constant Shape Dropout Resize"
).split()}
_BOUNDARY = {("", "QuantizeLinear"), ("", "DequantizeLinear")}

_ACTIVATION = {"int8", "uint8", "int16"}
_WEIGHT = {"int8", "int4"}
_INDEX = {"int64", "int32", "bool"}


def _size(array) -> int:
    return 1 if array is None else int(np.asarray(array).size)


ACC48_LIMIT = 2**47


def _accumulator_bound(node: ir.Node, info: dict | None) -> float | None:
    """``max|a − z_a| · max_j Σ_k |b_kj − z_b|`` of an integer matmul (None when unknown)."""

    def dtype_of(value):
        if value.type is not None:
            return value.dtype.numpy()
        return np.dtype(info[value.name][1]) if info and value.name in info else None

    def zero_point(index):
        z = const_array(node.inputs[index]) if len(node.inputs) > index and node.inputs[index] is not None else None
        return np.zeros((), np.int64) if z is None else np.asarray(z, np.int64)

    def span(value, index):
        dtype = dtype_of(value)
        if dtype is None or dtype.kind not in "iu":
            return None
        lo, hi = int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)
        z = zero_point(index)
        return float(max(np.max(np.abs(lo - z)), np.max(np.abs(hi - z))))

    a, b = node.inputs[0], node.inputs[1]
    x_span = span(a, 2)
    w = const_array(b)
    if x_span is None:
        return None
    if w is not None:
        zb = zero_point(3)
        zb = zb.reshape((1,) * (w.ndim - 1) + (-1,)) if zb.size > 1 else zb.reshape(())
        w = np.abs(np.asarray(w, np.int64) - zb)
        return x_span * float(w.sum(axis=-2).max(initial=0))
    b_span = span(b, 3)
    shape = info[a.name][0] if info and a.name in info else a.shape
    if b_span is None or shape is None or not isinstance(shape[-1], int):
        return None
    return x_span * b_span * shape[-1]


def _on_accumulator(node: ir.Node, key) -> bool:
    """A matmul, or the bias add right after one (both live in the 48-bit accumulator)."""
    if key in _ACCUMULATE:
        return True
    if key != ("", "Add"):
        return False
    producers = [v.producer() for v in node.inputs if v is not None]
    return any(p is not None and ("" if p.domain in ("", "ai.onnx") else p.domain, p.op_type) in _ACCUMULATE for p in producers)


def npu_violation(node: ir.Node, info: dict | None = None, acc48: bool = True) -> str | None:
    """Why the NPU cannot run ``node`` (one line), or None.

    ``info`` maps value names to ``(shape, dtype)`` (see :func:`npu_cost.value_info`)
    for values whose type the IR does not record. ``acc48``: 16-bit-activation matmuls
    may accumulate in 48 bits.
    """

    def _dtype(value: ir.Value | None) -> str:
        if value is None:
            return "?"
        if value.type is not None:
            return value.dtype.numpy().name
        if info and value.name in info:
            return np.dtype(info[value.name][1]).name
        return "?"

    key = ("" if node.domain in ("", "ai.onnx") else node.domain, node.op_type)
    label = node_label(node)
    vector = key in _VECTOR or (get_op(*key) is not None and key not in _ACCUMULATE)
    if key not in _ACCUMULATE | _MOVE | _BOUNDARY and not vector:
        return f"{label} is not an NPU operation (integer matmul/conv, fixed-point vector ops and data movement only)"
    ins = node.inputs
    if key == ("", "Resize") and not is_nearest_resize(node):
        return f"{label}: only nearest-neighbour Resize moves data on the NPU (this one interpolates)"
    if key == ("", "QuantizeLinear"):
        if ins[0].producer() is not None:
            return f"{label}: QuantizeLinear is only allowed on graph inputs"
        if _size(const_array(ins[1])) != 1:
            return f"{label}: activation scales must be per-tensor"
    if key == ("", "DequantizeLinear") and _size(const_array(ins[1])) != 1:
        return f"{label}: activation scales must be per-tensor"
    if key in _ACCUMULATE:
        a, b = ins[0], ins[1]
        if _dtype(a) not in _ACTIVATION:
            return f"{label}: activations must be int8/uint8/int16, got {_dtype(a)}"
        if const_array(b) is not None:
            if _dtype(b) not in _WEIGHT:
                return f"{label}: weights must be int4/int8, got {_dtype(b)}"
        elif _dtype(b) not in _ACTIVATION:
            return f"{label}: activations must be int8/uint8/int16, got {_dtype(b)}"
        if len(ins) > 2 and ins[2] is not None and _size(const_array(ins[2])) != 1:
            return f"{label}: activation zero points must be per-tensor constants"
        acc = _dtype(node.outputs[0])
        if acc == "int64" and acc48 and "int16" in (_dtype(a), _dtype(b)):
            bound = _accumulator_bound(node, info)
            if bound is None or bound >= ACC48_LIMIT:
                return f"{label}: the sum can exceed the 48-bit accumulator"
        elif acc != "int32":
            extra = " (48 bits for 16-bit activations)" if acc48 else ""
            return f"{label}: the NPU accumulates in int32{extra}, not {acc}"
    if key == (QC_DOMAIN, "Requantize"):
        m, k = const_array(ins[1]), const_array(ins[2])
        if m is None or k is None:
            return f"{label}: multiplier and shift must be compile-time constants"
        if m.size > 1 and _dtype(ins[0]) not in ("int32", "int64"):
            return f"{label}: per-channel requantization of activations (only accumulators may be per-channel)"
        if np.any(np.abs(m.astype(np.int64)) >= 2**31) or np.any(k < 0) or np.any(k > 63):
            return f"{label}: multiplier/shift out of the fixed-point unit's range"
    for out in node.outputs:
        dt = _dtype(out)
        if key in _BOUNDARY and dt.startswith("float"):
            continue
        if dt not in _ACTIVATION | _INDEX | {"int32", "?"}:
            return f"{label}: {dt} tensor '{out.name}' is not an NPU data type"
        if dt == "int64" and key not in _MOVE and not (acc48 and _on_accumulator(node, key)):
            return f"{label}: computes in int64 ('{out.name}'); the NPU has int32 accumulators"
    return None


@dataclass(frozen=True)
class NpuSimTarget(TVMTarget):
    """Simulated mobile NPU (integer-only, per-tensor activations); bit-exact run + cost model."""

    name = "npu-sim"
    capabilities = Capabilities(
        per_channel_activation_scale=False,
        integer_only=True,
        weight_bits=frozenset({4, 8}),
        activation_bits=frozenset({8, 16}),
        granularities=frozenset({"per-tensor", "per-channel"}),
        runs_float=False,
        symmetric_weights=True,
    )

    acc48: bool = option(True, "16-bit-activation matmuls may accumulate in 48 bits (TOSA 16x8 mode); false: int32 only")

    def check(self, model: ir.Model) -> None:
        super().check(model)
        info = value_info(model)
        for node in model.graph:
            problem = npu_violation(node, info, self.acc48)
            if problem is not None:
                raise TargetError(f"target '{self.name}': {problem}")

    def tvm_target(self) -> dict:
        from . import tvm_bridge

        return {"kind": "llvm", "mtriple": tvm_bridge.host_triple(), "mcpu": "x86-64", "opt-level": tvm_bridge.LLVM_OPT_LEVEL}

    def describe(self, model: ir.Model, out_dir: Path, executable, target: dict, lowering: dict):
        cost = estimate_cost(model)
        (out_dir / COST_FILE).write_text(json.dumps(cost, indent=2, sort_keys=True) + "\n")
        readme = (
            f"\n`{COST_FILE}`: the NPU cost model's per-layer cycles, bytes moved and energy "
            f"(total {cost['total']['cycles']} cycles, {cost['total']['energy_uj']} uJ).\n"
        )
        return {"cost": COST_FILE, "cost_total": cost["total"]}, readme
