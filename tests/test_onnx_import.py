"""The ONNX importer: real exports import and match onnxruntime; bad files are refused clearly."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from builders import init, make_model, mlp, save, tensor
from qcompiler import errors
from qcompiler.interpreter import ReferenceInterpreter
from qcompiler.onnx_import import load_onnx


def _tokens():
    from qcompiler.examples import minilm

    tokens = minilm.tokenize(["The quick brown fox jumps over the lazy dog.", "Bushfires forced hundreds to leave."])
    return [{k: v[i] for k, v in tokens.items()} for i in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["minilm_legacy", "minilm_dynamo"])
def test_minilm_exports_match_onnxruntime(which, request):
    path = request.getfixturevalue(which)
    model = load_onnx(path)
    assert [v.name for v in model.graph.inputs] == ["input_ids", "attention_mask"]
    interpreter = ReferenceInterpreter(model)
    session = ort.InferenceSession(str(path))
    for feeds in _tokens():
        ours = interpreter.run(feeds)["last_hidden_state"]
        theirs = session.run(None, feeds)[0]
        assert np.abs(ours - theirs).max() < 1e-4


@pytest.mark.slow
def test_dynamo_export_uses_external_data(minilm_dynamo):
    assert (minilm_dynamo.parent / (minilm_dynamo.name + ".data")).is_file()
    proto = onnx.load(str(minilm_dynamo), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)


def test_input_shape_pins_dynamic_dims(tmp_path):
    model = mlp()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    path = save(model, tmp_path / "m.onnx")
    with pytest.raises(errors.ShapeError, match=r"dynamic dimension 0 \('batch'\).*--input-shape x=Nx16"):
        load_onnx(path)
    pinned = load_onnx(path, input_shapes={"x": (3, 16)})
    assert list(pinned.graph.inputs[0].shape) == [3, 16]
    assert list(pinned.graph.outputs[0].shape) == [3, 8]
    with pytest.raises(errors.ShapeError, match="not a model input"):
        load_onnx(path, input_shapes={"nope": (1, 16)})
    with pytest.raises(errors.ShapeError, match="static dimension 1 = 16"):
        load_onnx(path, input_shapes={"x": (1, 15)})


def test_old_opset_is_upgraded(tmp_path):
    nodes = [helper.make_node("Unsqueeze", ["x"], ["y"], axes=[0])]  # attribute form (opset < 13)
    path = save(make_model(nodes, [tensor("x", [3])], [tensor("y", [1, 3])], opset=11), tmp_path / "old.onnx")
    model = load_onnx(path)
    assert model.graph.opset_imports[""] == 13
    x = np.arange(3, dtype=np.float32)
    np.testing.assert_array_equal(ReferenceInterpreter(model).run({"x": x})["y"], x[None])


def test_nodes_out_of_order_are_sorted(tmp_path):
    nodes = [helper.make_node("Neg", ["a"], ["y"]), helper.make_node("Relu", ["x"], ["a"])]
    model = load_onnx(save(make_model(nodes, [tensor("x", [2])], [tensor("y", [2])]), tmp_path / "m.onnx"))
    assert [n.op_type for n in model.graph] == ["Relu", "Neg"]


@pytest.mark.parametrize(
    "make, error, fragment",
    [
        (lambda p: p.write_bytes(b""), errors.ModelFormatError, "file is empty"),
        (lambda p: p.write_bytes(b"\x12\x34not a model at all" * 10), errors.ModelFormatError, "not a valid ONNX protobuf"),
        (lambda p: p.write_bytes(mlp().SerializeToString()[:200]), errors.ModelFormatError, "at byte"),
        (lambda p: p.write_bytes(helper.make_node("Relu", ["x"], ["y"]).SerializeToString()), errors.ModelFormatError, "not an ONNX model"),
    ],
)
def test_malformed_files(tmp_path, make, error, fragment):
    path = tmp_path / "bad.onnx"
    make(path)
    with pytest.raises(error, match=fragment):
        load_onnx(path)


def test_unsupported_op_names_node_and_op(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="ok"), helper.make_node("NonMaxSuppression", ["a", "a"], ["y"], name="nms_1")]
    path = save(make_model(nodes, [tensor("x", [1, 4, 4])], [tensor("y", [1, 3], TensorProto.INT64)]), tmp_path / "m.onnx")
    with pytest.raises(errors.UnsupportedOpError, match="node 'nms_1': op type NonMaxSuppression is not supported"):
        load_onnx(path)


def _external_model(tmp_path, location: str):
    model = mlp()
    tensor_proto = model.graph.initializer[0]
    data = tensor_proto.raw_data or onnx.numpy_helper.to_array(tensor_proto).tobytes()
    tensor_proto.ClearField("raw_data")
    tensor_proto.ClearField("float_data")
    tensor_proto.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        entry = tensor_proto.external_data.add()
        entry.key, entry.value = key, value
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "m.onnx"
    onnx.save(model, str(path))
    return path, data


def test_external_data_inside_folder_loads(tmp_path):
    path, data = _external_model(tmp_path, "weights.bin")
    (path.parent / "weights.bin").write_bytes(data)
    load_onnx(path)


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin", "link.bin"])
def test_external_data_outside_folder_is_refused(tmp_path, location):
    path, data = _external_model(tmp_path, location)
    (tmp_path / "secret.bin").write_bytes(data)
    os.symlink(tmp_path / "secret.bin", path.parent / "link.bin")
    with pytest.raises(errors.UnsafeModelError, match="outside the model's folder|absolute path"):
        load_onnx(path)


def test_missing_external_data_file(tmp_path):
    path, _ = _external_model(tmp_path, "gone.bin")
    with pytest.raises(errors.ModelFormatError, match="'gone.bin': file not found"):
        load_onnx(path)


def test_nan_weights_are_reported_at_import(tmp_path):
    model = mlp()
    w = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[0, 0] = np.nan
    model.graph.initializer[0].CopyFrom(init("w1", w))
    with pytest.raises(errors.NumericsError, match="initializer 'w1'.*node 'fc1' \\(MatMul\\).*1 NaN"):
        load_onnx(save(model, tmp_path / "nan.onnx"))


def test_masks_with_infinity_are_fine(tmp_path):
    nodes = [helper.make_node("Add", ["x", "mask"], ["y"])]
    inits = [init("mask", np.array([0, -np.inf], np.float32))]
    load_onnx(save(make_model(nodes, [tensor("x", [2])], [tensor("y", [2])], inits), tmp_path / "m.onnx"))
