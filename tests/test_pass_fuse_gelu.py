"""fuse-gelu: decomposed erf/tanh GELU subgraphs become one Gelu node, float-exact."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import helper

from builders import init, make_model, rng, run, tensor, to_ir
from qcompiler.instruments import NumericCheck
from qcompiler.passmanager import PassContext, run_pipeline
from qcompiler.pipeline import Pipeline

SQRT2 = math.sqrt(2.0)


def _mul(a, b, out, swap=False):
    return helper.make_node("Mul", [b, a] if swap else [a, b], [out])


def erf_gelu(scaled_by="div", half="outer", swap=False, c=SQRT2):
    """x · ½ · (1 + erf(x/√2)) the way exporters write it."""
    nodes = [
        helper.make_node("Div", ["x", "c"], ["t"]) if scaled_by == "div" else _mul("x", "c", "t", swap),
        helper.make_node("Erf", ["t"], ["e"]),
        helper.make_node("Add", ["one", "e"] if swap else ["e", "one"], ["p"]),
    ]
    if half == "outer":  # torch legacy exporter: (x·p)·½
        nodes += [_mul("x", "p", "xp", swap), _mul("xp", "half", "y", swap)]
    elif half == "x":  # HF: x·½ first
        nodes += [_mul("x", "half", "xh", swap), _mul("xh", "p", "y", swap)]
    elif half == "p":
        nodes += [_mul("p", "half", "ph", swap), _mul("x", "ph", "y", swap)]
    else:  # (x·p)/2
        nodes += [_mul("x", "p", "xp", swap), helper.make_node("Div", ["xp", "two"], ["y"])]
    consts = {"c": c if scaled_by == "div" else 1.0 / c, "one": 1.0, "half": 0.5, "two": 2.0}
    return nodes, consts


def tanh_gelu(cube="pow", swap=False):
    """x · ½ · (1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
    if cube == "pow":
        nodes = [helper.make_node("Pow", ["x", "three"], ["x3"])]
    else:
        nodes = [_mul("x", "x", "x2"), _mul("x", "x2", "x3", swap)]
    nodes += [
        _mul("x3", "k", "kx3", swap),
        helper.make_node("Add", ["kx3", "x"] if swap else ["x", "kx3"], ["inner"]),
        _mul("inner", "r", "arg", swap),
        helper.make_node("Tanh", ["arg"], ["th"]),
        helper.make_node("Add", ["th", "one"], ["p"]),
        _mul("x", "half", "xh", swap),
        _mul("xh", "p", "y"),
    ]
    consts = {"three": 3.0, "k": 0.044715, "r": math.sqrt(2.0 / math.pi), "one": 1.0, "half": 0.5}
    return nodes, consts


def build(nodes, consts, extra_outputs=()):
    used = {i for n in nodes for i in n.input}
    inits = [init(k, np.array(v, np.float32)) for k, v in consts.items() if k in used]
    outputs = [tensor("y", [2, 64])] + [tensor(o, [2, 64]) for o in extra_outputs]
    return to_ir(make_model(nodes, [tensor("x", [2, 64])], outputs, inits, opset=17))


def fuse(model):
    ctx = PassContext(instruments=[NumericCheck(tolerance=1e-5)])
    run_pipeline(Pipeline.parse("fuse-gelu"), model, ctx)
    return ctx


def check_fused(model, approximate):
    x = (rng(1).standard_normal((2, 64)) * 3).astype(np.float32)
    before = run(model, {"x": x})["y"]
    ctx = fuse(model)
    ops = [n.op_type for n in model.graph]
    assert ops == ["Gelu"], ops
    assert model.graph[0].attributes["approximate"].as_string() == approximate
    assert model.graph.opset_imports[""] >= 20
    after = run(model, {"x": x})["y"]
    assert np.abs(before - after).max() <= 1e-5 * np.abs(before).max()
    assert ctx.report["numeric_check"][0]["max_relative_error"] <= 1e-5
    return ctx


@pytest.mark.parametrize("scaled_by", ["div", "mul"])
@pytest.mark.parametrize("half", ["outer", "x", "p", "div2"])
@pytest.mark.parametrize("swap", [False, True])
def test_erf_variants_fuse_exactly(scaled_by, half, swap):
    ctx = check_fused(build(*erf_gelu(scaled_by, half, swap)), "none")
    assert ctx.report["fuse_gelu"] == {"erf": 1, "tanh": 0}


@pytest.mark.parametrize("cube", ["pow", "mul"])
@pytest.mark.parametrize("swap", [False, True])
def test_tanh_variants_fuse_exactly(cube, swap):
    ctx = check_fused(build(*tanh_gelu(cube, swap)), "tanh")
    assert ctx.report["fuse_gelu"] == {"erf": 0, "tanh": 1}


def test_gelu_between_matmuls_fuses_and_keeps_the_rest():
    r = rng(2)
    nodes, consts = erf_gelu()
    nodes = [helper.make_node("MatMul", ["a", "w1"], ["x"])] + nodes + [helper.make_node("MatMul", ["y", "w2"], ["z"])]
    inits = [init(k, np.array(v, np.float32)) for k, v in consts.items() if k != "two"]
    inits += [init("w1", r.standard_normal((8, 16)).astype(np.float32)), init("w2", r.standard_normal((16, 4)).astype(np.float32))]
    model = to_ir(make_model(nodes, [tensor("a", [3, 8])], [tensor("z", [3, 4])], inits, opset=17))
    a = r.standard_normal((3, 8)).astype(np.float32)
    before = run(model, {"a": a})["z"]
    fuse(model)
    assert [n.op_type for n in model.graph] == ["MatMul", "Gelu", "MatMul"]
    assert np.abs(before - run(model, {"a": a})["z"]).max() <= 1e-5 * np.abs(before).max()


def test_does_not_fire_on_wrong_constants_or_shared_intermediates():
    # √3 instead of √2: a different function; the opset is not upgraded for nothing.
    model = build(*erf_gelu(c=math.sqrt(3.0)))
    ctx = fuse(model)
    assert "Gelu" not in [n.op_type for n in model.graph]
    assert model.graph.opset_imports[""] == 17
    assert not ctx.results[-1].changed
    # 1 + erf(·) is also a graph output: removing it would change the model.
    model = build(*erf_gelu(), extra_outputs=("p",))
    fuse(model)
    assert "Gelu" not in [n.op_type for n in model.graph]
    # A tanh GELU with the wrong cubic coefficient.
    nodes, consts = tanh_gelu()
    consts["k"] = 0.05
    model = build(nodes, consts)
    fuse(model)
    assert "Gelu" not in [n.op_type for n in model.graph]


def test_idempotent():
    model = build(*erf_gelu())
    ctx = PassContext()
    run_pipeline(Pipeline.parse("fuse-gelu,fuse-gelu"), model, ctx)
    assert [r.changed for r in ctx.results] == [True, False]
