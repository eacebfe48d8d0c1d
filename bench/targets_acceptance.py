"""Acceptance run of every target on real models: build, run, compare bit for bit.

For all-MiniLM-L6-v2 (dynamo export, batch 1 × seq 128, ``--preset w8a8`` calibrated on
16 sentences of gensim's lee_background.cor) and the digits CNN
(``qcompiler.examples.digits_cnn``, trained here in seconds), it runs

    qcompile MODEL --target T --calib CALIB --preset w8a8 -o OUT_T

for T in reference, host, npu-sim, fpga-sim, arm-neon{dotprod=true}, cuda{arch=sm_80}
and cuda{arch=sm_90}; runs every runnable artifact on held-out inputs (20 sentences;
all 450 held-out digits) and compares the outputs with the reference interpreter's
integer-stage outputs (the ``reference`` artifact). It also checks that the sdot build
dies with SIGILL under ``qemu -cpu cortex-a53``, compiles the CUDA sources with nvcc,
and prints one table per model:

    target | built s | bit-exact | max |diff| | ms/inference | notes (sdot per kernel, cost totals, nvcc)

    python bench/targets_acceptance.py [--work DIR] [--sentences 20] [--targets host,npu-sim,...] [--json out.json]

Times are wall clock on this machine; arm-neon's are emulated (qemu-user) calls of
``main`` inside one emulator process, fpga-sim's a whole C-simulation process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = ("host", "npu-sim", "fpga-sim", "arm-neon{dotprod=true}", "cuda{arch=sm_80}", "cuda{arch=sm_90}")


def qcompile(*args) -> float:
    """Run the real ``qcompile`` command; returns its wall time."""
    exe = Path(sys.executable).with_name("qcompile")
    start = time.perf_counter()
    done = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"qcompile {' '.join(map(str, args))} failed:\n{done.stderr.strip()}")
    return time.perf_counter() - start


def folder(work: Path, spec: str) -> Path:
    return work / ("out_" + spec.replace("{", "_").replace("}", "").replace("=", "-").replace(",", "_"))


def run_target(out: Path, feeds: list[dict]) -> tuple[list[dict], list[float]]:
    """Outputs and per-inference seconds (arm-neon: emulated calls of main, one process)."""
    import qcompiler

    runner = qcompiler.load(out)
    if hasattr(runner, "run_many"):
        outputs = runner.run_many(feeds)
        return outputs, [us * 1e-6 for us in runner.last_run_us]
    runner.run(feeds[0])  # warm up (loads the library)
    outputs, times = [], []
    for f in feeds:
        start = time.perf_counter()
        outputs.append(runner.run(f))
        times.append(time.perf_counter() - start)
    return outputs, times


def compare(expected: list[dict], got: list[dict]) -> tuple[bool, float]:
    exact, diff = True, 0.0
    for want, have in zip(expected, got, strict=True):
        for key, value in want.items():
            exact &= have[key].dtype == value.dtype and np.array_equal(have[key], value)
            diff = max(diff, float(np.max(np.abs(have[key].astype(np.float64) - value.astype(np.float64)))))
    return exact, diff


def notes_for(spec: str, out: Path) -> tuple[str, dict]:
    info = json.loads((out / "manifest.json").read_text())["target_info"]
    if spec.startswith("npu-sim"):
        t = info["cost_total"]
        return (f"npu: {t['cycles']:,} cycles ({t['latency_ms']} ms at 1 GHz), {t['energy_uj']} uJ, "
                f"{_bytes(t['bytes_moved'])} moved, {t['layers']} layers in cost.json"), {"cost_total": t}
    if spec.startswith("fpga-sim"):
        t = info["resources"]["total"]
        return (f"fpga: DSP {t['dsp']}, BRAM18 {t['bram18']}, LUT {t['lut']:,}, {t['latency_cycles']:,} cycles "
                f"({t['latency_us'] / 1e3:.1f} ms at 200 MHz), {len(info['resources']['layers'])} layers in resources.json"), {"resources_total": t}
    if spec.startswith("arm-neon"):
        sdot = info["matmul_kernel_sdot"]
        text = (f"{len(sdot)} int8 matmul kernels, sdot each: {sorted(sdot.values())}, total {info['sdot_total']}; "
                f"fallback {len(info['int8_matmul_fallback'])}, other matmul kernels {len(info['other_matmul_kernels'])}")
        return text, {"matmul_kernel_sdot": sdot, "sdot_total": info["sdot_total"]}
    if spec.startswith("cuda"):
        nvcc = info.get("nvcc")
        if nvcc is None:
            return f"{info['kernels']} kernels; nvcc not installed", {}
        return (f"{info['kernels']} CUDA kernels; nvcc {nvcc['arch']} cubin {nvcc['cubin_bytes']:,} B, "
                f"PTX dp4a {nvcc['ptx']['dp4a']}, mma {nvcc['ptx']['mma']}"), {"nvcc": nvcc}
    return "", {}


def _bytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def sigill_check(out: Path, feeds: dict) -> str:
    from qcompiler.errors import TargetError
    from qcompiler.targets.arm_neon import QemuRunner

    manifest = json.loads((out / "manifest.json").read_text())
    try:
        QemuRunner(out, manifest, cpu="cortex-a53").run(feeds)
    except TargetError as exc:
        return "SIGILL on cortex-a53" if "SIGILL" in str(exc) else f"cortex-a53: {exc}"
    return "cortex-a53 ran it (no SIGILL!)"


def bench_model(name: str, onnx_path: Path, calib: Path, feeds: list[dict], work: Path, targets) -> dict:
    rows = []
    print(f"\n== {name}: compiling reference ...", flush=True)
    built = qcompile(onnx_path, "--target", "reference", "--calib", calib, "--preset", "w8a8", "-o", folder(work, "reference"), "--force")
    expected, ref_times = run_target(folder(work, "reference"), feeds)
    rows.append({"target": "reference", "built_s": built, "bit_exact": True, "max_diff": 0.0,
                 "ms": 1e3 * float(np.median(ref_times)), "notes": "reference interpreter (numpy)"})
    for spec in targets:
        out = folder(work, spec)
        print(f"== {name}: compiling {spec} ...", flush=True)
        try:
            built = qcompile(onnx_path, "--target", spec, "--calib", calib, "--preset", "w8a8", "-o", out, "--force")
        except RuntimeError as exc:
            rows.append({"target": spec, "built_s": None, "bit_exact": None, "max_diff": None, "ms": None, "notes": str(exc)[-300:]})
            continue
        notes, extra = notes_for(spec, out)
        row = {"target": spec, "built_s": built, "notes": notes, **extra}
        if spec.startswith("cuda") and not _gpu():
            row.update(bit_exact=None, max_diff=None, ms=None)
            row["notes"] += "; running needs a GPU (none here)"
        else:
            got, times = run_target(out, feeds)
            exact, diff = compare(expected, got)
            row.update(bit_exact=exact, max_diff=diff, ms=1e3 * float(np.median(times)))
            if spec.startswith("arm-neon") and "dotprod" in spec:
                row["notes"] += f"; ran on neoverse-n1, {sigill_check(out, feeds[0])}"
            row["outputs"] = got
        rows.append(row)
    print_table(name, len(feeds), rows)
    return {"rows": rows, "expected": expected}


def _gpu() -> bool:
    from qcompiler.targets import tvm_bridge

    return shutil.which("nvidia-smi") is not None and tvm_bridge.cuda_available()


def print_table(name: str, n: int, rows: list[dict]) -> None:
    print(f"\n{name} ({n} held-out inputs)")
    print(f"{'target':<24} {'built s':>8} {'bit-exact':>9} {'max|diff|':>10} {'ms/inf':>9}  notes")
    for r in rows:
        exact = "n/a" if r["bit_exact"] is None else ("yes" if r["bit_exact"] else "NO")
        diff = "n/a" if r["max_diff"] is None else f"{r['max_diff']:.3g}"
        ms = "n/a" if r["ms"] is None else f"{r['ms']:.3g}"
        built = "-" if r["built_s"] is None else f"{r['built_s']:.1f}"
        print(f"{r['target']:<24} {built:>8} {exact:>9} {diff:>10} {ms:>9}  {r['notes']}")


def minilm_case(work: Path, sentences: int, calib_samples: int):
    from qcompiler.examples import minilm

    model = work / "minilm" / "minilm.onnx"
    if not model.exists():
        minilm.export_onnx(model, dynamo=True)
    calib, held_out = minilm.calibration_and_eval_sentences(calib_samples, sentences)
    calib_path = minilm.write_calibration(work / "minilm_calib.npz", calib)
    tokens = minilm.tokenize(held_out)
    feeds = [{k: tokens[k][i] for k in minilm.INPUT_NAMES} for i in range(len(held_out))]
    return model, calib_path, feeds


def digits_case(work: Path):
    from qcompiler.examples import digits_cnn

    model = digits_cnn.export_onnx(work / "digits" / "digits_cnn.onnx")
    calib = digits_cnn.write_calibration(work / "digits_calib.npz")
    images, labels = digits_cnn.held_out()
    feeds = [{digits_cnn.INPUT_NAME: images[i : i + 1]} for i in range(len(images))]
    return model, calib, feeds, images, labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="working folder (default: a temporary one, removed at the end)")
    parser.add_argument("--sentences", type=int, default=20, help="held-out MiniLM sentences")
    parser.add_argument("--calib-samples", type=int, default=16, help="MiniLM calibration sentences")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated target specs ('|' separates options)")
    parser.add_argument("--models", default="minilm,digits", help="minilm, digits or both")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    targets = [t.replace("|", ",") for t in args.targets.split(",") if t]
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="qc-acceptance-")
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    report = {}
    try:
        if "minilm" in args.models:
            model, calib, feeds = minilm_case(work / "minilm", args.sentences, args.calib_samples)
            result = bench_model("all-MiniLM-L6-v2 w8a8", model, calib, feeds, work / "minilm", targets)
            report["minilm"] = _strip(result["rows"])
        if "digits" in args.models:
            from qcompiler.examples import digits_cnn

            model, calib, feeds, images, labels = digits_case(work / "digits")
            result = bench_model("digits CNN w8a8", model, calib, feeds, work / "digits", targets)
            fp32 = digits_cnn.top1(digits_cnn.fp32_logits(images))
            quantized = digits_cnn.top1(np.stack([e[digits_cnn.OUTPUT_NAME][0] for e in result["expected"]]))
            top1 = {
                "fp32_accuracy": float(np.mean(fp32 == labels)),
                "w8a8_accuracy": float(np.mean(quantized == labels)),
                "top1_agreement_with_fp32": float(np.mean(quantized == fp32)),
                "held_out": int(len(labels)),
            }
            for row in result["rows"]:  # every bit-exact target has exactly the reference's top-1
                if row.get("outputs") is not None:
                    got = digits_cnn.top1(np.stack([o[digits_cnn.OUTPUT_NAME][0] for o in row["outputs"]]))
                    row["top1_agreement_with_fp32"] = float(np.mean(got == fp32))
            print(f"\ndigits CNN top-1 on {top1['held_out']} held-out digits: FP32 accuracy {top1['fp32_accuracy']:.4f}, "
                  f"w8a8 accuracy {top1['w8a8_accuracy']:.4f}, agreement with FP32 {top1['top1_agreement_with_fp32']:.4f}")
            for row in result["rows"]:
                if "top1_agreement_with_fp32" in row:
                    print(f"  {row['target']:<24} top-1 agreement with FP32 {row['top1_agreement_with_fp32']:.4f}")
            report["digits"] = {"rows": _strip(result["rows"]), "top1": top1}
    finally:
        if tmp is not None:
            tmp.cleanup()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=float) + "\n")
    failures = [r["target"] for rows in (report.get("minilm", []), report.get("digits", {}).get("rows", [])) for r in rows
                if r["bit_exact"] is False or r["built_s"] is None]
    if failures:
        print(f"\nFAILED: {', '.join(failures)}")
    return 1 if failures else 0


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "outputs"} for r in rows]


if __name__ == "__main__":
    sys.exit(main())
