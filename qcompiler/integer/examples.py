"""One-node integer-stage models built from an op's :meth:`~IntegerOp.examples`.

What the op × target coverage test compiles for every integer target, and what a
plugin author runs to see a new op on every target::

    model, feeds = example_model(MyOp, MyOp.examples(np.random.default_rng(0))[0])
    qcompiler.compile_model(qcompiler.load_onnx(model), ..., pipeline=Pipeline([]))
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph import STAGE_KEY
from ..opset import QC_DOMAIN_VERSION
from .registry import Example, IntegerOp


def example_model(op: type[IntegerOp], example: Example, opset: int = 21) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``(model, feeds)``: one ``op`` node; constant inputs (and ``example.weights``) as
    initializers, the rest as graph inputs fed with the example's arrays. The outputs'
    shapes and types are the reference's."""
    inputs, inits, names, feeds = [], [], [], {}
    for index, (spec, array) in enumerate(zip(op.inputs, example.inputs)):
        if array is None:
            names.append("")
            continue
        array = np.asarray(array)
        name = spec.name
        names.append(name)
        if spec.constant or index in example.weights:
            inits.append(numpy_helper.from_array(array, name))
        else:
            inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape)))
            feeds[name] = array
    while names and names[-1] == "":
        names.pop()
    results = op.evaluate(list(example.inputs), **example.attrs)
    outputs = [
        helper.make_tensor_value_info(spec.name, helper.np_dtype_to_tensor_dtype(r.dtype), list(r.shape))
        for spec, r in zip(op.outputs, results)
    ]
    node = helper.make_node(op.op_type, names, [o.name for o in outputs], name=f"{op.op_type}_example", domain=op.domain,
                            **example.attrs)
    graph = helper.make_graph([node], f"{op.op_type}_example", inputs, outputs, inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(op.domain, QC_DOMAIN_VERSION)],
        producer_name="qcompiler",
    )
    model.ir_version = 10
    helper.set_model_props(model, {STAGE_KEY: "integer"})
    return model, feeds
