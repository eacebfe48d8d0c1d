"""A third-party pass registers through the entry point exactly like the built-ins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import helper

from builders import make_model, save, tensor

#: Slow lane: installs the example plugin and runs the CLI in subprocesses.
pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).parent / "plugin_example"


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    """Install the example plugin into a private folder (no network, no build isolation)."""
    target = tmp_path_factory.mktemp("plugin-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(EXAMPLE)],
        check=True, capture_output=True, timeout=300,
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]))
    return env


def test_list_passes_shows_the_plugin(cli, plugin_env):
    result = cli("--list-passes", env=plugin_env)
    assert result.returncode == 0, result.stderr
    assert "merge-transposes: Merge chains of Transpose nodes into one (or none)." in result.stdout
    assert "max_sweeps=8" in result.stdout
    assert "merge-transposes" not in cli("--list-passes").stdout  # not installed in the main env


def test_plugin_pass_runs_in_a_pipeline(cli, plugin_env, tmp_path):
    nodes = [
        helper.make_node("Transpose", ["x"], ["a"], perm=[1, 2, 0]),
        helper.make_node("Transpose", ["a"], ["b"], perm=[2, 0, 1]),  # undoes the first
        helper.make_node("Transpose", ["b"], ["c"], perm=[0, 2, 1]),
        helper.make_node("Transpose", ["c"], ["d"], perm=[1, 0, 2]),
        helper.make_node("Relu", ["d"], ["y"]),
    ]
    model = save(make_model(nodes, [tensor("x", [2, 3, 4])], [tensor("y", [4, 2, 3])]), tmp_path / "t.onnx")
    out = tmp_path / "out"
    result = cli(model, "-t", "reference", "-o", out, "--pipeline", "merge-transposes,remove-identity", "--check-numerics", env=plugin_env)
    assert result.returncode == 0, result.stderr
    import onnx

    ops = [n.op_type for n in onnx.load(out / "model.onnx").graph.node]
    assert ops == ["Transpose", "Relu"]
    assert "merge-transposes: max_relative_error=0" in result.stdout
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    import qcompiler

    expected = np.maximum(x.transpose(0, 2, 1).transpose(1, 0, 2), 0)  # the first two cancel
    np.testing.assert_array_equal(qcompiler.load(out).run({"x": x})["y"], expected)


def _absdiff_model(path):
    """A one-node integer-stage model of the plugin's IntAbsDiff (built without the plugin)."""
    import onnx
    from onnx import numpy_helper

    nodes = [helper.make_node("IntAbsDiff", ["a", "za", "b", "zb", "zy"], ["y"], name="absdiff",
                              domain="qcompiler_plugin_example", multiplier=1288490189, shift=31)]
    inits = [numpy_helper.from_array(np.asarray(v, dtype), n) for n, v, dtype in
             (("za", 3, np.int8), ("zb", -2, np.int8), ("zy", 0, np.uint8))]
    graph = helper.make_graph(nodes, "g", [tensor("a", [2, 8], onnx.TensorProto.INT8), tensor("b", [1, 8], onnx.TensorProto.INT8)],
                              [tensor("y", [2, 8], onnx.TensorProto.UINT8)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("qcompiler_plugin_example", 1)])
    model.ir_version = 10
    helper.set_model_props(model, {"qcompiler.stage": "integer"})
    return save(model, path)


@pytest.mark.parametrize("target", ["reference", "host", "fpga-sim", "npu-sim"])
def test_a_plugin_integer_op_reaches_every_target(cli, plugin_env, tmp_path, target):
    """The plugin defines IntAbsDiff in one file (schema + decomposition); with no other
    code it compiles for each target and the build is verified bit-exact against the
    reference interpreter (which runs the decomposition)."""
    model = _absdiff_model(tmp_path / "absdiff.onnx")
    out = tmp_path / "out"
    result = cli(model, "-t", target, "-o", out, "--pipeline", "eliminate-dead-code", "--verify-samples", "3", env=plugin_env)
    assert result.returncode == 0, result.stderr
    assert "verified bit-exact on 3 generated inputs" in result.stdout
    refused = cli(model, "-t", target, "-o", tmp_path / "no-plugin", "--pipeline", "eliminate-dead-code")
    assert refused.returncode == 2
    assert "qcompiler_plugin_example" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_a_plugin_target_builds_and_is_verified(cli, plugin_env, tmp_path):
    listing = cli("--list-targets", env=plugin_env)
    assert "x86-64-v2: Portable x86-64" in listing.stdout and "threads=0" in listing.stdout
    model = save(make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", [2, 3])], [tensor("y", [2, 3])]), tmp_path / "r.onnx")
    out = tmp_path / "out"
    result = cli(model, "-t", "x86-64-v2{threads=1}", "-o", out, "--preset", "float", env=plugin_env)
    assert result.returncode == 0, result.stderr
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target_spec"] == "x86-64-v2{threads=1}"
    assert manifest["target_info"]["tvm_target"]["mcpu"] == "x86-64-v2"
    assert manifest["verified"]["status"] == "bit-exact"
