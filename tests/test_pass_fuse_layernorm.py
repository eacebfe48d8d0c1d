"""fuse-layernorm: decomposed LayerNorm subgraphs (paddle2onnx, tf2onnx, old torch exports)
become one LayerNormalization node, float-exact, and then lower to IntLayerNorm."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from builders import init, make_model, rng, run, tensor, to_ir
from qcompiler.passmanager import PassContext, run_pipeline
from qcompiler.pipeline import Pipeline

C = 16


def decomposed(form="div", square="pow", scale=True, shift=True, axes_as="input", axis=-1, swap=False, opset=18):
    """x → LayerNorm over ``axis`` the way exporters write it, then a MatMul reading it."""
    def mean(src, out):
        if axes_as == "input":
            return helper.make_node("ReduceMean", [src, "axes"], [out], keepdims=1)
        return helper.make_node("ReduceMean", [src], [out], axes=[axis], keepdims=1)

    nodes = [mean("x", "m"), helper.make_node("Sub", ["x", "m"], ["d"])]
    nodes.append(helper.make_node("Pow", ["d", "two"], ["sq"]) if square == "pow" else helper.make_node("Mul", ["d", "d"], ["sq"]))
    nodes += [mean("sq", "var"), helper.make_node("Add", ["eps", "var"] if swap else ["var", "eps"], ["ve"]),
              helper.make_node("Sqrt", ["ve"], ["root"])]
    if form == "div":
        nodes.append(helper.make_node("Div", ["d", "root"], ["n"]))
    else:
        nodes += [helper.make_node("Reciprocal", ["root"], ["inv"]),
                  helper.make_node("Mul", ["inv", "d"] if swap else ["d", "inv"], ["n"])]
    last = "n"
    if scale:
        nodes.append(helper.make_node("Mul", ["gamma", last] if swap else [last, "gamma"], ["g"]))
        last = "g"
    if shift:
        nodes.append(helper.make_node("Add", ["beta", last] if swap else [last, "beta"], ["b"]))
        last = "b"
    nodes.append(helper.make_node("MatMul", [last, "w"], ["y"]))
    r = rng(1)
    inits = [init("two", np.array(2.0, np.float32)), init("eps", np.array(1e-5, np.float32)),
             init("gamma", r.uniform(0.5, 1.5, C).astype(np.float32)), init("beta", r.normal(0, 0.2, C).astype(np.float32)),
             init("w", r.normal(0, 0.3, (C, 8)).astype(np.float32))]
    if axes_as == "input":
        inits.append(init("axes", np.array([axis], np.int64)))
    return make_model(nodes, [tensor("x", [2, 5, C])], [tensor("y", [2, 5, 8])], inits, opset=opset)


FORMS = {
    "div-pow-affine": {},
    "mul-reciprocal-swapped": {"form": "mul", "swap": True},
    "square-as-mul": {"square": "mul"},
    "no-shift": {"shift": False},
    "no-affine": {"scale": False, "shift": False},
    "axes-attribute-opset13": {"axes_as": "attribute", "opset": 13},
}


@pytest.mark.parametrize("form", FORMS)
def test_every_exported_form_fuses_float_exactly(form):
    model = to_ir(decomposed(**FORMS[form]))
    x = (rng(2).standard_normal((2, 5, C)) * 3 + 1).astype(np.float32)
    before = run(model, {"x": x})["y"]
    ctx = PassContext()
    run_pipeline(Pipeline.parse("fold-constants,fuse-layernorm"), model, ctx)
    ops = [n.op_type for n in model.graph]
    assert ops == ["LayerNormalization", "MatMul"], ops
    assert ctx.report["fuse_layernorm"] == 1
    after = run(model, {"x": x})["y"]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())


def test_other_means_are_left_alone():
    """A normalisation over a non-last axis is not a LayerNorm over the last axis."""
    model = to_ir(decomposed(axis=1))
    run_pipeline(Pipeline.parse("fold-constants,fuse-layernorm"), model, PassContext())
    assert "LayerNormalization" not in [n.op_type for n in model.graph]


@pytest.mark.slow
def test_fused_layernorm_lowers_to_integer(tmp_path):
    import qcompiler

    calib = {"x": (rng(3).standard_normal((16, 2, 5, C)) * 3 + 1).astype(np.float32)}
    result = qcompiler.compile(decomposed(), "npu-sim", tmp_path / "out", preset="w8a8", calib=calib)
    assert result.manifest["verified"]["status"] == "bit-exact"
    assert not result.context.report["integer_lowering"]["kept_float"]
