"""Small ONNX models built with onnx.helper for unit tests (deterministic weights)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import qcompiler

OPSET = 17


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def make_model(nodes, inputs, outputs, initializers=(), opset: int = OPSET, name: str = "test") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="qcompiler-tests")
    model.ir_version = 8
    return model


def tensor(name: str, shape, dtype=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def mlp(seed: int = 0, din: int = 16, hidden: int = 32, dout: int = 8) -> onnx.ModelProto:
    """x[1,din] → MatMul → Add → Relu → MatMul → Add → y[1,dout]."""
    r = rng(seed)
    inits = [
        init("w1", r.standard_normal((din, hidden)).astype(np.float32) * 0.3),
        init("b1", r.standard_normal(hidden).astype(np.float32) * 0.1),
        init("w2", r.standard_normal((hidden, dout)).astype(np.float32) * 0.3),
        init("b2", r.standard_normal(dout).astype(np.float32) * 0.1),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"], name="fc2"),
        helper.make_node("Add", ["h3", "b2"], ["y"], name="fc2_bias"),
    ]
    return make_model(nodes, [tensor("x", [1, din])], [tensor("y", [1, dout])], inits)


def cnn_bn(seed: int = 0) -> onnx.ModelProto:
    """Conv → BN → Relu → Conv(no bias) → BN → GlobalAveragePool → Flatten → Gemm(transB) → BN1d-free."""
    r = rng(seed)

    def bn_params(prefix: str, c: int):
        return [
            init(f"{prefix}_gamma", r.uniform(0.5, 1.5, c).astype(np.float32)),
            init(f"{prefix}_beta", r.standard_normal(c).astype(np.float32) * 0.1),
            init(f"{prefix}_mean", r.standard_normal(c).astype(np.float32) * 0.1),
            init(f"{prefix}_var", r.uniform(0.5, 2.0, c).astype(np.float32)),
        ]

    inits = [
        init("c1_w", r.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3),
        init("c1_b", r.standard_normal(4).astype(np.float32) * 0.1),
        *bn_params("bn1", 4),
        init("c2_w", r.standard_normal((6, 4, 3, 3)).astype(np.float32) * 0.3),
        *bn_params("bn2", 6),
        init("fc_w", r.standard_normal((5, 6)).astype(np.float32) * 0.3),
        init("fc_b", r.standard_normal(5).astype(np.float32) * 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c1_w", "c1_b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn1_gamma", "bn1_beta", "bn1_mean", "bn1_var"], ["n1"], name="bn1", epsilon=1e-3),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2_w"], ["c2"], name="conv2", strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c2", "bn2_gamma", "bn2_beta", "bn2_mean", "bn2_var"], ["n2"], name="bn2"),
        helper.make_node("GlobalAveragePool", ["n2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    return make_model(nodes, [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 5])], inits)


def to_ir(proto: onnx.ModelProto, **kwargs):
    return qcompiler.onnx_import.import_proto(proto, **kwargs)


def save(proto: onnx.ModelProto, path) -> str:
    onnx.save(proto, str(path))
    return str(path)


def run(model, feeds):
    return qcompiler.ReferenceInterpreter(model).run(feeds)
