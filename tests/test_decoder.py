"""Decoder artifacts: prefill/decode steps over a static KV cache, generate(), their errors.

The steps' float semantics are in the fast lane; everything that compiles a decoder is slow."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qcompiler
from qcompiler.decoder import compile_decoder, layout_of, torch_step
from qcompiler.errors import InputError
from qcompiler.generate import CacheWindow, generate, run_chunk

PROMPTS = [[5, 17, 99, 3, 42, 7, 1, 88, 20, 11, 64], [9], [120, 4, 4, 4, 77, 31, 2, 60, 61]]


def tiny_llama(seed: int = 0, kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=kv_heads, max_position_embeddings=64, tie_word_embeddings=True, rope_theta=1e4)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def calib_ids():
    return np.random.default_rng(0).integers(0, 128, (6, 20))


@pytest.mark.parametrize("kv_heads", [pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(4, marks=pytest.mark.slow)])
def test_static_cache_steps_match_the_full_forward(kv_heads):
    """Prompt in chunks of 8 (the last left-padded), then one token at a time: the logits of
    every generated position equal transformers' forward over the whole sequence."""
    model = tiny_llama(1, kv_heads)
    layout = layout_of(model, max_context=32, prefill=8)
    step = torch_step(model, layout)
    prompt = np.array(PROMPTS[0])
    tokens, logits = generate(step, step, layout, prompt, 6, return_logits=True)
    with torch.no_grad():
        full = model(torch.from_numpy(tokens[None])).logits[0].numpy()
    np.testing.assert_allclose(logits, full[len(prompt) - 1:len(tokens) - 1], atol=1e-5)
    assert np.array_equal(full[len(prompt) - 1:len(tokens) - 1].argmax(-1), tokens[len(prompt):])


@pytest.mark.slow
def test_float_artifact_equals_the_torch_steps(llama, calib_ids, tmp_path):
    compile_decoder(llama, "reference", tmp_path / "out", calib_ids=calib_ids, max_context=32, prefill=8, preset="float")
    runner = qcompiler.load(tmp_path / "out")
    layout = runner.layout
    step = torch_step(llama, layout)
    for prompt in PROMPTS:
        ours, our_logits = runner.generate(prompt, 5, return_logits=True)
        theirs, their_logits = generate(step, step, layout, prompt, 5, return_logits=True)
        np.testing.assert_allclose(our_logits, their_logits, atol=1e-4)
        assert np.array_equal(ours, theirs)


@pytest.fixture(scope="module")
def w8a8_reference(llama, calib_ids, tmp_path_factory):
    out = tmp_path_factory.mktemp("decoder") / "reference"
    compile_decoder(llama, "reference", out, calib_ids=calib_ids, max_context=32, prefill=8)
    return out


@pytest.mark.slow
def test_w8a8_decoder_is_integer_only_and_close_to_float(w8a8_reference, llama):
    import onnx

    for step_name in ("prefill", "decode"):
        ops = {n.op_type for n in onnx.load(w8a8_reference / step_name / "model.onnx").graph.node}
        assert {"IntRMSNorm", "IntSoftmax", "MatMulInteger"} <= ops
        assert not ops & {"Softmax", "MatMul", "RMSNormalization", "Sigmoid"}
    runner = qcompiler.load(w8a8_reference)
    step = torch_step(llama, runner.layout)
    for prompt in PROMPTS:
        _, ours = runner.generate(prompt, 4, return_logits=True)
        _, theirs = generate(step, step, runner.layout, prompt, 4, return_logits=True)
        assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.99


@pytest.mark.slow
def test_masked_cache_slots_do_not_change_the_logits(w8a8_reference):
    """Slots the mask marks empty get probability exactly 0 in the integer softmax:
    filling them with anything leaves the decode step's logits bit-identical."""
    runner = qcompiler.load(w8a8_reference)
    layout = runner.layout
    window = CacheWindow.empty(layout)
    run_chunk(runner.prefill.run, layout, window, PROMPTS[2][:layout.prefill], layout.prefill)
    empty = window.mask == 0
    assert empty.sum() > 10
    feeds = {"input_ids": np.array([[7]]), "attention_mask": np.concatenate([window.mask, [1]])[None],
             "position_ids": np.array([[window.position]]), **window.cache}
    noisy = dict(feeds)
    rng = np.random.default_rng(3)
    for name in layout.past_names():
        cache = feeds[name].copy()
        cache[:, :, empty] = rng.integers(-128, 128, cache[:, :, empty].shape).astype(cache.dtype)
        noisy[name] = cache
    np.testing.assert_array_equal(runner.decode.run(feeds)["logits"], runner.decode.run(noisy)["logits"])


@pytest.mark.slow
def test_the_cache_crosses_steps_as_int8_and_round_trips(w8a8_reference):
    """One static range per layer and kind for both steps: the int8 a step writes for the
    slots it keeps are the int8 it read, and prefill writes what decode reads."""
    runner = qcompiler.load(w8a8_reference)
    layout = runner.layout
    assert set(layout.cache_quantization) == set(layout.past_names()) | set(layout.present_names())
    for step in (runner.prefill, runner.decode):
        kinds = {s.name: s.dtype for s in step.inputs}
        assert all(kinds[name] == np.int8 for name in layout.past_names())
    window = CacheWindow.empty(layout)
    run_chunk(runner.prefill.run, layout, window, PROMPTS[0][:8], layout.prefill)
    before = dict(window.cache)
    run_chunk(runner.decode.run, layout, window, [3], 1)
    for name in layout.past_names():
        assert window.cache[name].dtype == np.int8
        np.testing.assert_array_equal(window.cache[name][:, :, :-1], before[name][:, :, 1:])


@pytest.mark.slow
def test_generate_checks_its_inputs(w8a8_reference):
    runner = qcompiler.load(w8a8_reference)
    with pytest.raises(InputError, match="token id 128 is out of range"):
        runner.generate([1, 128], 2)
    with pytest.raises(InputError, match="over the compiled maximum context of 32"):
        runner.generate(list(range(30)), 8)
    with pytest.raises(InputError, match="non-empty"):
        runner.generate([], 2)


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(w8a8_reference):
    runner = qcompiler.load(w8a8_reference)
    a = runner.generate(PROMPTS[0], 6, do_sample=True, seed=5, temperature=1.5)
    b = runner.generate(PROMPTS[0], 6, do_sample=True, seed=5, temperature=1.5)
    assert np.array_equal(a, b) and len(a) == len(PROMPTS[0]) + 6


def test_a_model_that_is_not_llama_family_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(InputError, match="not a Llama-family causal LM"):
        layout_of(gpt2, 32, 8)


@pytest.mark.slow
def test_cli_generate(w8a8_reference, cli):
    done = cli("generate", w8a8_reference, "--ids", "5,17,99", "--max-new-tokens", "4")
    assert done.returncode == 0, done.stderr
    expected = qcompiler.load(w8a8_reference).generate([5, 17, 99], 4)
    assert done.stdout.split() == [str(t) for t in expected]
    bad = cli("generate", w8a8_reference, "--ids", "5,999")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "out of range" in bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("target", ["host", "npu-sim"])
def test_generated_tokens_and_logits_match_the_reference(target, llama, calib_ids, w8a8_reference, tmp_path):
    compile_decoder(llama, target, tmp_path / target, calib_ids=calib_ids, max_context=32, prefill=8)
    runner, reference = qcompiler.load(tmp_path / target), qcompiler.load(w8a8_reference)
    for prompt in PROMPTS:
        ours, our_logits = runner.generate(prompt, 8, return_logits=True)
        theirs, their_logits = reference.generate(prompt, 8, return_logits=True)
        assert np.array_equal(ours, theirs)
        np.testing.assert_array_equal(our_logits, their_logits)


@pytest.mark.slow
def test_cli_compiles_a_model_folder_and_generates_text(tmp_path, cli):
    """``qcompile decoder FOLDER`` (a tiny Llama saved with the bundled MiniLM example's
    tokenizer) then ``qcompile generate --prompt``; a folder without a model: exit 2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qcompiler.examples import minilm

    tokenizer = minilm.tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    folder = tmp_path / "tiny"
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = minilm.gensim_data_dir() / "lee_background.cor"
    done = cli("decoder", folder, "-t", "reference", "-o", tmp_path / "out", "--calib-text", text,
               "--max-context", "32", "--prefill", "8", "--windows", "4", "--window-tokens", "16")
    assert done.returncode == 0, done.stderr
    assert "prefill bit-exact, decode bit-exact" in done.stdout
    said = cli("generate", tmp_path / "out", "--prompt", "the weather today", "--tokenizer", folder, "--max-new-tokens", "3")
    assert said.returncode == 0, said.stderr
    assert said.stdout.strip().startswith("[CLS] the weather today")
    bad = cli("decoder", tmp_path, "-t", "reference", "-o", tmp_path / "nope", "--calib-text", text)
    assert bad.returncode == 2 and "no config.json" in bad.stderr and not (tmp_path / "nope").exists()
