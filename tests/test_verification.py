"""Every build is run against the reference interpreter before qcompile reports success."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import qcompiler
import target_models as tm
from builders import mlp, save
from qcompiler.pipeline import Pipeline, parse_one
from qcompiler.target import default_targets
from qcompiler.verification import VerificationError, island_quantizes


def build(spec, model, out, **kwargs):
    return qcompiler.compile_model(model, parse_one(spec, default_targets()), out, pipeline=Pipeline([]), **kwargs)


@pytest.mark.parametrize("spec", ["reference", "host", "npu-sim", "fpga-sim"])
def test_integer_builds_are_verified_bit_exact(spec, tmp_path):
    result = build(spec, tm.attention_block("ibert"), tmp_path / "out")
    verified = result.manifest["verified"]
    assert verified == {"status": "bit-exact", "samples": 2, "inputs": "generated"}
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["verified"] == verified


def test_float_builds_are_verified_within_tolerance(tmp_path):
    model = qcompiler.load_onnx(save(mlp(), tmp_path / "m.onnx"))
    verified = build("host", model, tmp_path / "out").manifest["verified"]
    assert verified["status"] in ("bit-exact", "float-within-tolerance"), verified


def test_a_wrong_kernel_fails_the_build_with_a_reproducer(tmp_path, monkeypatch):
    """A lowering that is off by one is caught: exit 1 (a bug), nothing written, a reproducer."""
    from qcompiler.opset import QC_DOMAIN
    from qcompiler.targets.tvm_bridge import lowering
    from qcompiler.targets.tvm_bridge.integer_render import render_integer_op

    def off_by_one(lo, node):
        from qcompiler.integer import get_op

        (y,) = render_integer_op(lo, node, get_op(QC_DOMAIN, "Requantize"))
        return lo.emit(lo.R.add(y, lo.relax.const(np.ones(1, lo.dtype(y)), lo.dtype(y))))

    monkeypatch.setitem(lowering.LOWERINGS, (QC_DOMAIN, "Requantize"), off_by_one)
    with pytest.raises(VerificationError, match=r"the host build disagrees with the reference interpreter: output") as info:
        build("host", tm.quantized_mlp(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    folder = Path(str(info.value).rsplit("reproducer saved in ", 1)[1])
    assert {"model.onnx", "inputs_0.npz", "expected_0.npz", "got_0.npz", "README.md", "artifact"} <= {p.name for p in folder.iterdir()}
    assert VerificationError.exit_code == 1


def test_no_verify_records_that_it_did_not_run(tmp_path):
    verified = build("host", tm.quantized_mlp(), tmp_path / "out", verify=False).manifest["verified"]
    assert verified["status"] == "not-run"


@pytest.mark.slow
def test_cli_reports_verification_and_no_verify(cli, tmp_path):
    path = save(mlp(), tmp_path / "m.onnx")
    result = cli(path, "-t", "host", "-o", tmp_path / "a", "--preset", "float")
    assert result.returncode == 0, result.stderr
    assert "verified" in result.stdout and "generated input" in result.stdout
    result = cli(path, "-t", "reference", "-o", tmp_path / "b", "--preset", "float", "--no-verify")
    assert result.returncode == 0 and "not verified: verification was turned off" in result.stdout


def test_island_quantizes_are_those_reading_float_results():
    model = tm.attention_block("ibert")
    assert island_quantizes(model) == []  # integer graph: only the input boundary quantizes
