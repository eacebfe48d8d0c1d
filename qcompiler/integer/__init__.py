"""Integer ops defined once: a schema and a decomposition into integer primitives per op.

* :mod:`.expr` — the primitives and the builder of their DAGs (with value intervals);
* :mod:`.registry` — :class:`IntegerOp`, :func:`integer_op`, the op registry (plugins
  add ops through the ``qcompiler.integer_ops`` entry-point group);
* :mod:`.numpy_backend` — the numpy rendering: the reference semantics;
* :mod:`.arith` — fixed-point constants and exact integer helpers;
* :mod:`.ops` — the built-in ops (``Requantize``, ``IntAdd``, ``IntMul``, ``IntLookup``,
  ``IntMatMul``, ``IntSoftmax``, ``IntGELU``, ``IntLayerNorm``, ...).

Targets render the same decompositions (Relax for the TVM targets, C for fpga-sim)
and the cost models count their primitives, so a new op is one file.
"""

from .arith import channel_view, exact_int_matmul, fixed_point, fixed_point_array, int_range, isqrt, rshift_round, signed_bits
from .expr import Builder, DecompositionError, Expr, count_ops, reachable
from .registry import (
    ACC_TYPES, ANY_INT, ENTRY_POINT_GROUP, Q_TYPES, Attribute, Example, Input, IntegerOp, Output, TensorInfo, get_op, integer_op,
    is_supported, is_supported_domain, reference_kernels, registered_ops,
)
from . import ops  # noqa: E402,F401 - registers the built-in ops

__all__ = [
    "ACC_TYPES", "ANY_INT", "ENTRY_POINT_GROUP", "Q_TYPES", "Attribute", "Builder", "Example", "DecompositionError", "Expr", "Input",
    "IntegerOp", "Output", "TensorInfo", "channel_view", "count_ops", "exact_int_matmul", "fixed_point", "fixed_point_array",
    "get_op", "int_range", "is_supported", "is_supported_domain", "integer_op", "isqrt", "reachable", "reference_kernels", "registered_ops", "rshift_round",
    "signed_bits",
]
