"""Quantization state travels with the model: any saved stage compiles again.

A w8a8 build writes ``model.qdq.onnx`` (the fake-quant model, with the activation plan in
its metadata) and ``model.qdq.float.onnx`` (its float reference). Compiling the QDQ model
again runs the passes that apply to its stage; a pipeline whose passes need something
missing, or meet the model at the wrong stage, is refused before anything runs (exit 2).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from builders import mlp, save

#: Slow lane: compiles through the CLI in subprocesses.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def qdq_build(tmp_path_factory):
    from conftest import run_cli

    root = tmp_path_factory.mktemp("stages")
    model = save(mlp(), root / "mlp.onnx")
    calib = root / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).normal(size=(16, 1, 16)).astype(np.float32))
    result = run_cli(model, "-t", "reference", "-o", root / "w8a8", "--calib", calib, "--preset", "w8a8")
    assert result.returncode == 0, result.stderr
    return root, calib


def test_a_w8a8_build_saves_its_fake_quant_stage_with_what_later_passes_need(qdq_build):
    root, _ = qdq_build
    qdq = onnx.load(root / "w8a8" / "model.qdq.onnx")
    props = {p.key: p.value for p in qdq.metadata_props}
    assert props["qcompiler.stage"] == "fakequant"
    assert props["qcompiler.float_reference"] == "model.qdq.float.onnx"
    plan = json.loads(props["qcompiler.activation_plan"])
    assert plan and all({"group", "format", "ranges"} <= set(entry) for entry in plan.values())
    float_model = onnx.load(root / "w8a8" / "model.qdq.float.onnx")
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in float_model.graph.node)


def test_the_qdq_model_lowers_again(cli, qdq_build, tmp_path):
    root, _ = qdq_build
    out = tmp_path / "npu"
    result = cli(root / "w8a8" / "model.qdq.onnx", "-t", "npu-sim", "-o", out, "--pipeline", "lower-integer")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "manifest.json").read_text())["stage"] == "integer"


def test_a_preset_runs_the_passes_that_apply_to_a_later_stage(cli, qdq_build, tmp_path):
    root, _ = qdq_build
    result = cli(root / "w8a8" / "model.qdq.onnx", "-t", "host", "-o", tmp_path / "host")
    assert result.returncode == 0, result.stderr
    assert "the model is at the fakequant stage: running" in result.stdout and "lower-integer" in result.stdout
    assert "verified bit-exact" in result.stdout


def test_allocate_bits_runs_on_the_saved_stage(cli, qdq_build, tmp_path):
    root, calib = qdq_build
    out = tmp_path / "mixed"
    result = cli(root / "w8a8" / "model.qdq.onnx", "-t", "reference", "-o", out, "--calib", calib,
                 "--pipeline", "allocate-bits{budget=6}", "--report")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["mixed_precision"]["average_weight_bits"] <= 6.0


def test_a_missing_float_reference_names_the_pass_that_provides_it(cli, qdq_build, tmp_path):
    root, calib = qdq_build
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "model.qdq.onnx").write_bytes((root / "w8a8" / "model.qdq.onnx").read_bytes())
    result = cli(alone / "model.qdq.onnx", "-t", "reference", "-o", tmp_path / "o", "--calib", calib,
                 "--pipeline", "allocate-bits{budget=6}")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "qcompile: error: pass 'allocate-bits' needs the float reference model, which 'insert-fake-quant' provides: "
        "run it earlier in the pipeline, or compile a fake-quant model saved with it (model.qdq.onnx with "
        "model.qdq.float.onnx beside it)"
    )
    assert not (tmp_path / "o").exists()


def test_a_misordered_pipeline_is_refused_before_it_runs(cli, tmp_path):
    model = save(mlp(), tmp_path / "m.onnx")
    result = cli(model, "-t", "reference", "-o", tmp_path / "o", "--pipeline", "lower-integer,insert-fake-quant")
    assert result.returncode == 2
    assert "pass 'lower-integer' works on the fakequant stage, but the model is at the float stage" in result.stderr
    result = cli(model, "-t", "reference", "-o", tmp_path / "o", "--pipeline", "fold-constants,allocate-bits")
    assert result.returncode == 2 and "pass 'allocate-bits' works on the fakequant stage" in result.stderr


def test_a_foreign_qdq_model_is_detected_as_fake_quant(tmp_path):
    import qcompiler
    from qcompiler.graph import get_stage

    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         onnx.helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
        [onnx.numpy_helper.from_array(np.float32(0.1), "s"), onnx.numpy_helper.from_array(np.int8(0), "z")],
    ), opset_imports=[onnx.helper.make_opsetid("", 21)])
    assert get_stage(qcompiler.load_onnx(model)) == "fakequant"


def test_insert_fake_quant_plans_what_the_target_takes(cli, qdq_build, tmp_path):
    """npu-sim takes per-tensor/per-channel symmetric weights: a per-group request is planned
    per-channel (with a warning) instead of being refused after the fact."""
    root, calib = qdq_build
    result = cli(root / "mlp.onnx", "-t", "npu-sim", "-o", tmp_path / "npu", "--calib", calib,
                 "--pipeline", "insert-fake-quant{weights=int4:per-group:8},lower-integer")
    assert result.returncode == 0, result.stderr
    assert "target 'npu-sim' takes weights as int4:per-channel instead of int4:per-group:8" in result.stderr


def test_stop_stage_keeps_the_fake_quant_model(cli, qdq_build, tmp_path):
    root, calib = qdq_build
    out = tmp_path / "fq"
    result = cli(root / "mlp.onnx", "-t", "reference", "-o", out, "--calib", calib, "--preset", "w8a8", "--stop-stage", "fakequant")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "manifest.json").read_text())["stage"] == "fakequant"
    assert (out / "model.qdq.onnx").exists() and (out / "model.qdq.float.onnx").exists()
    again = cli(out / "model.qdq.onnx", "-t", "reference", "-o", tmp_path / "x", "--stop-stage", "float")
    assert again.returncode == 2 and "already at the fakequant stage, past --stop-stage float" in again.stderr
