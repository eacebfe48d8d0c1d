"""Decoder LLM blocks integer-only: RMSNorm, exact causal masks of every form, RoPE, SwiGLU
with 16-bit gates, GQA, Split, ReduceMean; a LLaMA decoder from ``transformers`` compiles
integer-only for npu-sim and fpga-sim, verified bit-exact."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import qcompiler
from qcompiler.calibdata import CalibrationData, input_specs
from qcompiler.graph import get_stage
from qcompiler.integer_check import first_float_compute
from qcompiler.passmanager import PassContext, run_pipeline
from qcompiler.pipeline import Pipeline, parse_one
from qcompiler.presets import PRESETS
from qcompiler.target import default_targets

NEG_INF = float("-inf")
FINFO_MIN = float(torch.finfo(torch.float32).min)


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph]


def _quantize(model, samples: dict, spec: str = PRESETS["w8a8"].spec):
    data = CalibrationData.from_arrays(samples).bind(input_specs(model))
    ctx = PassContext(calibration=data)
    run_pipeline(Pipeline.parse(spec), model, ctx)
    return ctx


# -- RMSNorm ----------------------------------------------------------------------------------------


class RMSNorm(torch.nn.Module):
    def __init__(self, n, form="rsqrt", eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, n))
        self.form, self.eps = form, eps

    def forward(self, x):
        if self.form == "rsqrt":
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        if self.form == "div":
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps) * self.weight
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)  # no scale


@pytest.mark.parametrize("form", ["rsqrt", "div", "unscaled"])
def test_fuse_rmsnorm_rewrites_every_exported_form_float_exactly(form):
    model = qcompiler.from_torch(RMSNorm(24, form), torch.randn(2, 5, 24))
    x = np.random.default_rng(0).normal(size=(2, 5, 24)).astype(np.float32)
    before = qcompiler.ReferenceInterpreter(model).run({"input": x} if "input" in [v.name for v in model.graph.inputs] else
                                                        {model.graph.inputs[0].name: x})
    ctx = PassContext()
    run_pipeline(Pipeline.parse("fold-constants,fuse-rmsnorm"), model, ctx)
    assert _ops(model).count("RMSNormalization") == 1 and "ReduceMean" not in _ops(model)
    after = qcompiler.ReferenceInterpreter(model).run({model.graph.inputs[0].name: x})
    for key in before:
        np.testing.assert_allclose(after[key], before[key], rtol=1e-5, atol=1e-6)


def test_fuse_rmsnorm_leaves_other_means_alone():
    """A root mean square over another axis is not an RMSNorm (the last-axis one of x − mean is)."""

    class NotRMS(torch.nn.Module):
        def forward(self, x):
            over_rows = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)
            centred = x - x.mean(-1, keepdim=True)
            return over_rows + centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-6)

    model = qcompiler.from_torch(NotRMS(), torch.randn(2, 5, 8))
    run_pipeline(Pipeline.parse("fold-constants,fuse-rmsnorm"), model, PassContext())
    ops = _ops(model)
    assert ops.count("RMSNormalization") == 1 and ops.count("ReduceMean") == 2  # axis 1, and the centring mean


def test_rmsnorm_lowers_to_int_rmsnorm_within_the_error_budget():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 32), RMSNorm(32), torch.nn.Linear(32, 16))
    model = qcompiler.from_torch(net, torch.randn(4, 32))
    rng = np.random.default_rng(1)
    ctx = _quantize(model, {model.graph.inputs[0].name: rng.normal(size=(32, 4, 32)).astype(np.float32)})
    assert "IntRMSNorm" in _ops(model) and first_float_compute(model) is None
    measured = [v for v in ctx.report["integer_lowering"]["variants"] if v["op"] == "RMSNormalization"]
    assert measured and max(measured[0]["errors"].values()) < 0.02


# -- exact masks ----------------------------------------------------------------------------------


class Attention(torch.nn.Module):
    """Single-head attention whose output is the probabilities (values = identity), masked one way."""

    def __init__(self, form: str, seq: int = 8, dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.q = torch.nn.Linear(dim, dim)
        self.k = torch.nn.Linear(dim, dim)
        self.form = form
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        self.register_buffer("causal", causal)
        fill = {"additive_inf": NEG_INF, "additive_finfo": FINFO_MIN}.get(form, FINFO_MIN)
        self.register_buffer("additive", torch.zeros(seq, seq).masked_fill(~causal, fill))
        self.register_buffer("eye", torch.eye(seq))

    def forward(self, x):
        q, k = self.q(x), self.k(x)
        if self.form == "sdpa_is_causal":  # [batch, heads, seq, dim]
            v = self.eye.reshape(1, 1, *self.eye.shape).expand(x.shape[0], 1, -1, -1)
            return torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v, is_causal=True).squeeze(1)
        scores = q @ k.transpose(-1, -2) / 4.0
        if self.form == "masked_fill":
            scores = scores.masked_fill(~self.causal, FINFO_MIN)
        else:
            scores = scores + self.additive
        return torch.softmax(scores, dim=-1)


@pytest.mark.parametrize("form", ["additive_inf", "additive_finfo", "masked_fill", "sdpa_is_causal"])
def test_every_mask_form_gives_masked_positions_probability_zero(form, tmp_path):
    """Whatever the calibrated score range, masked (future) positions get probability exactly 0
    in the integer stage and in the compiled host artifact."""
    net = Attention(form)
    x = torch.randn(1, 8, 16) * 0.05  # a narrow score range: a saturating mask would leak here
    model = qcompiler.from_torch(net, x)
    name = model.graph.inputs[0].name
    rng = np.random.default_rng(0)
    _quantize(model, {name: (rng.normal(size=(16, 1, 8, 16)) * 0.05).astype(np.float32)})
    softmaxes = [n for n in model.graph if n.op_type == "IntSoftmax"]
    assert softmaxes and all(len(n.inputs) == 4 and n.inputs[3] is not None for n in softmaxes), form
    assert first_float_compute(model) is None
    feeds = {name: (rng.normal(size=(1, 8, 16)) * 0.05).astype(np.float32)}
    future = ~np.tril(np.ones((8, 8), bool))
    integer = next(iter(qcompiler.ReferenceInterpreter(model).run(feeds).values()))
    assert np.all(integer[0][future] == 0.0) and np.all(integer[0][~future] > 0)
    qcompiler.compile_model(model, parse_one("host", default_targets()), tmp_path / "out", pipeline=Pipeline([]))
    host = next(iter(qcompiler.load(tmp_path / "out").run(feeds).values()))
    np.testing.assert_array_equal(host, integer)


def test_a_bias_that_is_not_a_mask_is_left_alone():
    class Biased(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("bias", -torch.arange(8.0).abs().reshape(1, 8) * 0.5)  # ALiBi-like

        def forward(self, s):
            return torch.softmax(s + self.bias, dim=-1)

    model = qcompiler.from_torch(Biased(), torch.randn(8, 8))
    run_pipeline(Pipeline.parse("fold-constants,exact-masks"), model, PassContext())
    assert "Where" not in _ops(model)


# -- SwiGLU, Split, ReduceMean -------------------------------------------------------------------------


class GatedBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(16, 48)
        self.gate, self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        q, k, v = self.qkv(x).split(16, dim=-1)
        h = q * k + v
        return self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h)), h.mean(dim=-1, keepdim=True)


def test_swiglu_split_and_reduce_mean_lower_integer_only_with_16_bit_gates(tmp_path):
    model = qcompiler.from_torch(GatedBlock(), torch.randn(2, 6, 16))
    name = model.graph.inputs[0].name
    spec = "fold-constants,insert-fake-quant{wide_outside_products=true},lower-integer"
    _quantize(model, {name: np.random.default_rng(2).normal(size=(16, 2, 6, 16)).astype(np.float32)}, spec)
    ops = _ops(model)
    assert get_stage(model) == "integer" and first_float_compute(model) is None, ops
    assert "Split" in ops and "ReduceSum" in ops and "IntInterpolate" in ops  # the int16 gate's sigmoid
    for spec in ("npu-sim", "fpga-sim"):
        result = qcompiler.compile_model(model, parse_one(spec, default_targets()), tmp_path / spec, pipeline=Pipeline([]))
        assert result.manifest["verified"]["status"] == "bit-exact"


# -- a LLaMA decoder from transformers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    path = tmp_path_factory.mktemp("llama") / "llama.onnx"
    torch.onnx.export(Logits(model), (torch.randint(0, 128, (1, 12)),), dynamo=True,
                      input_names=["input_ids"], output_names=["logits"]).save(str(path))
    calib = path.with_name("calib.npz")
    np.savez(calib, input_ids=np.random.default_rng(0).integers(0, 128, (8, 1, 12)))
    return path, calib


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["npu-sim", "fpga-sim", "host"])
def test_a_llama_decoder_compiles_integer_only_and_verified(tiny_llama, spec, tmp_path):
    path, calib = tiny_llama
    result = qcompiler.compile(str(path), spec, tmp_path / "out", preset="w8a8", calib=str(calib))
    ops = [n.op_type for n in result.model.graph]
    assert {"IntRMSNorm", "IntSoftmax", "IntMul"} <= set(ops) and "RMSNormalization" not in ops
    assert result.manifest["verified"]["status"] == "bit-exact"
    assert not result.context.report.get("kept_float")
    assert onnx.load(tmp_path / "out" / "model.qdq.onnx") is not None
