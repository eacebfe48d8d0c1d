"""Accuracy of quantized all-MiniLM-L6-v2: qcompiler against onnxruntime, in one run.

Calibrates on 256 sentences of gensim's lee_background.cor and evaluates on 500
*other* sentences of it (batch 1, seq 128). Metric: mean cosine similarity of the
mean-pooled, L2-normalised sentence embeddings against FP32 (onnxruntime). Also the
Lee-50 human-similarity Pearson r (FP32 ≈ 0.656). Our models are executed by the
reference interpreter at the integer stage (what every target reproduces bit-exactly).

    python bench/accuracy_minilm.py [--calib 256] [--eval 500] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pearson_lee(embed) -> float:
    from qcompiler.examples import minilm

    docs = minilm.lee_documents()
    ratings = minilm.lee_similarities()
    vectors = embed(minilm.tokenize(docs))
    cosine = vectors @ vectors.T
    iu = np.triu_indices(len(docs), k=1)
    return float(np.corrcoef(cosine[iu], ratings[iu])[0, 1])


class _Reader:
    """onnxruntime CalibrationDataReader over calibration arrays (N, *input_shape) keyed by input name."""

    def __init__(self, tokens):
        count = next(iter(tokens.values())).shape[0]
        self.samples = [{k: v[i] for k, v in tokens.items()} for i in range(count)]
        self.index = 0

    def get_next(self):
        if self.index >= len(self.samples):
            return None
        self.index += 1
        return self.samples[self.index - 1]

    def rewind(self):
        self.index = 0


def ort_static(model_path: Path, tokens, method: str, work: Path) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import onnx

    single = work / "single.onnx"  # the quantization tools want weights inside the file
    if not single.exists():
        onnx.save(onnx.load(str(model_path)), str(single))
    pre = work / "pre.onnx"
    if not pre.exists():
        quant_pre_process(str(single), str(pre), skip_symbolic_shape=True)
    out = work / f"ort_static_{method}.onnx"
    quantize_static(
        str(pre), str(out), _Reader(tokens), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method),
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
    )
    return out


def ort_dynamic(model_path: Path, work: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = work / "ort_dynamic.onnx"
    quantize_dynamic(str(model_path), str(out), weight_type=QuantType.QInt8)
    return out


def ours(model_path: Path, calib_path: Path, spec: str, work: Path, name: str):
    import qcompiler
    from qcompiler.calibdata import CalibrationData, input_specs
    from qcompiler.passmanager import PassContext, run_pipeline
    from qcompiler.pipeline import Pipeline

    model = qcompiler.load_onnx(model_path)
    data = CalibrationData.from_path(calib_path).bind(input_specs(model))
    ctx = PassContext(calibration=data)
    start = time.perf_counter()
    run_pipeline(Pipeline.parse(spec), model, ctx)
    seconds = time.perf_counter() - start
    interpreter = qcompiler.ReferenceInterpreter(model)
    extra = {"compile_seconds": round(seconds, 1)}
    mp = ctx.report.get("mixed_precision")
    if mp:
        extra["average_weight_bits"] = mp["average_weight_bits"]
        extra["int16_activations"] = len(mp.get("int16_activations", []))
    extra["int16_activations_total"] = sum(
        1 for r in ctx.report.get("activations", []) if r["format"].startswith("int16")
    )
    return (lambda feeds: interpreter.run(feeds)["last_hidden_state"]), extra


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--eval", type=int, default=500)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--only", nargs="*", help="run only these rows")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from qcompiler.examples import minilm
    from qcompiler.presets import PRESETS

    work = Path(tempfile.mkdtemp(prefix="minilm-accuracy-"))
    model_path = minilm.export_onnx(work / "minilm.onnx", dynamo=True)
    calib_sentences, eval_sentences = minilm.calibration_and_eval_sentences(args.calib, args.eval)
    calib_tokens = minilm.tokenize(calib_sentences)
    calib_path = minilm.write_calibration(work / "calib.npz", calib_sentences)
    eval_tokens = minilm.tokenize(eval_sentences)
    print(f"calibration: {len(calib_sentences)} sentences; evaluation: {len(eval_sentences)} other sentences", flush=True)

    def session_runner(path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda feeds: session.run(None, feeds)[0]

    fp32 = session_runner(model_path)
    reference = minilm.embed_with(fp32, eval_tokens)
    rows = [{"name": "FP32 (onnxruntime)", "cosine": 1.0, "lee_pearson": pearson_lee(lambda t: minilm.embed_with(fp32, t))}]

    def evaluate(name, run, extra=None):
        start = time.perf_counter()
        emb = minilm.embed_with(run, eval_tokens)
        row = {"name": name, "cosine": minilm.mean_cosine(reference, emb),
               "lee_pearson": pearson_lee(lambda t: minilm.embed_with(run, t)),
               "eval_seconds": round(time.perf_counter() - start, 1), **(extra or {})}
        rows.append(row)
        print(json.dumps(row), flush=True)

    wanted = lambda name: not args.only or any(o in name for o in args.only)  # noqa: E731
    for method in ("MinMax", "Entropy", "Percentile"):
        name = f"onnxruntime quantize_static QDQ per-channel ({method})"
        if wanted(name):
            try:
                evaluate(name, session_runner(ort_static(model_path, calib_tokens, method, work)))
            except Exception as exc:  # report, keep going
                print(f"{name}: failed: {exc}", file=sys.stderr)
    if wanted("quantize_dynamic"):
        evaluate("onnxruntime quantize_dynamic", session_runner(ort_dynamic(model_path, work)))
    for name, spec in (
        ("qcompiler w8a8 (integer stage)", PRESETS["w8a8"].spec),
        ("qcompiler w4a8 (integer stage)", PRESETS["w4a8"].spec),
        ("qcompiler mixed precision ≤6 weight bits (integer stage)",
         PRESETS["w8a8"].spec.replace(",lower-integer", ",allocate-bits{budget=6.0,valid_mask=attention_mask},lower-integer")),
    ):
        if wanted(name):
            run, extra = ours(model_path, calib_path, spec, work, name)
            extra["pipeline"] = spec
            evaluate(name, run, extra)

    print()
    print(f"{'configuration':62s} {'cosine':>8s} {'Lee r':>7s}")
    for row in rows:
        print(f"{row['name']:62s} {row['cosine']:8.4f} {row['lee_pearson']:7.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
