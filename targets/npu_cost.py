"""Cost model of the simulated mobile NPU: cycles, bytes moved and energy per layer.

A layer is one node of the integer-stage graph. The NPU has a MAC array (matmul and
convolution), a vector unit (requantize, softmax, LayerNorm, adds, pooling) and two
memories: weights stream from DRAM, activations live in on-chip SRAM. A layer takes
``max(compute cycles, memory cycles) + overhead`` cycles. Every assumption is a field
of :class:`NpuSpec` (documented in ``docs/targets.md``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from qcompiler.graph import const_array
from qcompiler.integer import get_op
from qcompiler.opset import QC_DOMAIN


@dataclasses.dataclass(frozen=True)
class NpuSpec:
    """Assumed hardware figures (a 1 GHz mobile NPU, ~2 int8 TOPS)."""

    clock_hz: float = 1.0e9
    #: MAC-array throughput by (activation bits, weight bits), MACs per cycle.
    macs_per_cycle: tuple = (((8, 4), 2048), ((8, 8), 1024), ((16, 4), 512), ((16, 8), 512), ((16, 16), 256))
    #: Energy of one MAC in pJ by (activation bits, weight bits).
    pj_per_mac: tuple = (((8, 4), 0.12), ((8, 8), 0.2), ((16, 4), 0.35), ((16, 8), 0.45), ((16, 16), 0.9))
    #: Vector unit: 32-bit integer operations per cycle and pJ per operation.
    vector_ops_per_cycle: int = 64
    pj_per_vector_op: float = 0.5
    #: DRAM (weights) and SRAM (activations): bytes per cycle and pJ per byte.
    dram_bytes_per_cycle: float = 16.0
    sram_bytes_per_cycle: float = 128.0
    pj_per_dram_byte: float = 40.0
    pj_per_sram_byte: float = 1.5
    #: Fixed cost of starting a layer (descriptor fetch, pipeline fill).
    layer_overhead_cycles: int = 64

    def mac_rate(self, a_bits: int, w_bits: int) -> float:
        return _lookup(self.macs_per_cycle, a_bits, w_bits)

    def mac_energy(self, a_bits: int, w_bits: int) -> float:
        return _lookup(self.pj_per_mac, a_bits, w_bits)


def _lookup(table, a_bits: int, w_bits: int) -> float:
    key = (8 if a_bits <= 8 else 16, 4 if w_bits <= 4 else (8 if w_bits <= 8 else 16))
    return dict(table).get(key, dict(table)[(16, 16)])


#: Vector operations per output element of the standard elementwise ops (integer ops are
#: charged by the primitives of their decompositions: :func:`integer_op_work`).
_VECTOR_OPS = {
    "Add": 1, "Cast": 1, "Where": 1, "Equal": 1, "Less": 1, "Greater": 1,
    "And": 1, "Or": 1, "Not": 1, "QuantizeLinear": 4, "DequantizeLinear": 2,
}
#: Vector operations of an integer square root (a digit-by-digit loop: 32 steps of ~6 ops).
ISQRT_OPS = 32 * 6
#: Ops that only change metadata (no data moves).
_VIEWS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Constant", "Shape", "Dropout"})
_MATMULS = frozenset({"MatMulInteger", "IntMatMul"})
_GATHERS = frozenset({"Gather", "GatherElements", "GatherND"})


def _bits(dtype: np.dtype | str) -> int:
    dtype = np.dtype(dtype) if not isinstance(dtype, np.dtype) else dtype
    if dtype.name in ("int4", "uint4"):
        return 4
    if dtype == np.bool_:
        return 8
    return dtype.itemsize * 8


def value_info(model: ir.Model) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every value; static shapes from the IR, else one reference run on zeros."""
    info: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    complete = True
    values = list(model.graph.inputs) + list(model.graph.initializers.values())
    values += [out for node in model.graph for out in node.outputs]
    for value in values:
        shape = value.shape
        if value.type is None or shape is None or not all(isinstance(d, int) for d in shape):
            complete = False
            break
        info[value.name] = (tuple(shape), value.dtype.numpy())
    if complete:
        return info
    from qcompiler.interpreter import ReferenceInterpreter

    feeds = {
        v.name: np.zeros(tuple(v.shape), v.dtype.numpy())
        for v in model.graph.inputs
        if v.const_value is None
    }
    arrays = ReferenceInterpreter(model).run_all(feeds)
    return {name: (tuple(np.shape(a)), np.asarray(a).dtype) for name, a in arrays.items()}


def integer_op_work(node: ir.Node, op, info) -> tuple[int, int]:
    """``(macs, vector_ops)`` of an integer op, from the primitives of its decomposition:
    each element-wise primitive once per element it produces, each reduction once per
    element it reads, square roots at :data:`ISQRT_OPS`, matmul products as MACs."""
    from qcompiler.integer import TensorInfo, reachable

    infos = []
    for value in node.inputs:
        if value is None or not value.name or value.name not in info:
            infos.append(None)
            continue
        shape, dtype = info[value.name]
        infos.append(TensorInfo(tuple(shape), np.dtype(dtype), const_array(value)))
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    _, outputs = op.trace(infos, attrs)
    macs = vector = 0
    for prim in reachable(outputs):
        size = math.prod(prim.shape)
        if prim.op in ("input", "const", "bound", "cast"):
            continue
        if prim.op == "matmul":
            macs += size * prim.args[0].shape[-1]
        elif prim.op in ("sum", "rmax"):
            vector += math.prod(prim.args[0].shape)
        elif prim.op == "isqrt":
            vector += size * ISQRT_OPS
        else:
            vector += size
    return macs, vector


def layer_cost(node: ir.Node, info, spec: NpuSpec) -> dict | None:
    """Cost of one node, or None for a pure view (reshape and friends)."""
    op = node.op_type
    if op in _VIEWS:
        return None

    def shape(v):
        return info[v.name][0] if v is not None and v.name in info else ()

    def nbytes(v) -> float:
        if v is None or v.name not in info:
            return 0.0
        s, dt = info[v.name]
        return math.prod(s) * _bits(dt) / 8

    outs = [o for o in node.outputs if o.name in info]
    out_elems = sum(math.prod(shape(o)) for o in outs)
    macs = 0
    a_bits = w_bits = 8
    integer_op = get_op(node.domain, op)
    if op in _MATMULS or op == "ConvInteger":
        a, b = node.inputs[0], node.inputs[1]
        a_bits, w_bits = _bits(info[a.name][1]), _bits(info[b.name][1])
        if op == "ConvInteger":
            w = shape(b)
            macs = out_elems * math.prod(w[1:])
        else:
            macs = out_elems * shape(a)[-1]
    vector_ops = out_elems * _VECTOR_OPS.get(op, 0)
    if integer_op is not None and op not in _MATMULS:
        macs, vector_ops = integer_op_work(node, integer_op, info)
    elif op == "ReduceSum":
        vector_ops = math.prod(shape(node.inputs[0]))
    elif op in ("MaxPool", "AveragePool"):
        kernel = node.attributes.get_ints("kernel_shape", [1])
        vector_ops = out_elems * math.prod(kernel)
    weight_bytes = sum(nbytes(v) for v in node.inputs if v is not None and const_array(v) is not None and _is_weight(node, v))
    if op in _GATHERS and node.inputs and const_array(node.inputs[0]) is not None:
        weight_bytes = sum(nbytes(o) for o in outs)  # a table lookup fetches only the rows it returns
    act_bytes = sum(nbytes(v) for v in node.inputs if v is not None and const_array(v) is None)
    act_bytes += sum(nbytes(o) for o in outs)
    compute = (macs / spec.mac_rate(a_bits, w_bits) if macs else 0.0) + vector_ops / spec.vector_ops_per_cycle
    memory = weight_bytes / spec.dram_bytes_per_cycle + act_bytes / spec.sram_bytes_per_cycle
    cycles = math.ceil(max(compute, memory)) + spec.layer_overhead_cycles
    energy = (
        macs * (spec.mac_energy(a_bits, w_bits) if macs else 0.0)
        + vector_ops * spec.pj_per_vector_op
        + weight_bytes * spec.pj_per_dram_byte
        + act_bytes * spec.pj_per_sram_byte
    )
    entry = {
        "name": node.name,
        "op": op if node.domain in ("", "ai.onnx") else f"{node.domain}.{op}",
        "macs": int(macs),
        "vector_ops": int(vector_ops),
        "weight_bytes": _round(weight_bytes),
        "activation_bytes": _round(act_bytes),
        "bytes_moved": _round(weight_bytes + act_bytes),
        "cycles": int(cycles),
        "bound": "compute" if compute >= memory else "memory",
        "energy_pj": _round(energy),
    }
    if macs:
        entry["precision"] = f"a{a_bits}w{w_bits}"
    return entry


def _is_weight(node: ir.Node, value: ir.Value) -> bool:
    """Constant tensors large enough to live in DRAM (weights, tables), not scalars."""
    array = const_array(value)
    return array is not None and array.size > 1 and (node.domain == QC_DOMAIN or node.op_type in _MATMULS | {"ConvInteger", "Gather", "Add"})


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def estimate_cost(model: ir.Model, spec: NpuSpec | None = None) -> dict:
    """Per-layer and total cycles, bytes moved and energy of ``model`` on the simulated NPU.

    Returns ``{"spec": {...}, "layers": [...], "total": {...}}``; ``total`` has ``cycles``,
    ``latency_ms``, ``macs``, ``bytes_moved``, ``energy_pj`` and ``energy_uj``.
    """
    spec = spec or NpuSpec()
    info = value_info(model)
    layers = [entry for node in model.graph if (entry := layer_cost(node, info, spec)) is not None]
    total_cycles = sum(e["cycles"] for e in layers)
    total_energy = sum(e["energy_pj"] for e in layers)
    total = {
        "layers": len(layers),
        "cycles": total_cycles,
        "latency_ms": _round(total_cycles / spec.clock_hz * 1e3),
        "macs": sum(e["macs"] for e in layers),
        "bytes_moved": _round(sum(e["bytes_moved"] for e in layers)),
        "weight_bytes": _round(sum(e["weight_bytes"] for e in layers)),
        "energy_pj": _round(total_energy),
        "energy_uj": _round(total_energy * 1e-6),
    }
    return {"spec": _spec_dict(spec), "layers": layers, "total": total}


def _spec_dict(spec: NpuSpec) -> dict:
    out = {}
    for field in dataclasses.fields(spec):
        value = getattr(spec, field.name)
        if isinstance(value, tuple):
            value = {f"a{a}w{w}": v for (a, w), v in value}
        out[field.name] = value
    return out
