"""Pass context and instruments: timing, IR dumps, verification, numeric check,
provenance, reproducers, analysis caching, stage checks."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from builders import cnn_bn, mlp, to_ir
from qcompiler import instruments as inst
from qcompiler.errors import PassFailure, PipelineError, QCompilerError
from qcompiler.graph import CREATED_BY_KEY
from qcompiler.passmanager import Analysis, PassContext, run_pipeline
from qcompiler.pipeline import Pass, Pipeline


@dataclass(frozen=True)
class ScaleOutput(Pass):
    """Claims to be float-equivalent but multiplies the output by 1.01 (a buggy pass)."""

    name = "scale-output"

    def run(self, model, ctx):
        graph = model.graph
        out = graph.outputs[0]
        factor = ir.Value(name="factor", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT),
                          const_value=ir.tensor(np.array(1.01, np.float32), name="factor"))
        graph.register_initializer(factor)
        name = out.name
        mul = ir.node("Mul", [out, factor], name="scale")
        new_out = mul.outputs[0]
        out.name = "before_scale"
        new_out.name = name
        new_out.dtype, new_out.shape = out.dtype, out.shape
        graph.append(mul)
        graph.outputs[0] = new_out
        return True


@dataclass(frozen=True)
class BreakGraph(Pass):
    """Leaves a node reading a value nobody defines."""

    name = "break-graph"

    def run(self, model, ctx):
        ghost = ir.Value(name="ghost", shape=ir.Shape([1, 8]), type=ir.TensorType(ir.DataType.FLOAT))
        node = next(iter(model.graph))
        node.replace_input_with(0, ghost)
        return True


@dataclass(frozen=True)
class Crash(Pass):
    """Raises, like a buggy pass."""

    name = "crash"

    def run(self, model, ctx):
        raise ZeroDivisionError("boom")


@dataclass(frozen=True)
class CountNodes(Analysis):
    name = "count-nodes"

    def compute(self, model, ctx):
        CountNodes.calls += 1
        return sum(1 for _ in model.graph)


CountNodes.calls = 0


def test_timing_and_print_ir():
    model = to_ir(cnn_bn())
    timing = inst.Timing()
    stream = io.StringIO()
    run_pipeline(Pipeline.parse("fold-batchnorm,eliminate-dead-code"), model,
                 PassContext(instruments=[timing, inst.PrintIRAfterChange(stream)]))
    assert [name for name, _, _ in timing.rows] == ["fold-batchnorm", "eliminate-dead-code"]
    assert "fold-batchnorm" in timing.table() and "total" in timing.table()
    assert stream.getvalue().count("IR after") == 1  # only the pass that changed something
    assert "Conv" in stream.getvalue()


def test_numeric_check_reports_error_and_sqnr():
    model = to_ir(cnn_bn())
    ctx = PassContext(instruments=[inst.NumericCheck()])
    run_pipeline(Pipeline.parse("fold-batchnorm,quantize-weights"), model, ctx)
    fold, quant = ctx.report["numeric_check"]
    assert fold["max_relative_error"] < 1e-5
    assert "max_relative_error" not in quant and 20 < quant["sqnr_db"] < 80


def test_numeric_check_catches_a_pass_that_is_not_equivalent():
    model = to_ir(mlp())
    with pytest.raises(inst.NumericCheckFailed, match="scale-output.*tolerance"):
        run_pipeline([ScaleOutput()], model, PassContext(instruments=[inst.NumericCheck()]))


def test_verify_each_names_the_pass():
    model = to_ir(mlp())
    with pytest.raises(QCompilerError, match="after pass 'break-graph'.*ghost"):
        run_pipeline([BreakGraph()], model, PassContext(instruments=[inst.VerifyEach()]))


def test_provenance_tags_new_nodes():
    model = to_ir(mlp())
    run_pipeline(Pipeline.parse("quantize-weights"), model, PassContext(instruments=inst.default_instruments()))
    tags = {n.op_type: n.metadata_props.get(CREATED_BY_KEY) for n in model.graph}
    assert tags["DequantizeLinear"] == "quantize-weights"
    assert tags["MatMul"] is None


def test_reproducer_saved_on_crash(tmp_path: Path):
    model = to_ir(mlp())
    repro = tmp_path / "repro"
    with pytest.raises(PassFailure) as info:
        run_pipeline([Pipeline.parse("remove-identity").passes[0], Crash()], model,
                     PassContext(instruments=[inst.Reproducer(repro)]))
    assert info.value.reproducer == str(repro)
    assert "ZeroDivisionError: boom" in str(info.value)
    assert (repro / "pipeline.txt").read_text().strip() == "remove-identity,crash"
    assert "ZeroDivisionError" in (repro / "error.txt").read_text()
    onnx.checker.check_model(onnx.load(repro / "model.onnx"))


def test_analyses_are_cached_until_the_model_changes():
    model = to_ir(cnn_bn())
    ctx = PassContext()
    CountNodes.calls = 0
    first = ctx.analysis(CountNodes(), model)
    assert ctx.analysis(CountNodes(), model) == first and CountNodes.calls == 1
    run_pipeline(Pipeline.parse("eliminate-dead-code"), model, ctx)  # no change: cache kept
    ctx.analysis(CountNodes(), model)
    assert CountNodes.calls == 1
    run_pipeline(Pipeline.parse("fold-batchnorm"), model, ctx)  # changed: recomputed
    assert ctx.analysis(CountNodes(), model) == first - 2 and CountNodes.calls == 2


def test_stage_mismatch_is_a_clear_error():
    @dataclass(frozen=True)
    class FloatOnly(Pass):
        name = "float-only"
        stages = ("float",)

        def run(self, model, ctx):
            return False

    model = to_ir(mlp())
    run_pipeline(Pipeline.parse("quantize-weights"), model, PassContext())
    with pytest.raises(PipelineError, match="works on the float stage.*fakequant"):
        run_pipeline([FloatOnly()], model, PassContext())
