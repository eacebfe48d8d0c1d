"""The ``npu-sim`` target: a simulated mobile NPU, bit-exact through TVM, with a cost model.

It accepts what mobile NPUs accept: integer-only graphs, static per-tensor activation
scales, per-tensor or per-channel int4/int8 weights, int8/int16 activations, int32
accumulators and fixed-point requantization. :meth:`NpuSimTarget.check` rejects
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
from qcompiler.opset import QC_DOMAIN
from qcompiler.target import Capabilities, Runner, Target

from .host import LIBRARY, TVMRunner, write_readme
from .npu_cost import NpuSpec, estimate_cost, value_info

__all__ = ["NpuSimTarget", "NpuSpec", "estimate_cost", "npu_violation"]

COST_FILE = "cost.json"

_ACCUMULATE = {("", "MatMulInteger"), ("", "ConvInteger"), (QC_DOMAIN, "IntMatMul")}
_VECTOR = {
    ("", "Add"), ("", "ReduceSum"), ("", "Cast"), ("", "MaxPool"),
    (QC_DOMAIN, "Requantize"), (QC_DOMAIN, "IntAdd"), (QC_DOMAIN, "IntMul"), (QC_DOMAIN, "IntLookup"),
    (QC_DOMAIN, "IntSoftmax"), (QC_DOMAIN, "IntGELU"), (QC_DOMAIN, "IntLayerNorm"),
}
_MOVE = {("", op) for op in (
    "Reshape Transpose Squeeze Unsqueeze Flatten Concat Split Slice Gather GatherElements GatherND "
    "Expand Where Pad Equal Less Greater And Or Not Identity Constant Shape Dropout"
).split()}
_BOUNDARY = {("", "QuantizeLinear"), ("", "DequantizeLinear")}

_ACTIVATION = {"int8", "uint8", "int16"}
_WEIGHT = {"int8", "int4"}
_INDEX = {"int64", "int32", "bool"}


def _size(array) -> int:
    return 1 if array is None else int(np.asarray(array).size)


def npu_violation(node: ir.Node, info: dict | None = None) -> str | None:
    """Why the NPU cannot run ``node`` (one line), or None.

    ``info`` maps value names to ``(shape, dtype)`` (see :func:`npu_cost.value_info`)
    for values whose type the IR does not record.
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
    if key not in _ACCUMULATE | _VECTOR | _MOVE | _BOUNDARY:
        return f"{label} is not an NPU operation (integer matmul/conv, fixed-point vector ops and data movement only)"
    ins = node.inputs
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
        if _dtype(node.outputs[0]) != "int32":
            return f"{label}: the NPU accumulates in int32, not {_dtype(node.outputs[0])}"
    if key == (QC_DOMAIN, "Requantize"):
        m, k = const_array(ins[1]), const_array(ins[2])
        if m is None or k is None:
            return f"{label}: multiplier and shift must be compile-time constants"
        if m.size > 1 and _dtype(ins[0]) != "int32":
            return f"{label}: per-channel requantization of activations (only int32 accumulators may be per-channel)"
        if np.any(np.abs(m.astype(np.int64)) >= 2**31) or np.any(k < 0) or np.any(k > 63):
            return f"{label}: multiplier/shift out of the fixed-point unit's range"
    for out in node.outputs:
        dt = _dtype(out)
        if key in _BOUNDARY and dt.startswith("float"):
            continue
        if dt not in _ACTIVATION | _INDEX | {"int32", "?"}:
            return f"{label}: {dt} tensor '{out.name}' is not an NPU data type"
        if dt == "int64" and key not in _MOVE:
            return f"{label}: computes in int64 ('{out.name}'); the NPU has int32 accumulators"
    return None


@dataclass(frozen=True)
class NpuSimTarget(Target):
    """Simulated mobile NPU (integer-only, per-tensor activations); bit-exact run + cost model."""

    name = "npu-sim"
    capabilities = Capabilities(
        integer_only=True,
        weight_bits=frozenset({4, 8}),
        activation_bits=frozenset({8, 16}),
        granularities=frozenset({"per-tensor", "per-channel"}),
        runs_float=False,
    )

    def check(self, model: ir.Model) -> None:
        super().check(model)
        info = value_info(model)
        for node in model.graph:
            problem = npu_violation(node, info)
            if problem is not None:
                raise TargetError(f"target '{self.name}': {problem}")

    def build(self, model: ir.Model, out_dir: Path, ctx) -> dict:
        from . import tvm_bridge

        target = {"kind": "llvm", "mtriple": tvm_bridge.host_triple(), "mcpu": "x86-64"}
        executable = tvm_bridge.compile(tvm_bridge.lower(model), target)
        tvm_bridge.export(executable, out_dir / LIBRARY)
        cost = estimate_cost(model)
        (out_dir / COST_FILE).write_text(json.dumps(cost, indent=2, sort_keys=True) + "\n")
        extra = (
            f"\n`{COST_FILE}`: the NPU cost model's per-layer cycles, bytes moved and energy "
            f"(total {cost['total']['cycles']} cycles, {cost['total']['energy_uj']} uJ).\n"
        )
        write_readme(out_dir, self.name, LIBRARY, target, model, extra)
        return {"library": LIBRARY, "tvm_target": target, "cost": COST_FILE, "cost_total": cost["total"]}

    @classmethod
    def load(cls, out_dir: Path, manifest: dict) -> Runner:
        return TVMRunner(out_dir / manifest["target_info"]["library"], manifest)
