"""fold-batchnorm: BN after Conv/Gemm/ConvTranspose disappears; outputs unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from builders import cnn_bn, init, make_model, rng, run, tensor, to_ir
from qcompiler.passmanager import PassContext, run_pipeline
from qcompiler.pipeline import Pipeline


def apply(model, spec="fold-batchnorm"):
    return run_pipeline(Pipeline.parse(spec), model, PassContext())


def rel_error(a, b):
    return np.abs(a - b).max() / np.abs(a).max()


def test_folds_conv_batchnorm_pairs():
    model = to_ir(cnn_bn())
    x = rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    before = run(model, {"x": x})["y"]
    apply(model)
    ops = [n.op_type for n in model.graph]
    assert "BatchNormalization" not in ops
    assert ops.count("Conv") == 2
    assert rel_error(before, run(model, {"x": x})["y"]) < 1e-5


def _gemm_bn(trans_b: int, alpha: float, beta: float):
    r = rng(2)
    w = r.standard_normal((6, 4) if trans_b else (4, 6)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w", "c"], ["g"], transB=trans_b, alpha=alpha, beta=beta),
        helper.make_node("BatchNormalization", ["g", "s", "b", "m", "v"], ["y"]),
    ]
    inits = [
        init("w", w), init("c", r.standard_normal(6).astype(np.float32)),
        init("s", r.uniform(0.5, 2, 6).astype(np.float32)), init("b", r.standard_normal(6).astype(np.float32)),
        init("m", r.standard_normal(6).astype(np.float32)), init("v", r.uniform(0.5, 2, 6).astype(np.float32)),
    ]
    return to_ir(make_model(nodes, [tensor("x", [3, 4])], [tensor("y", [3, 6])], inits))


def test_folds_into_gemm_with_alpha_beta_and_transb():
    for trans_b in (0, 1):
        model = _gemm_bn(trans_b, alpha=0.7, beta=1.3)
        x = rng(3).standard_normal((3, 4)).astype(np.float32)
        before = run(model, {"x": x})["y"]
        apply(model)
        assert [n.op_type for n in model.graph] == ["Gemm"]
        assert rel_error(before, run(model, {"x": x})["y"]) < 1e-5


def test_conv_transpose():
    r = rng(4)
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w"], ["c"], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"]),
    ]
    inits = [
        init("w", r.standard_normal((3, 5, 2, 2)).astype(np.float32)),
        init("s", r.uniform(0.5, 2, 5).astype(np.float32)), init("b", r.standard_normal(5).astype(np.float32)),
        init("m", r.standard_normal(5).astype(np.float32)), init("v", r.uniform(0.5, 2, 5).astype(np.float32)),
    ]
    model = to_ir(make_model(nodes, [tensor("x", [1, 3, 4, 4])], [tensor("y", [1, 5, 8, 8])], inits))
    x = r.standard_normal((1, 3, 4, 4)).astype(np.float32)
    before = run(model, {"x": x})["y"]
    apply(model)
    assert [n.op_type for n in model.graph] == ["ConvTranspose"]
    assert rel_error(before, run(model, {"x": x})["y"]) < 1e-5


def test_does_not_fire_when_conv_output_is_shared_or_weights_not_constant():
    r = rng(5)
    # Conv output also read by another node: folding would change that reader.
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"]),
        helper.make_node("Relu", ["c"], ["z"]),
    ]
    inits = [
        init("w", r.standard_normal((2, 2, 1, 1)).astype(np.float32)),
        init("s", np.ones(2, np.float32)), init("b", np.zeros(2, np.float32)),
        init("m", np.zeros(2, np.float32)), init("v", np.ones(2, np.float32)),
    ]
    model = to_ir(make_model(nodes, [tensor("x", [1, 2, 3, 3])], [tensor("y", [1, 2, 3, 3]), tensor("z", [1, 2, 3, 3])], inits))
    apply(model)
    conv = next(n for n in model.graph if n.op_type == "Conv")
    assert conv.inputs[1].name == "w"  # not folded: the weight is the original one
    assert sorted(n.op_type for n in model.graph) == ["Add", "Conv", "Mul", "Relu"]  # the BN as its affine
    # Weight is a graph input, not a constant.
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])]
    model = to_ir(make_model(nodes, [tensor("x", [1, 2, 3, 3]), tensor("w", [2, 2, 1, 1])], [tensor("y", [1, 2, 3, 3])], inits[1:]))
    apply(model)
    assert sorted(n.op_type for n in model.graph) == ["Add", "Conv", "Mul"]


@pytest.mark.parametrize("op,swapped", [("Conv", False), ("ConvTranspose", True)])
def test_bias_added_after_the_conv_then_batchnorm(op, swapped):
    """paddle2onnx writes ``BN(Add(ConvTranspose(x, W), bias(1, C, 1, 1)))``: the bias moves
    into the conv, then the BatchNorm folds; float-exact."""
    r = rng(6)
    c_in, c_out = 3, 4
    w = r.standard_normal((c_out, c_in, 3, 3) if op == "Conv" else (c_in, c_out, 2, 2)).astype(np.float32) * 0.3
    attrs = {"pads": [1, 1, 1, 1]} if op == "Conv" else {"strides": [2, 2]}
    nodes = [helper.make_node(op, ["x", "w"], ["z"], **attrs),
             helper.make_node("Add", ["c", "z"] if swapped else ["z", "c"], ["zb"]),
             helper.make_node("BatchNormalization", ["zb", "g", "b", "m", "v"], ["y"])]
    inits = [init("w", w), init("c", r.standard_normal((1, c_out, 1, 1)).astype(np.float32)),
             init("g", r.uniform(0.5, 1.5, c_out).astype(np.float32)), init("b", r.normal(0, 0.1, c_out).astype(np.float32)),
             init("m", r.normal(0, 0.1, c_out).astype(np.float32)), init("v", r.uniform(0.5, 2, c_out).astype(np.float32))]
    out = [1, c_out, 8, 8] if op == "Conv" else [1, c_out, 16, 16]
    model = to_ir(make_model(nodes, [tensor("x", [1, c_in, 8, 8])], [tensor("y", out)], inits))
    x = r.standard_normal((1, c_in, 8, 8)).astype(np.float32)
    before = run(model, {"x": x})["y"]
    run_pipeline(Pipeline.parse("fold-batchnorm"), model, PassContext())
    assert [n.op_type for n in model.graph] == [op]
    np.testing.assert_allclose(run(model, {"x": x})["y"], before, rtol=1e-5, atol=1e-5)


def relu_then_batchnorm(rank: int = 4):
    """tf2onnx's ``Relu → BatchNormalization``: nothing to fold into."""
    r = rng(9)
    shape = [1, 3, 4, 4][:rank] if rank >= 2 else [1, 3]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("BatchNormalization", ["r", "s", "b", "m", "v"], ["y"], epsilon=1e-3)]
    inits = [init("s", r.uniform(0.5, 2, 3).astype(np.float32)), init("b", r.standard_normal(3).astype(np.float32)),
             init("m", r.standard_normal(3).astype(np.float32)), init("v", r.uniform(0.2, 3, 3).astype(np.float32))]
    return make_model(nodes, [tensor("x", shape)], [tensor("y", shape)], inits), shape


@pytest.mark.parametrize("rank", [2, 4])
def test_a_batchnorm_with_nothing_to_fold_into_becomes_its_affine(rank):
    proto, shape = relu_then_batchnorm(rank)
    model = to_ir(proto)
    apply(model)
    assert [n.op_type for n in model.graph] == ["Relu", "Mul", "Add"]
    for i in range(3):
        feeds = {"x": rng(20 + i).standard_normal(shape).astype(np.float32) * 3}
        np.testing.assert_allclose(run(model, feeds)["y"], run(to_ir(proto), feeds)["y"], rtol=1e-5, atol=1e-5)


def test_a_standalone_batchnorm_is_integer_on_npu_sim(tmp_path):
    import qcompiler

    proto, shape = relu_then_batchnorm()
    calib = {"x": np.stack([rng(i).standard_normal(shape).astype(np.float32) for i in range(8)])}
    result = qcompiler.compile(to_ir(proto), "npu-sim", tmp_path / "out", preset="w8a8", calib=calib)
    assert result.manifest["verified"]["status"] == "bit-exact"
