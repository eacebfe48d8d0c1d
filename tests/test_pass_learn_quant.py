"""learn-quant: activation ranges, weight clipping, rounding and equivalent transforms learned
end to end, written back as the fake-quant model's constants."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx import helper

from builders import cnn_bn, init, make_model, mlp, rng, run, tensor, to_ir
from qcompiler import qstate
from qcompiler.calibdata import CalibrationData, input_specs
from qcompiler.errors import PipelineError, UnsupportedOpError
from qcompiler.graph import const_array
from qcompiler.instruments import sqnr_db
from qcompiler.passes.learning import Learner, _TorchFolder
from qcompiler.passes.equalize import apply_scale
from qcompiler.passmanager import PassContext, run_pipeline
from qcompiler.pipeline import Pipeline
from qcompiler.torch_graph import TorchGraph

f32 = np.float32
QUANTIZE = "insert-fake-quant{weights=int4:per-channel,weight_method=gptq}"


def pre_ln_block(seed: int = 0) -> ir.Model:
    """x → LayerNorm (outlier γ channels) → MatMul+bias → Relu → MatMul → + x: the pairs
    norm → linear and linear → (Relu) → linear are exact equivalent-transform pairs."""
    r = rng(seed)
    gamma = np.ones(16, f32)
    gamma[[3, 11]] = 12.0
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, name="norm"),
        helper.make_node("MatMul", ["h", "w1"], ["a0"], name="up"),
        helper.make_node("Add", ["a0", "b1"], ["a1"], name="up_bias"),
        helper.make_node("Relu", ["a1"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "w2"], ["d"], name="down"),
        helper.make_node("Add", ["d", "x"], ["y"], name="residual"),
    ]
    inits = [init("gamma", gamma), init("beta", r.standard_normal(16).astype(f32) * 0.1),
             init("w1", r.standard_normal((16, 32)).astype(f32) * 0.25), init("b1", r.standard_normal(32).astype(f32) * 0.1),
             init("w2", r.standard_normal((32, 16)).astype(f32) * 0.25)]
    return to_ir(make_model(nodes, [tensor("x", [1, 8, 16])], [tensor("y", [1, 8, 16])], inits))


def samples_for(model, n, seed=0, scale=1.0):
    specs = input_specs(model)
    return [{s.name: (rng(seed + i).standard_normal(s.shape) * scale).astype(f32) for s in specs} for i in range(n)]


def fake_quant(model, n=16, spec=QUANTIZE):
    ctx = PassContext(calibration=CalibrationData.from_samples(samples_for(model, n)).bind(input_specs(model)))
    run_pipeline(Pipeline.parse(spec), model, ctx)
    return ctx


def learn(model, ctx, options="steps=60"):
    run_pipeline(Pipeline.parse(f"learn-quant{{{options}}}"), model, ctx)
    return ctx.report.get("learning")


def output_sqnr(model, float_model, feeds_list) -> float:
    ref = np.concatenate([run(float_model, f)[float_model.graph.outputs[0].name].ravel() for f in feeds_list])
    got = np.concatenate([run(model, f)[model.graph.outputs[0].name].ravel() for f in feeds_list])
    return sqnr_db(ref, got)


def constants(model) -> dict[str, bytes]:
    return {name: np.asarray(const_array(v)).tobytes() for name, v in model.graph.initializers.items()}


# -- the torch executor ----------------------------------------------------------------------


@pytest.mark.parametrize("build", [lambda: to_ir(mlp()), lambda: to_ir(cnn_bn()), pre_ln_block])
def test_torch_graph_computes_what_the_reference_interpreter_computes(build):
    model = build()
    feeds = samples_for(model, 1, seed=7)[0]
    with torch.no_grad():
        got = TorchGraph(model)(feeds)
    for name, want in run(model, feeds).items():
        np.testing.assert_allclose(got[name].numpy(), want, rtol=1e-5, atol=1e-5)
    fake_quant(model)
    with torch.no_grad():
        got = TorchGraph(model)(feeds)
    for name, want in run(model, feeds).items():
        # same fake-quant arithmetic; a rounding tie decided differently moves one step at most
        step = np.abs(np.diff(np.unique(want))).min() if want.size > 1 else 1.0
        assert np.mean(np.abs(got[name].numpy() - want) > 1e-5) < 0.05
        assert np.abs(got[name].numpy() - want).max() <= 2 * step + 1e-5


def test_torch_graph_refuses_an_op_it_cannot_differentiate_by_name():
    model = ir.from_proto(make_model([helper.make_node("Det", ["x"], ["y"], name="determinant")],
                                     [tensor("x", [3, 3])], [tensor("y", [])]))
    with pytest.raises(UnsupportedOpError, match="determinant.*Det.*no differentiable form"):
        TorchGraph(model)


# -- the rewrite -------------------------------------------------------------------------------


def test_learning_keeps_the_structure_and_changes_only_constants():
    model = pre_ln_block()
    ctx = fake_quant(model)
    before = collections.Counter(n.op_type for n in model.graph)
    report = learn(model, ctx)
    assert collections.Counter(n.op_type for n in model.graph) == before
    assert report["steps"] == 60 and report["kept"]
    assert report["transform_pairs"] >= 2  # norm → up, up → (Relu) → down
    assert report["clipped_weights"] == 2
    assert report["activation_ranges"] >= 3
    assert len(report["curve"]) == 60
    assert qstate.model_facts(model) >= {"float-reference", "activation-plan"}


def test_the_activation_plan_follows_the_learned_ranges():
    model = pre_ln_block()
    ctx = fake_quant(model)
    learn(model, ctx)
    plan = qstate.activation_plan(model)
    by_name = {v.name: v for n in model.graph for v in n.outputs}
    checked = 0
    for node in model.graph:
        entry = plan.get(node.inputs[0].name) if node.op_type == "QuantizeLinear" else None
        if entry is None:
            continue
        s = float(const_array(node.inputs[1]))
        z = int(const_array(node.inputs[2]))
        lo, hi = entry["ranges"][8]
        qmin, qmax = (0, 255) if const_array(node.inputs[2]).dtype == np.uint8 else (-128, 127)
        assert lo == pytest.approx((qmin - z) * s, rel=1e-5, abs=1e-7)
        assert hi == pytest.approx((qmax - z) * s, rel=1e-5, abs=1e-7)
        checked += 1
    assert checked >= 3 and by_name


# -- numerics --------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [pre_ln_block, lambda: to_ir(mlp())])
def test_learning_lowers_the_loss_and_raises_held_out_sqnr(build):
    model = build()
    ctx = fake_quant(model)
    float_model = ir.from_proto(qstate.float_reference(model))
    held_out = samples_for(model, 16, seed=100)
    start = output_sqnr(model, float_model, held_out)
    report = learn(model, ctx, "steps=60")
    assert report["loss_after"] < report["loss_before"]
    end = output_sqnr(model, float_model, held_out)
    print(f"held-out SQNR {start:.2f} → {end:.2f} dB; loss {report['loss_before']:.4g} → {report['loss_after']:.4g}")
    assert end > start


def test_a_distillation_loss_for_logits():
    """loss=kl: KL(softmax(Y) ‖ softmax(Ŷ)) along the last axis, what a language model's
    logits are compared with; same write-back and keep rule."""
    model = to_ir(mlp())
    ctx = fake_quant(model)
    report = learn(model, ctx, "steps=60,loss=kl")
    assert report["loss"] == "kl" and report["steps"] == 60
    assert 0 < report["loss_before"] < 1
    assert report["kept"] == (report["loss_after"] < report["loss_before"])


def test_the_written_model_computes_what_was_learned():
    """The loss the learner reports for its parameters is the loss of the model written back."""
    model = pre_ln_block()
    ctx = fake_quant(model)
    report = learn(model, ctx)
    assert report["kept"]
    samples = samples_for(model, 16)
    check = Learner(model, ir.from_proto(qstate.float_reference(model)), qstate.activation_plan(model))
    check.set_targets(samples, None)
    assert check.mean_loss(samples, learned=False) == pytest.approx(report["loss_after"], rel=0.02)


def test_equivalent_transforms_fold_exactly_in_float():
    """Any per-channel t the learner picks leaves the float model's outputs unchanged."""
    model = pre_ln_block()
    fake_quant(model)
    float_model = ir.from_proto(qstate.float_reference(model))
    learner = Learner(model, float_model, qstate.activation_plan(model))
    assert len(learner.pairs) >= 2
    folder = _TorchFolder(learner._base)
    for pair in learner.pairs:
        apply_scale(folder, pair, torch.exp(torch.randn(pair.producer.channels, generator=torch.Generator().manual_seed(0))))
    hooks = {key: (lambda v=value: v) for key, value in folder.values.items()}
    feeds = samples_for(model, 1, seed=3)[0]
    with torch.no_grad():
        want = TorchGraph(float_model)(feeds)["y"].numpy()
        got = TorchGraph(float_model, input_hooks=hooks)(feeds)["y"].numpy()
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)) * 10


def test_learned_model_lowers_to_integer_close_to_its_fake_quant():
    model = pre_ln_block()
    ctx = fake_quant(model)
    learn(model, ctx)
    feeds = samples_for(model, 4, seed=50)
    fake = [run(model, f)["y"] for f in feeds]
    run_pipeline(Pipeline.parse("settle-qdq,lower-integer"), model, ctx)
    integer = [run(model, f)["y"] for f in feeds]
    assert sqnr_db(np.concatenate(fake).ravel(), np.concatenate(integer).ravel()) > 25


# -- must not fire -----------------------------------------------------------------------------


@pytest.mark.parametrize("options", ["steps=0", "ranges=false,clipping=false,transforms=false"])
def test_nothing_to_learn_leaves_the_model_as_it_was(options):
    model = pre_ln_block()
    ctx = fake_quant(model)
    before = constants(model)
    learn(model, ctx, options)
    assert constants(model) == before


def test_learning_that_does_not_help_is_not_kept():
    model = pre_ln_block()
    ctx = fake_quant(model)
    before = constants(model)
    report = learn(model, ctx, "steps=150,lr=0.003")
    assert not report["kept"] and report["loss_after"] >= report["loss_before"]
    assert constants(model) == before
    assert any("did not lower the loss" in w for w in ctx.warnings)


def test_a_learning_rate_that_diverges_keeps_the_calibrated_model():
    model = pre_ln_block()
    ctx = fake_quant(model)
    before = constants(model)
    report = learn(model, ctx, "steps=50,lr=50.0")
    assert report["diverged"] and not report["kept"]
    assert constants(model) == before
    assert any("diverged" in w for w in ctx.warnings)


def test_a_time_budget_stops_learning_early():
    model = pre_ln_block()
    ctx = fake_quant(model)
    report = learn(model, ctx, "steps=100000,seconds=0.5")
    assert 0 < report["steps"] < 100000


def test_same_seed_same_model():
    protos = []
    for _ in range(2):
        model = pre_ln_block()
        ctx = fake_quant(model)
        learn(model, ctx, "steps=15")
        protos.append(ir.to_proto(model).SerializeToString(deterministic=True))
    assert protos[0] == protos[1]


# -- errors ----------------------------------------------------------------------------------------


def test_a_float_model_is_refused_before_anything_runs():
    model = pre_ln_block()
    ctx = PassContext(calibration=CalibrationData.from_samples(samples_for(model, 2)).bind(input_specs(model)))
    with pytest.raises(PipelineError, match="learn-quant"):
        run_pipeline(Pipeline.parse("learn-quant"), model, ctx)


def test_a_valid_mask_that_is_not_an_input_is_refused():
    model = pre_ln_block()
    ctx = fake_quant(model)
    with pytest.raises(PipelineError, match="valid_mask names 'attention_mask'"):
        learn(model, ctx, "valid_mask=attention_mask")


def test_bad_options_are_refused():
    with pytest.raises(PipelineError, match="batch ≥ 1"):
        Pipeline.parse("learn-quant{batch=0}")


# -- end to end ------------------------------------------------------------------------------------


def test_a_learned_model_compiles_for_the_integer_npu_verified_bit_exact(tmp_path):
    """The learned constants go through settle-qdq and lower-integer like calibrated ones;
    the compile verifies the artifact against the reference interpreter."""
    import qcompiler
    from qcompiler.presets import PRESETS

    model = pre_ln_block()
    spec = PRESETS["w4a8"].spec.replace(",settle-qdq", ",learn-quant{steps=60},settle-qdq")
    calib = CalibrationData.from_samples(samples_for(model, 16))
    result = qcompiler.compile(model, "npu-sim", tmp_path / "out", pipeline=spec, calib=calib, report=True)
    assert result.manifest["verified"]["status"] == "bit-exact"
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Learning (learn-quant)" in html


@pytest.mark.slow
def test_learned_preset_from_the_command_line(cli, tmp_path):
    """`--preset w4a8-learned` on a CNN: learning runs, the npu-sim build is verified."""
    import json

    from builders import save

    model = save(cnn_bn(), tmp_path / "cnn.onnx")
    np.savez(tmp_path / "calib.npz", x=rng(5).standard_normal((16, 1, 3, 8, 8)).astype(f32))
    done = cli(model, "-t", "npu-sim", "-o", tmp_path / "out", "--preset", "w4a8-learned",
               "--calib", tmp_path / "calib.npz", "--report")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["learning"]["steps"] == 200
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["verified"]["status"] == "bit-exact"
