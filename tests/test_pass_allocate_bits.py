"""allocate-bits: measured sensitivity, Theorem 8 ranking, budgets, int16 discovery."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from builders import init, make_model, rng, run, tensor, to_ir
from qcompiler.calibdata import CalibrationData, input_specs
from qcompiler.errors import PipelineError
from qcompiler.instruments import sqnr_db
from qcompiler.passmanager import PassContext, run_pipeline
from qcompiler.pipeline import Pipeline


def deep_mlp():
    """Four layers; the last one is small and sensitive (large weights feed the output directly)."""
    r = rng(3)
    sizes = [32, 64, 64, 64, 8]
    nodes, inits, prev = [], [], "x"
    for i in range(4):
        w = (r.standard_normal((sizes[i], sizes[i + 1])) / np.sqrt(sizes[i])).astype(np.float32)
        inits.append(init(f"w{i}", w))
        out = "y" if i == 3 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}" if i < 3 else out], name=f"fc{i}"))
        if i < 3:
            nodes.append(helper.make_node("Relu", [f"m{i}"], [out], name=f"relu{i}"))
        prev = out
    return make_model(nodes, [tensor("x", [1, 32])], [tensor("y", [1, 8])], inits)


def calibrated(model, outlier=False):
    samples = []
    for i in range(24):
        x = rng(i).standard_normal((1, 32)).astype(np.float32)
        if outlier and i == 0:
            x[0, 5] = 200.0
        samples.append({"x": x})
    return PassContext(calibration=CalibrationData.from_samples(samples).bind(input_specs(model)))


def test_budget_is_met_and_sensitivity_ranks_layers():
    model = to_ir(deep_mlp())
    ctx = calibrated(model)
    feeds = {"x": rng(100).standard_normal((1, 32)).astype(np.float32)}
    float_y = run(model, feeds)["y"]
    run_pipeline(Pipeline.parse("insert-fake-quant,allocate-bits{budget=6.0,act_noise_ratio=-1.0,weight_method=mse}"), model, ctx)
    report = ctx.report["mixed_precision"]
    assert report["average_weight_bits"] <= 6.0
    bits = {w["node"]: w["bits"] for w in report["weights"]}
    assert sorted(bits.values()) in ([4, 4, 8, 8], [4, 4, 4, 8])
    theorem = {w["node"]: w["theorem8_bits"] for w in report["weights"]}
    low = [n for n, b in bits.items() if b == 4]
    high = [n for n, b in bits.items() if b == 8]
    assert max(theorem[n] for n in low) <= min(theorem[n] for n in high)  # the closed form ranks them
    int4 = [n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].dtype.name == "INT4"]
    assert len(int4) == len(low)
    assert sqnr_db(float_y, run(model, feeds)["y"]) > 15
    assert report["final_sqnr_db"] < report["start_sqnr_db"] + 1  # fewer bits cost accuracy


def test_gptq_beats_plain_rounding_at_4_bits():
    results = {}
    for method in ("mse", "gptq"):
        model = to_ir(deep_mlp())
        ctx = calibrated(model)
        run_pipeline(Pipeline.parse(f"insert-fake-quant,allocate-bits{{budget=4.0,act_noise_ratio=-1.0,weight_method={method}}}"), model, ctx)
        results[method] = ctx.report["mixed_precision"]["final_sqnr_db"]
    assert results["gptq"] > results["mse"]


def test_outlier_activation_gets_16_bits():
    model = to_ir(deep_mlp())
    ctx = calibrated(model, outlier=True)
    run_pipeline(Pipeline.parse("insert-fake-quant{method=minmax},allocate-bits{budget=8.0,act_noise_ratio=0.5}"), model, ctx)
    wide = [r["tensor"] for r in ctx.report["mixed_precision"]["int16_activations"]]
    assert "x" in wide
    formats = {n.inputs[0].name: n.outputs[0].dtype.name for n in model.graph if n.op_type == "QuantizeLinear"}
    assert formats["x"] == "INT16"


def test_budget_8_changes_no_weights_and_option_checks():
    model = to_ir(deep_mlp())
    ctx = calibrated(model)
    run_pipeline(Pipeline.parse("insert-fake-quant,allocate-bits{budget=8.0,act_noise_ratio=-1.0}"), model, ctx)
    assert all(w["bits"] == 8 for w in ctx.report["mixed_precision"]["weights"])
    with pytest.raises(PipelineError, match="between 4 and 8"):
        Pipeline.parse("allocate-bits{budget=3.0}")
    with pytest.raises(PipelineError, match="works on the fakequant stage"):
        run_pipeline(Pipeline.parse("allocate-bits"), to_ir(deep_mlp()), calibrated(model))


def biased_mlp():
    """Two MatMul+bias layers fed by inputs with a large mean: 4-bit weight error shifts the output mean."""
    r = rng(7)
    w0 = (r.standard_normal((32, 48)) / np.sqrt(32)).astype(np.float32)
    w1 = (r.standard_normal((48, 8)) / np.sqrt(48)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["m0"], name="fc0"),
        helper.make_node("Add", ["m0", "b0"], ["h0"], name="bias0"),
        helper.make_node("MatMul", ["h0", "w1"], ["m1"], name="fc1"),
        helper.make_node("Add", ["m1", "b1"], ["y"], name="bias1"),
    ]
    inits = [init("w0", w0), init("b0", np.full(48, 0.5, np.float32)), init("w1", w1), init("b1", np.zeros(8, np.float32))]
    return make_model(nodes, [tensor("x", [1, 32])], [tensor("y", [1, 8])], inits)


def test_bias_correction_removes_the_mean_output_shift_of_4_bit_layers():
    shifted = [{"x": (rng(i).standard_normal((1, 32)) + 2.0).astype(np.float32)} for i in range(200, 264)]
    errors, reports = {}, {}
    for flag in ("true", "false"):
        model = to_ir(biased_mlp())
        ctx = calibrated(model)
        ctx.calibration = CalibrationData.from_samples(shifted[:32]).bind(input_specs(model))
        reference = to_ir(biased_mlp())
        spec = f"insert-fake-quant{{activations=int16:per-tensor:asym}},allocate-bits{{budget=4.0,act_noise_ratio=-1.0,weight_method=mse,bias_correction={flag}}}"
        run_pipeline(Pipeline.parse(spec), model, ctx)
        diff = np.stack([run(model, f)["y"] - run(reference, f)["y"] for f in shifted[32:]])
        errors[flag] = float(np.abs(diff.mean(axis=0)).mean())  # mean shift of each output, averaged
        reports[flag] = ctx.report["mixed_precision"]
    assert sorted(reports["true"]["bias_corrected"]) == ["fc0", "fc1"]
    assert "bias_corrected" not in reports["false"]
    assert errors["true"] < 0.5 * errors["false"], errors


def test_valid_mask_leaves_padded_positions_out_of_the_metric():
    from qcompiler.passes.mixed_precision import _Evaluator

    evaluator = _Evaluator.__new__(_Evaluator)
    evaluator.mask_input = "mask"
    sample = {"mask": np.array([[1, 1, 0]])}
    hidden = np.arange(6).reshape(1, 3, 2)  # (batch, position, channel): position 2 is padding
    pooled = np.array([[7.0, 8.0]])  # no position axis: kept whole
    assert evaluator._select([hidden, pooled], sample).tolist() == [0, 1, 2, 3, 7.0, 8.0]
    evaluator.mask_input = None
    assert len(evaluator._select([hidden, pooled], sample)) == 8


def test_valid_mask_must_name_a_model_input():
    model = to_ir(deep_mlp())
    with pytest.raises(Exception, match="valid_mask names 'attention_mask', which is not a model input"):
        run_pipeline(Pipeline.parse("insert-fake-quant,allocate-bits{valid_mask=attention_mask}"), model, calibrated(model))


def test_the_emulator_runs_the_qdq_model_as_onnxruntime_does_for_every_bit_width():
    """allocate-bits measures through one emulation session (quantization parameters as inputs):
    it must compute what onnxruntime computes on the QDQ model itself, before and after a change."""
    import onnx_ir as ir
    import onnxruntime as ort

    from qcompiler import qstate
    from qcompiler.passes.fake_quant import Assignment
    from qcompiler.passes.mixed_precision import _ActivationGroup
    from qcompiler.qdq_emulation import QDQEmulator

    from qcompiler.graph import ensure_opset

    model = to_ir(deep_mlp())
    run_pipeline(Pipeline.parse("insert-fake-quant"), model, calibrated(model))
    ensure_opset(model, 21)  # int16 activations
    emulator = QDQEmulator(model)
    feeds = {"x": rng(5).standard_normal((1, 32)).astype(np.float32)}

    def ort_run():
        return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)

    np.testing.assert_allclose(emulator.run(feeds)[0], ort_run()[0], rtol=1e-6, atol=1e-6)
    plan = qstate.activation_plan(model)
    q = next(n for n in model.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name in plan)
    group = _ActivationGroup(q.inputs[0].name, [q], Assignment.from_json(q.inputs[0].name, plan[q.inputs[0].name]))
    group.set_bits(16)  # the same emulation session sees the new parameters
    np.testing.assert_allclose(emulator.run(feeds)[0], ort_run()[0], rtol=1e-6, atol=1e-6)
