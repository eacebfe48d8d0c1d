"""ONNX's own conformance suite (``onnx.backend.test``) on importer + reference interpreter.

Every ONNX node test whose graph uses only ops that qcompiler declares supported
(``qcompiler.opset.SUPPORTED_OPS``) runs through ``import_proto`` and the reference
interpreter and must match ONNX's expected outputs. Exclusions are listed with reasons.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import onnx
import onnx.backend.base
import onnx.backend.test
from onnx.backend.test.loader import load_model_tests

from qcompiler.interpreter import ReferenceInterpreter
from qcompiler.onnx_import import import_proto
from qcompiler.integer import is_supported

#: Node tests excluded although their ops are supported: test-name regex -> reason.
EXCLUDED = {
    r"test_training_dropout.*": "qcompiler compiles for inference: Dropout is the identity even with training_mode=True",
    r"test_scan_sum": "an opset-8 Scan (batch axis, sequence_lens input): ONNX's version converter has no "
    "rule for Scan 8 → 9, so the importer refuses it",
}


def _op_types(graph: onnx.GraphProto):
    for node in graph.node:
        yield node.domain, node.op_type
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _op_types(attr.g)
            for sub in attr.graphs:
                yield from _op_types(sub)


def _tensor_io(graph: onnx.GraphProto) -> bool:
    return all(vi.type.HasField("tensor_type") for vi in list(graph.input) + list(graph.output))


def declared_node_tests() -> list[str]:
    """Names of the ONNX node tests built only from supported ops on tensor values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = load_model_tests(kind="node")
    return sorted(
        case.name
        for case in cases
        if case.model is not None
        and _tensor_io(case.model.graph)
        and all(is_supported(d, op) for d, op in _op_types(case.model.graph))
    )


class QcompilerRep(onnx.backend.base.BackendRep):
    def __init__(self, model: onnx.ModelProto):
        self.interpreter = ReferenceInterpreter(import_proto(model, require_static=False, source="conformance test"))
        self.input_names = self.interpreter.input_names

    def run(self, inputs, **kwargs):
        if isinstance(inputs, dict):
            feeds = dict(inputs)
        else:
            feeds = dict(zip(self.input_names, inputs))
        feeds = {k: np.asarray(v) for k, v in feeds.items()}
        outputs = self.interpreter.run(feeds)
        return [outputs[name] for name in self.interpreter.output_names]


class QcompilerBackend(onnx.backend.base.Backend):
    @classmethod
    def prepare(cls, model, device="CPU", **kwargs):
        super().prepare(model, device, **kwargs)
        return QcompilerRep(model)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"


_names = declared_node_tests()
backend_test = onnx.backend.test.BackendTest(QcompilerBackend, __name__)
backend_test.include("^(" + "|".join(re.escape(n) for n in _names) + ")_cpu$")
for pattern in EXCLUDED:
    backend_test.exclude(pattern)
_selected = {f"{name}_cpu" for name in _names}
# Keep only the selected node tests, so the report counts what qcompiler claims.
OnnxBackendNodeModelTest = backend_test.test_cases["OnnxBackendNodeModelTest"]
for _attr in [a for a in vars(OnnxBackendNodeModelTest) if a.startswith("test_") and a not in _selected]:
    delattr(OnnxBackendNodeModelTest, _attr)


def test_declared_ops_have_conformance_tests():
    """Every declared default-domain op is exercised by at least one ONNX node test."""
    from qcompiler.opset import SUPPORTED_OPS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = load_model_tests(kind="node")
    covered = {op for case in cases if case.name in set(_names) for _, op in _op_types(case.model.graph)}
    untested = sorted(SUPPORTED_OPS[""] - covered)
    assert untested == [], f"declared ops without a conformance test: {untested}"
