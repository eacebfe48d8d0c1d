"""Running a decoder artifact: the cache window between steps, and ``generate()``.

A decoder artifact folder holds ``decoder.json`` (:class:`~qcompiler.decoder.DecoderLayout`)
and two artifacts, ``prefill/`` and ``decode/`` (see :mod:`qcompiler.decoder`). The prompt
goes through the prefill step in chunks of ``prefill`` tokens (the last one left-padded:
padding is masked out and takes no position; a one-token prompt too), each generated
token through the decode step; the cache each step returns is the next step's input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
import numpy as np

from .decoder_layout import DecoderLayout
from .errors import InputError

Step = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclasses.dataclass
class CacheWindow:
    """The static cache between steps: per-layer past keys/values, which slots hold text,
    the next position, and how many slots back the oldest text token is."""

    cache: dict[str, np.ndarray]
    mask: np.ndarray  # [C] int64: 1 where a slot holds a text token
    position: int = 0
    span: int = 0

    @classmethod
    def empty(cls, layout: DecoderLayout) -> CacheWindow:
        """No text yet: float zeros, or the zero point where the cache is integer."""
        quantization = layout.cache_quantization or {}
        cache = {}
        for name in layout.past_names():
            if name in quantization:
                q = quantization[name]
                cache[name] = np.full(layout.cache_shape(), q["zero_point"], np.dtype(q["dtype"]))
            else:
                cache[name] = np.zeros(layout.cache_shape(), np.float32)
        return cls(cache, np.zeros(layout.max_context, np.int64))


def run_chunk(step: Step, layout: DecoderLayout, window: CacheWindow, tokens: Sequence[int], steps: int) -> np.ndarray:
    """Feed ``tokens`` (≤ ``steps``) through a step of ``steps`` tokens; returns the logits
    of the last token ([vocab]) and advances ``window``."""
    n = len(tokens)
    pad = steps - n
    if not 1 <= n <= steps:
        raise InputError(f"a step of {steps} tokens was given {n}")
    span = (window.span + steps) if window.span else n
    if span > layout.max_context:
        raise InputError(f"the text needs a cache of {span} slots, over the compiled maximum context of "
                         f"{layout.max_context} (compile with a larger max_context)")
    ids = np.array([[layout.pad_token_id] * pad + list(tokens)], np.int64)
    mask = np.concatenate([window.mask, np.zeros(pad, np.int64), np.ones(n, np.int64)])[None]
    positions = np.array([[0] * pad + list(range(window.position, window.position + n))], np.int64)
    outputs = step({"input_ids": ids, "attention_mask": mask, "position_ids": positions, **window.cache})
    window.cache = {past: outputs[present] for past, present in zip(layout.past_names(), layout.present_names())}
    window.mask = mask[0, steps:]
    window.position += n
    window.span = span
    return outputs["logits"][0, -1]


def _check_tokens(tokens: np.ndarray, layout: DecoderLayout) -> list[int]:
    array = np.asarray(tokens)
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 1 or array.size == 0 or array.dtype.kind not in "iu":
        raise InputError(f"input_ids: need a non-empty 1-D (or 1×N) integer array, got {array.dtype} {list(array.shape)}")
    bad = array[(array < 0) | (array >= layout.vocab_size)]
    if bad.size:
        raise InputError(f"input_ids: token id {int(bad[0])} is out of range (vocabulary of {layout.vocab_size})")
    return [int(t) for t in array]


def _next_token(logits: np.ndarray, rng: np.random.Generator | None, temperature: float, top_k: int | None) -> int:
    if rng is None:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / max(temperature, 1e-6)
    if top_k:
        cut = np.sort(z)[-min(top_k, z.size)]
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z - z.max())
    return int(rng.choice(z.size, p=p / p.sum()))


def generate(prefill: Step, decode: Step, layout: DecoderLayout, input_ids, max_new_tokens: int = 32, *,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
             eos_token_id: int | None = None, return_logits: bool = False):
    """Greedy (or seeded sampling) generation: the prompt and the new tokens, 1-D int64;
    with ``return_logits`` also the logits of every generated position ([new, vocab])."""
    prompt = _check_tokens(input_ids, layout)
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}")
    window = CacheWindow.empty(layout)
    logits = None
    for start in range(0, len(prompt), layout.prefill):
        chunk = prompt[start:start + layout.prefill]
        logits = run_chunk(prefill, layout, window, chunk, layout.prefill)
    rng = np.random.default_rng(seed) if do_sample else None
    tokens, seen = list(prompt), []
    for i in range(max_new_tokens):
        seen.append(logits)
        token = _next_token(logits, rng, temperature, top_k)
        tokens.append(token)
        if token == eos_token_id or i == max_new_tokens - 1:
            break
        logits = run_chunk(decode, layout, window, [token], 1)
    out = np.array(tokens, np.int64)
    return (out, np.stack(seen) if seen else np.zeros((0, layout.vocab_size), np.float32)) if return_logits else out


class DecoderRunner:
    """``qcompiler.load(OUT)`` of a decoder artifact: ``generate()`` over its two steps
    (``prefill`` and ``decode``: runners of the two artifacts)."""

    def __init__(self, layout: DecoderLayout, prefill, decode):
        self.layout, self.prefill, self.decode = layout, prefill, decode

    def generate(self, input_ids, max_new_tokens: int = 32, **options):
        """See :func:`generate`."""
        return generate(self.prefill.run, self.decode.run, self.layout, input_ids, max_new_tokens, **options)
