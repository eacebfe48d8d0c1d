"""LSTM / GRU / RNN unrolled at import (qcompiler/recurrent.py): structure, numerics against
onnxruntime, quantization through the unrolled steps, and the refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import qcompiler
from builders import make_model, rng, tensor
from qcompiler import errors as E
from qcompiler.instruments import sqnr_db
from qcompiler.interpreter import ReferenceInterpreter
from qcompiler.onnx_import import import_proto

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def recurrent_model(op: str, *, steps=5, batch=2, inp=6, hidden=8, direction="forward", layout=0, bias=True,
                    initial=True, peepholes=False, seq_lens=None, seed=0, **attrs) -> onnx.ModelProto:
    """One recurrent node with constant weights; inputs X (and sequence_lens when given)."""
    r = rng(seed)
    dirs = 2 if direction == "bidirectional" else 1
    gates = GATES[op]
    inits = [numpy_helper.from_array((r.standard_normal((dirs, gates * hidden, inp)) * 0.4).astype(np.float32), "W"),
             numpy_helper.from_array((r.standard_normal((dirs, gates * hidden, hidden)) * 0.4).astype(np.float32), "R")]
    names = ["X", "W", "R", "", "", "", "", ""]
    if bias:
        inits.append(numpy_helper.from_array((r.standard_normal((dirs, 2 * gates * hidden)) * 0.2).astype(np.float32), "B"))
        names[3] = "B"
    inputs = [tensor("X", [batch, steps, inp] if layout else [steps, batch, inp])]
    if seq_lens is not None:
        inputs.append(tensor("L", [batch], TensorProto.INT32))
        names[4] = "L"
    state_shape = (batch, dirs, hidden) if layout else (dirs, batch, hidden)
    if initial:
        inits.append(numpy_helper.from_array((r.standard_normal(state_shape) * 0.3).astype(np.float32), "H0"))
        names[5] = "H0"
        if op == "LSTM":
            inits.append(numpy_helper.from_array((r.standard_normal(state_shape) * 0.3).astype(np.float32), "C0"))
            names[6] = "C0"
    if peepholes:
        inits.append(numpy_helper.from_array((r.standard_normal((dirs, 3 * hidden)) * 0.3).astype(np.float32), "P"))
        names[7] = "P"
    count = {"LSTM": 8, "GRU": 6, "RNN": 6}[op]
    names = names[:count]
    while names and names[-1] == "":
        names.pop()
    outs = ["Y", "Y_h", "Y_c"][: 3 if op == "LSTM" else 2]
    node = helper.make_node(op, names, outs, hidden_size=hidden, direction=direction, layout=layout, **attrs)
    y_shape = [batch, steps, dirs, hidden] if layout else [steps, dirs, batch, hidden]
    outputs = [tensor("Y", y_shape)] + [tensor(o, list(state_shape)) for o in outs[1:]]
    return make_model([node], inputs, outputs, inits, opset=14)


CASES = {
    "lstm": ("LSTM", {}),
    "lstm-bidirectional": ("LSTM", {"direction": "bidirectional"}),
    "lstm-reverse-no-bias-no-state": ("LSTM", {"direction": "reverse", "bias": False, "initial": False}),
    "lstm-peepholes-clip": ("LSTM", {"peepholes": True, "clip": 1.5}),
    "lstm-batch-first": ("LSTM", {"layout": 1, "direction": "bidirectional"}),
    "lstm-input-forget": ("LSTM", {"input_forget": 1}),
    "lstm-variable-lengths": ("LSTM", {"direction": "bidirectional", "seq_lens": [5, 3]}),
    "gru": ("GRU", {}),
    "gru-linear-before-reset": ("GRU", {"linear_before_reset": 1, "direction": "bidirectional"}),
    "gru-activations": ("GRU", {"activations": ["HardSigmoid", "Relu"], "activation_alpha": [0.3],
                                "activation_beta": [0.4]}),
    "rnn": ("RNN", {}),
    "rnn-relu-bidirectional": ("RNN", {"activations": ["Relu", "Tanh"], "direction": "bidirectional"}),
}


def _feeds(model: onnx.ModelProto, seed=1):
    r = rng(seed)
    feeds = {}
    for vi in model.graph.input:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if vi.type.tensor_type.elem_type == TensorProto.INT32:
            feeds[vi.name] = np.array([5, 3], np.int32)[: dims[0]]
        else:
            feeds[vi.name] = r.standard_normal(dims).astype(np.float32)
    return feeds


@pytest.mark.parametrize("case", CASES)
def test_unrolled_matches_onnxruntime(case):
    op, kwargs = CASES[case]
    model = recurrent_model(op, **kwargs)
    imported = import_proto(model)
    ops = [n.op_type for n in imported.graph]
    assert op not in ops
    dirs = 2 if kwargs.get("direction") == "bidirectional" else 1
    # one input projection per gate, plus one recurrent product per gate and step (with
    # input_forget the forget gate is 1 − i: its products are dead code); from a zero
    # initial state the first step has none
    gates = GATES[op] - (1 if kwargs.get("input_forget") else 0)
    recurrent_steps = 5 if kwargs.get("initial", True) else 4
    assert ops.count("MatMul") == dirs * gates * (1 + recurrent_steps)
    feeds = _feeds(model)
    if kwargs.get("layout"):  # onnxruntime has no batch-first recurrent kernels: ONNX's own evaluator
        from onnx.reference import ReferenceEvaluator

        want = ReferenceEvaluator(model).run(None, feeds)
    else:
        want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ReferenceInterpreter(imported).run(feeds)
    for (name, value), expected in zip(got.items(), want):
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5, err_msg=name)


def test_graphs_without_recurrent_ops_are_untouched():
    from builders import mlp

    model = mlp()
    assert [n.op_type for n in import_proto(model).graph] == [n.op_type for n in model.graph.node]


def test_dynamic_sequence_length_is_refused_with_the_node():
    model = recurrent_model("LSTM")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "T"
    with pytest.raises(E.ShapeError, match=r"node '.*' \(LSTM\): unrolling needs a static 3-D input shape"):
        import_proto(model, require_static=False)
    # pinned, it unrolls
    assert "LSTM" not in {n.op_type for n in import_proto(model, input_shapes={"X": (5, 2, 6)}).graph}


def test_computed_weights_are_sliced_by_nodes():
    """W as a graph input (as ONNX's own conformance tests pass it): Gather/Slice/Transpose."""
    model = recurrent_model("GRU", bias=False, initial=False)
    w = next(t for t in model.graph.initializer if t.name == "W")
    model.graph.initializer.remove(w)
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(w.dims)))
    imported = import_proto(model)
    assert {"Gather", "Slice", "Transpose"} <= {n.op_type for n in imported.graph}
    feeds = _feeds(model)
    feeds["W"] = numpy_helper.to_array(w)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ReferenceInterpreter(imported).run(feeds)
    np.testing.assert_allclose(got["Y"], want[0], rtol=1e-5, atol=1e-5)


class _Tagger(torch.nn.Module):
    """A small sequence tagger: bidirectional LSTM, then a GRU, then a linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lstm = torch.nn.LSTM(12, 16, bidirectional=True, batch_first=True)
        self.gru = torch.nn.GRU(32, 16, batch_first=True)
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x):
        y, _ = self.lstm(x)
        y, _ = self.gru(y)
        return self.head(y)


@pytest.fixture(scope="module")
def tagger_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("tagger") / "tagger.onnx"
    torch.onnx.export(_Tagger().eval(), (torch.randn(1, 10, 12),), str(path), dynamo=False, opset_version=14,
                      input_names=["x"], output_names=["y"])
    return path


@pytest.mark.slow
@pytest.mark.parametrize("target", ["reference", "host"])
def test_torch_lstm_gru_quantize_and_compile(tagger_onnx, tmp_path, target):
    """A legacy torch export (LSTM and GRU nodes after shape arithmetic) compiles at w8a8,
    integer-only, verified on the target; output SQNR against onnxruntime FP32."""
    r = rng(2)
    calib = {"x": r.standard_normal((16, 1, 10, 12)).astype(np.float32)}
    result = qcompiler.compile(tagger_onnx, target, tmp_path / "out", preset="w8a8", calib=calib)
    assert result.manifest["verified"]["status"] == "bit-exact"
    assert result.manifest["stage"] == "integer"
    x = r.standard_normal((1, 10, 12)).astype(np.float32)
    want = ort.InferenceSession(str(tagger_onnx), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = qcompiler.load(tmp_path / "out").run({"x": x})["y"]
    assert sqnr_db(want, got) > 25.0, sqnr_db(want, got)
