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
