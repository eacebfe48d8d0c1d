"""What the integer lowering's handlers share: quantized-tensor descriptions, the node
builder, and the refusal that keeps a node in float."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompiler.graph import NameFactory, add_initializer


@dataclasses.dataclass
class QT:
    """A quantized tensor in the integer graph: ``x ≈ (value − zero) · scale``."""

    value: ir.Value
    scale: np.ndarray  # scalar, or 1-D per channel (weights only)
    zero: np.ndarray
    axis: int | None = None

    @property
    def dtype(self) -> np.dtype:
        return np.asarray(self.zero).dtype

    @property
    def s(self) -> float:
        return float(np.asarray(self.scale).reshape(-1)[0])

    @property
    def z(self) -> int:
        return int(np.asarray(self.zero).reshape(-1)[0])

    def same_params(self, other: QT) -> bool:
        return self.dtype == other.dtype and self.s == other.s and self.z == other.z


class Builder:
    """Creates integer nodes and constants before ``anchor`` with typed outputs."""

    def __init__(self, model: ir.Model):
        self.graph = model.graph
        self.names = NameFactory(model.graph)
        self.anchor: ir.Node | None = None

    def const(self, base: str, array) -> ir.Value:
        return add_initializer(self.graph, self.names(base), np.asarray(array))

    def node(self, op: str, inputs, attrs=None, *, dtype, shape, domain: str = "", base: str = "") -> ir.Value:
        node = ir.node(op, inputs, attrs or {}, domain=domain, name=self.names(f"{base or op}_{op}"))
        out = node.outputs[0]
        out.name = self.names(f"{base or op}_{op.lower()}")
        out.dtype = ir.DataType.from_numpy(np.dtype(dtype))
        out.shape = ir.Shape(shape) if shape is not None else None
        self.graph.insert_before(self.anchor, node)
        return out


def shape_of(value: ir.Value):
    return list(value.shape) if value.shape is not None else None



class Refuse(Exception):
    """This node stays in float; the message says why."""
