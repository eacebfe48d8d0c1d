"""Constant folding (onnxscript's folder) with qcompiler's policy.

- Quantize/Dequantize nodes are never folded: folding a DequantizeLinear of a quantized
  weight would silently turn it back into a float weight.
- Only default-domain ops are evaluated (integer ops keep their nodes).
- A ``ConstantOfShape`` is folded when it makes a small tensor (the folder keeps every one
  by default, to keep models small): exporters build pads, shapes and masks from them, and
  the shape computations after them only fold once they are constants.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_common
import onnxscript.optimizer

from .graph import const_array

NEVER_FOLD = frozenset({("", "QuantizeLinear"), ("", "DequantizeLinear"), ("", "DynamicQuantizeLinear")})
#: Largest ConstantOfShape output (elements) that is folded into a constant.
SMALL_FILL = 4096


def _should_fold(node: ir.Node) -> bool | None:
    domain = "" if node.domain == "ai.onnx" else node.domain
    if (domain, node.op_type) in NEVER_FOLD or domain != "":
        return False
    if node.op_type == "ConstantOfShape":
        shape = const_array(node.inputs[0]) if node.inputs else None
        if shape is not None and np.all(shape >= 0) and int(np.prod(shape)) <= SMALL_FILL:  # [] makes a scalar
            return True
    return None


def fold_constants(model: ir.Model, max_elements: int) -> bool:
    """Evaluate nodes whose inputs are all constant (tensors up to ``max_elements``), inline
    the branch of every ``If`` whose condition is then constant, drop what became unused and
    lift Constant nodes to initializers. Returns whether the model changed."""
    log = logging.getLogger("onnxscript.optimizer")  # it warns for each node it cannot evaluate
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        result = onnxscript.optimizer.fold_constants(
            model, input_size_limit=max_elements, output_size_limit=max_elements, should_fold=_should_fold
        )
    finally:
        log.setLevel(level)
    removed = ir_common.RemoveUnusedNodesPass()(model).modified
    lifted = ir_common.LiftConstantsToInitializersPass(size_limit=0)(model).modified
    return bool(result.modified or removed or lifted)
