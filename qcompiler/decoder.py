"""A causal LM as two fixed-shape steps over a static KV cache: prefill and decode.

Edge NPUs and compiled kernels want static shapes, so the cache is a fixed window of
``C = max_context`` slots per layer, and one step of ``T`` tokens (``T = prefill`` for the
prompt, ``T = 1`` per generated token) is the function::

    (input_ids[1,T], attention_mask[1,C+T], position_ids[1,T], past.i.key/value[1,h_kv,C,d])
        → (logits[1,T,V], present.i.key/value[1,h_kv,C,d])

``present`` is ``concat(past, new)[:, :, T:]``: the window slid by ``T``, fed back as the
next step's ``past``. ``attention_mask`` marks the slots and new tokens that hold text
(padding, the empty start of the window: 0); ``position_ids`` are explicit, so RoPE's
cos/sin are tables indexed by them (an input, not constants baked for one window).
A query at step position ``t`` sees cache slot ``j`` where ``mask[j]``, and new token ``u``
where ``mask[C+u]`` and ``u ≤ t``; masked scores are ``masked_fill``ed with
``finfo.min``, which ``exact-masks`` turns into probability exactly 0.

Input and output names follow the ONNX decoder-with-past layout (``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.N.key``/``.value``, ``logits``,
``present.N.key``/``.value``). :class:`StaticCacheStep` runs the layers of a
``transformers`` Llama-family model (Llama, SmolLM, Qwen2, Mistral: RMSNorm, RoPE
rotate-half, grouped KV heads, gated MLP) with its own weights and rotary frequencies.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .decoder_layout import DECODER_FILE, DecoderLayout
from .errors import InputError

def layout_of(hf_model, max_context: int, prefill: int) -> DecoderLayout:
    """The layout of a ``transformers`` Llama-family causal LM (refused in one line otherwise)."""
    config = hf_model.config
    inner = getattr(hf_model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or any(not hasattr(inner, n) for n in needed) or not hasattr(hf_model, "lm_head"):
        raise InputError(f"{type(hf_model).__name__}: not a Llama-family causal LM (needs model.embed_tokens, "
                         "model.layers, model.norm, model.rotary_emb and lm_head)")
    attention = inner.layers[0].self_attn
    if not all(hasattr(attention, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        raise InputError(f"{type(attention).__name__}: attention without q/k/v/o projections is not supported")
    if max_context < 2 or not 1 <= prefill <= max_context:
        raise InputError(f"max_context {max_context} and prefill {prefill}: need 1 ≤ prefill ≤ max_context")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    pad = config.pad_token_id if getattr(config, "pad_token_id", None) is not None else 0
    return DecoderLayout(layers=len(inner.layers), kv_heads=config.num_key_value_heads or heads, head_dim=head_dim,
                         vocab_size=config.vocab_size, max_context=max_context, prefill=prefill, pad_token_id=int(pad))


def _step_module(hf_model, layout: DecoderLayout):
    import torch

    class StaticCacheStep(torch.nn.Module):
        """One step of ``T`` tokens over the static cache (see the module docstring)."""

        def __init__(self):
            super().__init__()
            inner = hf_model.model
            self.embed, self.blocks, self.norm, self.lm_head = inner.embed_tokens, inner.layers, inner.norm, hf_model.lm_head
            config = hf_model.config
            self.heads = config.num_attention_heads
            self.kv_heads, self.head_dim, self.context = layout.kv_heads, layout.head_dim, layout.max_context
            rotary = inner.rotary_emb
            positions = torch.arange(layout.max_context, dtype=torch.float32)
            angles = torch.outer(positions, rotary.inv_freq.float())
            angles = torch.cat([angles, angles], dim=-1)
            factor = float(getattr(rotary, "attention_scaling", 1.0))
            self.register_buffer("cos_table", torch.cos(angles) * factor, persistent=False)
            self.register_buffer("sin_table", torch.sin(angles) * factor, persistent=False)

        @staticmethod
        def rotate_half(x):
            half = x.shape[-1] // 2
            return torch.cat([-x[..., half:], x[..., :half]], dim=-1)

        def forward(self, input_ids, attention_mask, position_ids, *past):
            steps = input_ids.shape[1]
            x = self.embed(input_ids)
            cos = torch.nn.functional.embedding(position_ids, self.cos_table).unsqueeze(1)  # [1, 1, T, d]: a Gather
            sin = torch.nn.functional.embedding(position_ids, self.sin_table).unsqueeze(1)
            valid = attention_mask.bool()
            causal = torch.ones(steps, steps, dtype=torch.bool).tril()
            seen_new = causal & valid[:, None, self.context:]  # [1, T, T]
            seen_past = valid[:, None, :self.context].expand(1, steps, self.context)
            allowed = torch.cat([seen_past, seen_new], dim=-1).unsqueeze(1)  # [1, 1, T, C+T]
            presents = []
            for i, block in enumerate(self.blocks):
                attn = block.self_attn
                h = block.input_layernorm(x)
                q = attn.q_proj(h).view(1, steps, self.heads, self.head_dim).transpose(1, 2)
                k = attn.k_proj(h).view(1, steps, self.kv_heads, self.head_dim).transpose(1, 2)
                v = attn.v_proj(h).view(1, steps, self.kv_heads, self.head_dim).transpose(1, 2)
                q = q * cos + self.rotate_half(q) * sin
                k = k * cos + self.rotate_half(k) * sin
                keys = torch.cat([past[2 * i], k], dim=2)
                values = torch.cat([past[2 * i + 1], v], dim=2)
                presents += [keys[:, :, steps:], values[:, :, steps:]]
                group = self.heads // self.kv_heads
                if group > 1:
                    keys = keys.repeat_interleave(group, dim=1)
                    values = values.repeat_interleave(group, dim=1)
                scores = torch.matmul(q, keys.transpose(2, 3)) * (self.head_dim ** -0.5)
                scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
                probs = torch.softmax(scores, dim=-1)
                out = torch.matmul(probs, values).transpose(1, 2).reshape(1, steps, self.heads * self.head_dim)
                x = x + attn.o_proj(out)
                x = x + block.mlp(block.post_attention_layernorm(x))
            logits = self.lm_head(self.norm(x))
            return (logits, *presents)

    return StaticCacheStep().eval()


def step_inputs(layout: DecoderLayout, steps: int) -> dict[str, np.ndarray]:
    """Example feeds of a step of ``steps`` tokens: the empty window, one real token."""
    feeds = {
        "input_ids": np.full((1, steps), layout.pad_token_id, np.int64),
        "attention_mask": np.zeros((1, layout.max_context + steps), np.int64),
        "position_ids": np.zeros((1, steps), np.int64),
    }
    feeds["attention_mask"][0, -1] = 1
    for name in layout.past_names():
        feeds[name] = np.zeros(layout.cache_shape(), np.float32)
    return feeds


def export_steps(hf_model, max_context: int = 256, prefill: int = 32):
    """``(layout, prefill_model, decode_model)``: both steps of a ``transformers`` causal LM
    imported through ``torch.export`` (:func:`qcompiler.from_torch`)."""
    import torch

    from .torch_import import from_torch

    layout = layout_of(hf_model, max_context, prefill)
    step = _step_module(hf_model.float().eval(), layout)
    models = []
    for steps in (prefill, 1):
        example = tuple(torch.from_numpy(v) for v in step_inputs(layout, steps).values())
        models.append(from_torch(step, example, input_names=layout.input_names(), output_names=layout.output_names()))
    return layout, models[0], models[1]


def torch_step(hf_model, layout: DecoderLayout):
    """The step as a callable on numpy feeds (float, torch): for calibration and tests."""
    import torch

    step = _step_module(hf_model.float().eval(), layout)

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            outputs = step(*(torch.from_numpy(np.asarray(feeds[n])) for n in layout.input_names()))
        return {name: o.numpy() for name, o in zip(layout.output_names(), outputs)}
    return run


def calibration_feeds(hf_model, layout: DecoderLayout, windows: np.ndarray, decode_steps: int = 8):
    """``(prefill samples, decode samples)``: the feeds each step sees when the float model
    reads ``windows`` ([N, L] token ids): the first ``L − decode_steps`` tokens as prefill
    chunks, the rest one token at a time (teacher forcing), with the caches they leave; and
    the first ``decode_steps`` tokens one at a time from an empty cache (the first positions
    carry the largest activations of a causal LM)."""
    from .generate import CacheWindow, run_chunk

    step = torch_step(hf_model, layout)
    recorded: dict[int, list] = {layout.prefill: [], 1: []}

    def recording(steps):
        def run(feeds):
            recorded[steps].append({k: np.array(v) for k, v in feeds.items()})
            return step(feeds)
        return run

    for tokens in np.asarray(windows):
        tokens = [int(t) for t in tokens]
        window = CacheWindow.empty(layout)
        split = max(1, len(tokens) - decode_steps)
        for start in range(0, split, layout.prefill):
            run_chunk(recording(layout.prefill), layout, window, tokens[start:min(start + layout.prefill, split)], layout.prefill)
        for token in tokens[split:]:
            run_chunk(recording(1), layout, window, [token], 1)
        window = CacheWindow.empty(layout)
        for token in tokens[:decode_steps]:
            run_chunk(recording(1), layout, window, [token], 1)
    return recorded[layout.prefill], recorded[1]


def compile_decoder(hf_model, target: str, out_dir, *, calib_ids: np.ndarray, max_context: int = 256,
                    prefill: int = 32, preset: str | None = "w8a8", pipeline: str | None = None,
                    decode_steps: int = 8, int8_cache: bool = True, force: bool = False, log=lambda message: None,
                    **options):
    """Compile a ``transformers`` causal LM into a decoder artifact folder (``prefill/``,
    ``decode/``, ``decoder.json``), both steps calibrated on the feeds they see when the
    float model reads ``calib_ids`` ([N, L] token windows). Load it with
    :func:`qcompiler.load` and call ``generate()``. With ``int8_cache`` (and a quantizing
    preset) the cache crosses between steps as int8 with one static range per layer and
    kind, from the calibration caches (the ``integer-io`` pass). Returns the two steps'
    manifests (``{"prefill": ..., "decode": ...}``)."""
    from qcompiler.passes.integer_io import IntegerIO

    from .artifact import atomic_output_dir
    from .io_quantization import integer_io
    from .calibdata import CalibrationData
    from .compiler import compile_model
    from .graph import get_stage
    from .presets import choose
    from .target import default_targets
    from .pipeline import parse_one

    calib_ids = np.asarray(calib_ids)
    if calib_ids.ndim == 3 and calib_ids.shape[1] == 1:  # [N, 1, L]: a sample axis before batch-1 windows
        calib_ids = calib_ids[:, 0]
    if calib_ids.ndim != 2 or calib_ids.shape[1] < 2 or calib_ids.dtype.kind not in "iu":
        raise InputError(f"calib_ids: need [windows, tokens] integer token ids, got {calib_ids.dtype} {list(calib_ids.shape)}")
    if calib_ids.shape[1] > max_context:
        raise InputError(f"calib_ids: windows of {calib_ids.shape[1]} tokens exceed max_context {max_context}")
    layout, prefill_model, decode_model = export_steps(hf_model, max_context, prefill)
    log(f"decoder: {layout.layers} layers, cache {layout.kv_heads}x{layout.max_context}x{layout.head_dim} per layer, "
        f"prefill {layout.prefill} tokens")
    prefill_samples, decode_samples = calibration_feeds(hf_model, layout, calib_ids, decode_steps)
    spec = parse_one(target, default_targets())
    cache_io = IntegerIO(tensors=cache_ranges(layout, prefill_samples + decode_samples)) if int8_cache else None
    manifests, quantization = {}, {}
    steps = {"prefill": (prefill_model, prefill_samples), "decode": (decode_model, decode_samples)}
    del prefill_model, decode_model, prefill_samples, decode_samples
    with atomic_output_dir(out_dir, force=force) as tmp:
        for name in ("prefill", "decode"):
            model, samples = steps.pop(name)  # one step in memory at a time
            chosen, _ = choose(preset, pipeline, get_stage(model), True)
            chosen = _with_cache_io(chosen, cache_io)
            result = compile_model(model, spec, tmp / name, pipeline=chosen,
                                   calibration=CalibrationData.from_samples(samples), log=log, **options)
            manifests[name], quantization = result.manifest, integer_io(result.model)
            del model, samples, result
        dataclasses.replace(layout, cache_quantization=quantization or None).save(tmp)
    return manifests


__all__ = ["DECODER_FILE", "DecoderLayout", "compile_decoder", "export_steps", "layout_of", "torch_step"]


def cache_ranges(layout: DecoderLayout, samples) -> tuple[str, ...]:
    """``NAME:MIN:MAX`` of every past input and the present output it becomes: the range of
    the caches the calibration steps read (the same for both steps, so the integers a step
    writes are the integers the next one reads)."""
    entries = []
    for past, present in zip(layout.past_names(), layout.present_names()):
        lo = min(float(np.min(s[past])) for s in samples)
        hi = max(float(np.max(s[past])) for s in samples)
        entries += [f"{past}:{lo!r}:{hi!r}", f"{present}:{lo!r}:{hi!r}"]
    return tuple(entries)


def _with_cache_io(pipeline, cache_io):
    """``pipeline`` with ``cache_io`` just before ``lower-integer`` (unchanged without one)."""
    from .pipeline import Pipeline

    passes = list(pipeline)
    names = [p.name for p in passes]
    if cache_io is None or "lower-integer" not in names:
        return pipeline
    at = names.index("lower-integer")
    return Pipeline(passes[:at] + [cache_io] + passes[at:])
