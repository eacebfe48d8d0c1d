"""The qcompile command-line contract."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

import qcompiler
from builders import cnn_bn, make_model, mlp, save, tensor


def assert_user_error(result, fragment: str):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("qcompile: error:")
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_help_and_lists(cli):
    assert cli("--help").returncode == 0
    passes = cli("--list-passes")
    assert passes.returncode == 0
    for name in ("fold-constants", "quantize-weights", "weights-int8", "float"):
        assert name in passes.stdout
    targets = cli("--list-targets")
    assert targets.returncode == 0 and "reference" in targets.stdout


def test_compile_and_run_reference(cli, tmp_path):
    model = save(cnn_bn(), tmp_path / "cnn.onnx")
    out = tmp_path / "out"
    result = cli(model, "--target", "reference", "-o", out, "--report")
    assert result.returncode == 0, result.stderr
    assert "weights-int8" in result.stdout  # says which default it used, in one line
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "reference"
    assert manifest["pipeline"].endswith("quantize-weights")
    assert manifest["inputs"] == [{"name": "x", "shape": [1, 3, 8, 8], "dtype": "float32"}]
    assert set(manifest["files"]) == {"model.onnx", "model.qdq.onnx", "report.json", "report.html"}
    assert "onnx" in manifest["versions"]
    report = json.loads((out / "report.json").read_text())
    assert len(report["weights"]) == 3
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    y = qcompiler.load(out).run({"x": x})["y"]
    assert y.shape == (1, 5)


def test_same_inputs_give_identical_artifacts(cli, tmp_path):
    model = save(mlp(), tmp_path / "m.onnx")
    for name in ("a", "b"):
        assert cli(model, "--target", "reference", "-o", tmp_path / name, "--preset", "float").returncode == 0
    for name in ("manifest.json", "model.onnx"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_pipeline_and_diagnostics(cli, tmp_path):
    model = save(cnn_bn(), tmp_path / "cnn.onnx")
    result = cli(model, "-t", "reference", "-o", tmp_path / "o", "--pipeline", "fold-batchnorm,quantize-weights{format=int4:per-group:2}",
                 "--time-passes", "--verify-each", "--check-numerics")
    assert result.returncode == 0, result.stderr
    assert "total" in result.stdout and "numeric check: fold-batchnorm: max_relative_error=" in result.stdout
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["pipeline"] == "fold-batchnorm,quantize-weights{format=int4:per-group:2}"


def test_input_shape_flag(cli, tmp_path):
    proto = mlp()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    model = save(proto, tmp_path / "m.onnx")
    assert_user_error(cli(model, "-t", "reference", "-o", tmp_path / "o"), "--input-shape x=Nx16")
    assert not (tmp_path / "o").exists()
    assert cli(model, "-t", "reference", "-o", tmp_path / "o", "--input-shape", "x=4x16").returncode == 0


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--target", "refrence"], "unknown target 'refrence'; did you mean 'reference'?"),
        (["--target", "reference", "--pipeline", "fold-constans"], "unknown pass 'fold-constans'; did you mean 'fold-constants'?"),
        (["--target", "reference", "--pipeline", "quantize-weights{format=int8"], "expected '}'"),
        (["--target", "reference", "--preset", "w9a9"], "unknown preset 'w9a9'"),
        (["--target", "reference", "--calib", "missing.npz", "--preset", "float"], "no such file"),
        (["--target", "reference", "--input-shape", "x"], "expected NAME=DIMS"),
    ],
)
def test_bad_options(cli, tmp_path, args, fragment):
    model = save(mlp(), tmp_path / "m.onnx")
    result = cli(model, "-o", tmp_path / "out", *args)
    assert_user_error(result, fragment)
    assert not (tmp_path / "out").exists()


def test_bad_models(cli, tmp_path):
    truncated = tmp_path / "trunc.onnx"
    truncated.write_bytes(mlp().SerializeToString()[:150])
    assert_user_error(cli(truncated, "-t", "reference", "-o", tmp_path / "o1"), "at byte")
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Det", ["a"], ["y"], name="the_det")]
    unsupported = save(make_model(nodes, [tensor("x", [2, 2])], [tensor("y", [])]), tmp_path / "u.onnx")
    assert_user_error(cli(unsupported, "-t", "reference", "-o", tmp_path / "o2"), "node 'the_det': op type Det is not supported")
    assert_user_error(cli(tmp_path / "nope.onnx", "-t", "reference", "-o", tmp_path / "o3"), "no such file")
    assert_user_error(cli(tmp_path / "w.pt", "-t", "reference", "-o", tmp_path / "o4"), "pickle")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
    assert not list(tmp_path.glob(".o*"))  # no temporary siblings left either


def test_output_folder_rules(cli, tmp_path):
    model = save(mlp(), tmp_path / "m.onnx")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert_user_error(cli(model, "-t", "reference", "-o", out), "not empty (use --force")
    assert (out / "keep.txt").exists()
    assert cli(model, "-t", "reference", "-o", out, "--force").returncode == 0
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()
    file_out = tmp_path / "file"
    file_out.write_text("x")
    assert_user_error(cli(model, "-t", "reference", "-o", file_out), "not a folder")


def test_missing_arguments(cli, tmp_path):
    assert_user_error(cli(), "no model given")
    assert_user_error(cli(save(mlp(), tmp_path / "m.onnx")), "no --target")
    assert_user_error(cli("--bogus-flag"), "unrecognized arguments")


def test_calibration_mismatch(cli, tmp_path):
    model = save(mlp(), tmp_path / "m.onnx")
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 16), np.float32))  # missing the batch axis
    result = cli(model, "-t", "reference", "-o", tmp_path / "o", "--calib", tmp_path / "bad.npz", "--preset", "float")
    assert_user_error(result, "expected Nx1x16")


def test_internal_error_is_one_line_with_hint(tmp_path, monkeypatch, capsys):
    from qcompiler import cli as cli_module
    from qcompiler.passes.cleanup import EliminateDeadCode

    def crash(self, model, ctx):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(EliminateDeadCode, "run", crash)
    model = save(mlp(), tmp_path / "m.onnx")
    status = cli_module.main([model, "-t", "reference", "-o", str(tmp_path / "o"), "--reproducer-dir", str(tmp_path / "repro")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1
    assert "internal error: pass 'eliminate-dead-code' failed: RuntimeError: simulated bug" in err[0]
    assert "--debug" in err[0] and str(tmp_path / "repro") in err[0]
    assert (tmp_path / "repro" / "pipeline.txt").read_text().strip().endswith("eliminate-dead-code")
    assert not (tmp_path / "o").exists()
    with pytest.raises(Exception, match="simulated bug"):
        cli_module.main([model, "-t", "reference", "-o", str(tmp_path / "o"), "--debug"])


def test_warnings_go_to_stderr_and_the_report(cli, tmp_path):
    """A wide int16 × int8 product: the compile succeeds, warns once on stderr, records it in report.json."""
    k = 512
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="wide")], [tensor("x", [1, k])], [tensor("y", [1, 4])],
                       [helper.make_tensor("w", onnx.TensorProto.FLOAT, [k, 4], np.full(k * 4, 0.5, np.float32))])
    model = save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((8, 1, k)).astype(np.float32))
    out = tmp_path / "out"
    result = cli(model, "-t", "reference", "-o", out, "--calib", tmp_path / "calib.npz", "--report",
                 "--pipeline", "insert-fake-quant{activations=int16:per-tensor:asym},lower-integer")
    assert result.returncode == 0, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("qcompile: warning: lower-integer: 1 of 1 integer products could overflow") and "node 'wide' (MatMul)" in line
    assert json.loads((out / "report.json").read_text())["warnings"] == [line.removeprefix("qcompile: warning: ")]
