"""The learning stage (``learn-quant``) against calibration alone, on the bundled MiniLM.

Same split as ``bench/accuracy_minilm.py``: calibration (and learning) on the first
sentences of gensim's lee_background.cor, evaluation on other sentences of it. Metric:
mean cosine of the mean-pooled, L2-normalised embeddings against FP32 (onnxruntime), at
the integer stage (what every target reproduces bit-exactly). Each row is one pipeline;
learning time is measured in the same run on this machine.

    python bench/learning.py [--calib 64] [--eval 200] [--steps 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)

    import onnxruntime as ort
    import torch

    import qcompiler
    from qcompiler.calibdata import CalibrationData, input_specs
    from qcompiler.examples import minilm
    from qcompiler.passmanager import PassContext, run_pipeline
    from qcompiler.pipeline import Pipeline
    from qcompiler.presets import PRESETS

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="learning-bench-"))
    model_path = minilm.export_onnx(work / "minilm.onnx", dynamo=True)
    calib, held_out = minilm.calibration_and_eval_sentences(args.calib, args.eval)
    calib_path = minilm.write_calibration(work / "calib.npz", calib)
    tokens = minilm.tokenize(held_out)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    reference = minilm.embed_with(lambda f: session.run(None, f)[0], tokens)
    learn = f"learn-quant{{steps={args.steps},samples={args.calib},valid_mask=attention_mask}}"
    rows = []
    for preset in ("w8a8", "w4a8"):
        spec = PRESETS[preset].spec
        for name, pipeline in ((f"{preset} (calibrated)", spec),
                               (f"{preset} + learn-quant", spec.replace(",settle-qdq", f",{learn},settle-qdq"))):
            model = qcompiler.load_onnx(model_path)
            ctx = PassContext(calibration=CalibrationData.from_path(calib_path).bind(input_specs(model)))
            start = time.perf_counter()
            run_pipeline(Pipeline.parse(pipeline), model, ctx)
            seconds = time.perf_counter() - start
            run = qcompiler.ReferenceInterpreter(model).run
            embeddings = minilm.embed_with(lambda f, run=run: run(f)["last_hidden_state"], tokens)
            learning = ctx.report.get("learning", {})
            row = {"pipeline": name, "cosine": minilm.mean_cosine(reference, embeddings),
                   "compile_s": round(seconds, 1), "learning_s": learning.get("seconds"),
                   "loss_before": learning.get("loss_before"), "loss_after": learning.get("loss_after"),
                   "kept": learning.get("kept")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nMiniLM, {args.calib} calibration sentences, {len(held_out)} held-out; "
          f"{platform.processor() or platform.machine()}, 2 threads")
    print(f"{'pipeline':28s} {'cosine':>8s} {'compile s':>10s} {'learning s':>11s} {'loss before→after':>22s}")
    for r in rows:
        losses = "" if r["loss_before"] is None else f"{r['loss_before']:.4g}→{r['loss_after']:.4g}"
        print(f"{r['pipeline']:28s} {r['cosine']:8.4f} {r['compile_s']:10.1f} {r['learning_s'] or 0:11.1f} {losses:>22s}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
