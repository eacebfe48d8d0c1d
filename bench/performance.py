"""Latency of qcompiler's host builds against onnxruntime and torch, measured side by side.

Models: all-MiniLM-L6-v2 (batch 1, seq 128) and the digits CNN
(``qcompiler.examples.digits_cnn``, 1×1×8×8). Contenders, all with 2 threads
(``TVM_NUM_THREADS``, ORT ``intra_op_num_threads``, ``torch.set_num_threads``):

    qcompiler host int8 (w8a8)   qcompile --target host --preset w8a8 (integer-only graph)
    qcompiler host float         qcompile --target host --preset float
    qcompiler … (w8a8, tuned)    with --tune TRIALS: compiled against a warm tuning database
    ORT FP32                     onnxruntime on the FP32 model
    ORT int8 dynamic             onnxruntime.quantization.quantize_dynamic
    ORT int8 static QDQ          quantize_static, per-channel weights, MinMax
    torch FP32                   the torch module (MiniLM: transformers; CNN: the trained net)
    torch int8 dynamic           torch.ao.quantization.quantize_dynamic on nn.Linear

Two ways to run them (``--mode``); the table gives the median and min–max in ms and
the ratio of medians to ORT FP32 and to ORT's fastest int8 mode, from the same run:

* ``interleaved`` (default): A B C … A B C … in one process after a warm-up, so every
  contender sees the same machine state. No thread pool may spin-wait between calls
  (``OMP_WAIT_POLICY=PASSIVE``, ``TVM_THREAD_POOL_SPIN_COUNT=0``, ORT
  ``session.intra_op.allow_spinning=0``), or it would steal the next contender's cores;
  every parallel region then pays for waking its worker threads.
* ``blocks``: each contender runs its calls back to back, with the runtimes' default
  thread settings (worker threads spin between parallel regions, as in a service that
  runs one model), and a pause between blocks so that the previous one's spinning
  threads have gone to sleep. Each block is warmed up for at least 0.25 s before its
  timed calls (a few calls after the pause still run with a cold machine: a 0.08 ms
  GEMM measured twice as slow after 3 warm-up calls). The contenders take turns in 4
  rounds of blocks (a quarter of the runs each), so that a slow spell of a shared machine
  does not hit only one.

Also:

* int8 GEMM micro-benchmark: ``MatMulInteger`` (u8 activations × s8 constant weights →
  int32) built by the host target for M=128 and (K, N) in (384, 1536), (1536, 384),
  against onnxruntime's MatMulInteger; GOPS = 2·M·N·K / time and the fraction of this
  CPU's int8 peak, measured by ``bench/int8_peak.c`` (a ``vpdpbusd`` / ``sdot`` loop;
  on CPUs with AMX, onnxruntime's MLAS uses the tile unit, which is faster than that peak).
* the artifact runner's per-call overhead: the median difference between
  ``qcompiler.load(out).run`` and, right after it, calling
  the VM's ``main`` with tensors made once.
* compile time and peak RSS of ``qcompile`` on MiniLM (w8a8, host, no tuning).

    python bench/performance.py [--runs 30] [--models minilm,cnn] [--mode blocks] [--tune 200]
                                [--work DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

THREADS = 2
os.environ["TVM_NUM_THREADS"] = str(THREADS)
os.environ["OMP_NUM_THREADS"] = str(THREADS)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
#: "interleaved" or "blocks" (set by main before any runtime starts its threads).
MODE = "interleaved"
#: Seconds between two blocks in blocks mode: spinning workers go to sleep before that.
BLOCK_PAUSE_S = 2.0
#: Blocks mode warms each block up for at least this long (and at least ``warmup`` calls):
#: after the pause a few calls are not enough to bring the machine back to its steady state.
BLOCK_WARMUP_S = 0.25
#: Blocks mode cycles through the contenders this many times, each block a share of the runs.
BLOCK_ROUNDS = 4
#: ``--tune TRIALS``: also measure a w8a8 build compiled against a warm tuning database.
TUNE_TRIALS = 0


def set_mode(mode: str) -> None:
    """Thread-pool settings for ``mode``; must run before TVM, ORT or torch start threads."""
    global MODE
    MODE = mode
    if mode == "interleaved":
        # No runtime busy-waits for work between calls: with interleaved runs on a few cores
        # a spinning thread pool (ORT's, OpenMP's, TVM's) would steal the next contender's cores.
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ["TVM_THREAD_POOL_SPIN_COUNT"] = "0"

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_minilm import ort_dynamic, ort_static  # noqa: E402
from machine import cpu_name  # noqa: E402

HERE = Path(__file__).resolve().parent
ORT_INT8 = ("ORT int8 dynamic", "ORT int8 static QDQ")


# -- measurement ------------------------------------------------------------------------------


def measure(contenders: dict[str, Callable[[], object]], runs: int, warmup: int = 3) -> dict[str, dict]:
    """Time every contender ``runs`` times (round-robin, or in blocks: see MODE); ms statistics."""
    times: dict[str, list[float]] = {name: [] for name in contenders}

    def timed(name: str, fn: Callable[[], object]) -> None:
        start = time.perf_counter()
        fn()
        times[name].append((time.perf_counter() - start) * 1e3)

    if MODE == "blocks":  # rounds of blocks, so that a slow spell of the machine hits everyone
        for round_ in range(BLOCK_ROUNDS):
            share = runs // BLOCK_ROUNDS + (round_ < runs % BLOCK_ROUNDS)
            for name, fn in contenders.items():
                time.sleep(BLOCK_PAUSE_S)
                start, calls = time.perf_counter(), 0
                while calls < warmup or time.perf_counter() - start < BLOCK_WARMUP_S:
                    fn()
                    calls += 1
                for _ in range(share):
                    timed(name, fn)
    else:
        for fn in contenders.values():
            for _ in range(warmup):
                fn()
        for _ in range(runs):
            for name, fn in contenders.items():
                timed(name, fn)
    return {
        name: {"median_ms": float(np.median(t)), "min_ms": float(np.min(t)), "max_ms": float(np.max(t)), "runs": len(t)}
        for name, t in times.items()
    }


def paired_overhead(slow: Callable[[], object], fast: Callable[[], object], pairs: int) -> dict:
    """Median of ``t(slow) − t(fast)`` over back-to-back pairs of calls (ms), the order
    alternating: two calls of the same model a moment apart see the same machine state,
    unlike two separate medians."""
    for _ in range(3):
        slow(), fast()
    diffs = []
    for pair in range(pairs):
        first, second = (slow, fast) if pair % 2 == 0 else (fast, slow)
        start = time.perf_counter()
        first()
        middle = time.perf_counter()
        second()
        took = middle - start, time.perf_counter() - middle
        diffs.append(took[0] - took[1] if pair % 2 == 0 else took[1] - took[0])
    return {"median_ms": float(np.median(diffs) * 1e3), "pairs": pairs}


def add_ratios(stats: dict[str, dict]) -> None:
    base = stats.get("ORT FP32", {}).get("median_ms")
    int8 = [stats[n]["median_ms"] for n in ORT_INT8 if n in stats]
    best_int8 = min(int8) if int8 else None
    for entry in stats.values():
        entry["vs_ort_fp32"] = entry["median_ms"] / base if base else None
        entry["vs_ort_best_int8"] = entry["median_ms"] / best_int8 if best_int8 else None


def table(title: str, stats: dict[str, dict], skipped: dict[str, str]) -> str:
    lines = [f"\n{title}", f"{'contender':<34} {'median ms':>10} {'min-max ms':>17} {'×ORT FP32':>10} {'×ORT int8':>10}"]
    for name, s in stats.items():
        ratio = lambda r: f"{r:.2f}" if r is not None else "-"  # noqa: E731
        span = f"{s['min_ms']:.2f}-{s['max_ms']:.2f}"
        lines.append(f"{name:<34} {s['median_ms']:>10.2f} {span:>17} {ratio(s['vs_ort_fp32']):>10} {ratio(s['vs_ort_best_int8']):>10}")
    for name, why in skipped.items():
        lines.append(f"{name:<34} skipped: {why}")
    return "\n".join(lines)


#: Runs a command as its child and prints the child's peak RSS (KiB) to stdout. Measured
#: through this small parent because a process forked from a large one (this script, with
#: torch and TVM loaded) inherits that process's high-water mark across exec.
_RSS_WRAPPER = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
sys.stderr.write(done.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(done.returncode)
"""


def qcompile(*args) -> dict:
    """Run the ``qcompile`` command; wall time and its peak RSS."""
    exe = Path(sys.executable).with_name("qcompile")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, str(exe), *map(str, args), "--force"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"qcompile {' '.join(map(str, args))} failed: {done.stderr.strip()}")
    return {"seconds": seconds, "peak_rss_mb": int(done.stdout.split()[-1]) / 1024}


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if MODE == "interleaved":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_call(path: Path, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    session = ort_session(path)
    return lambda: session.run(None, feeds)


def qcompiler_call(out: Path, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    import qcompiler

    runner = qcompiler.load(out)
    return lambda: runner.run(feeds)


def raw_vm_call(out: Path, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    """``main`` of a host artifact called with device tensors made once: no conversions."""
    import tvm
    from tvm import relax

    manifest = json.loads((out / "manifest.json").read_text())
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(out / manifest["target_info"]["library"])), tvm.cpu())
    args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[i["name"]])) for i in manifest["inputs"]]
    main = vm["main"]
    return lambda: main(*args)


def torch_calls(module, feeds: dict[str, np.ndarray]) -> dict[str, Callable[[], object]]:
    import warnings

    import torch

    torch.set_num_threads(THREADS)
    tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}

    def call(m):
        def run():
            with torch.inference_mode():
                return m(**tensors)

        return run

    calls = {"torch FP32": call(module)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        int8 = quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)
        calls["torch int8 dynamic"] = call(int8)
    return calls


# -- models -----------------------------------------------------------------------------------


def bench_model(name: str, onnx_path: Path, calib: Path, feeds: dict, torch_module, work: Path, runs: int) -> dict:
    print(f"== {name}: building contenders", flush=True)
    compiles = {}
    for preset in ("w8a8", "float"):
        out = work / f"{name}_host_{preset}"
        extra = ["--calib", calib] if preset == "w8a8" else []
        compiles[preset] = qcompile(onnx_path, "--target", "host", "--preset", preset, "-o", out, *extra)
        print(f"   qcompile host {preset}: {compiles[preset]['seconds']:.1f} s, "
              f"peak RSS {compiles[preset]['peak_rss_mb']:.0f} MB", flush=True)
    calib_tokens = dict(np.load(calib))
    contenders = {
        "qcompiler host int8 (w8a8)": qcompiler_call(work / f"{name}_host_w8a8", feeds),
        "qcompiler host float": qcompiler_call(work / f"{name}_host_float", feeds),
        "ORT FP32": ort_call(onnx_path, feeds),
    }
    if TUNE_TRIALS:  # tune into a fresh database, then the build measured: a warm compile (no trials)
        database = work / f"{name}_tuning"
        shutil.rmtree(database, ignore_errors=True)
        for stage in ("cold", "warm"):
            out = work / f"{name}_host_w8a8_tuned_{stage}"
            compiles[f"w8a8 tuned ({stage} database)"] = qcompile(
                onnx_path, "--target", "host", "--preset", "w8a8", "--calib", calib, "-o", out,
                "--tune", TUNE_TRIALS, "--tuning-db", database,
            )
            print(f"   qcompile host w8a8 --tune {TUNE_TRIALS} ({stage} database): "
                  f"{compiles[f'w8a8 tuned ({stage} database)']['seconds']:.1f} s", flush=True)
        contenders["qcompiler host int8 (w8a8, tuned)"] = qcompiler_call(out, feeds)
    skipped = {}
    qwork = work / f"{name}_ort"
    qwork.mkdir(exist_ok=True)
    try:
        contenders["ORT int8 dynamic"] = ort_call(ort_dynamic(onnx_path, qwork), feeds)
    except Exception as exc:  # noqa: BLE001 - a contender that cannot be built is reported, not fatal
        skipped["ORT int8 dynamic"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    try:
        contenders["ORT int8 static QDQ"] = ort_call(ort_static(onnx_path, calib_tokens, "MinMax", qwork), feeds)
    except Exception as exc:  # noqa: BLE001
        skipped["ORT int8 static QDQ"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    contenders.update(torch_calls(torch_module, feeds))
    print(f"== {name}: {runs} runs ({MODE}) of {len(contenders)} contenders", flush=True)
    stats = measure(contenders, runs)
    add_ratios(stats)
    overhead = paired_overhead(contenders["qcompiler host int8 (w8a8)"], raw_vm_call(work / f"{name}_host_w8a8", feeds), 4 * runs)
    per_call = overhead["median_ms"]
    print(table(f"{name} (batch 1, {THREADS} threads, {MODE})", stats, skipped))
    print(f"runner per-call overhead: {per_call:.3f} ms "
          f"({100 * per_call / max(stats['qcompiler host int8 (w8a8)']['median_ms'], 1e-9):.1f} % of the int8 latency)")
    return {"latency": stats, "skipped": skipped, "compile": compiles, "runner_overhead_ms": per_call,
            "runner_overhead": overhead}


def minilm(work: Path, runs: int) -> dict:
    from qcompiler.examples import minilm as example

    model = work / "minilm.onnx"
    if not model.exists():
        example.export_onnx(model)
    calib_sentences, held_out = example.calibration_and_eval_sentences(64, 1)
    calib = example.write_calibration(work / "minilm_calib.npz", calib_sentences)
    tokens = example.tokenize(held_out)
    feeds = {name: tokens[name][0] for name in example.INPUT_NAMES}
    return bench_model("MiniLM", model, calib, feeds, example.torch_encoder(), work, runs)


def cnn(work: Path, runs: int) -> dict:
    import torch

    from qcompiler.examples import digits_cnn

    model = digits_cnn.export_onnx(work / "digits_cnn.onnx")
    calib = digits_cnn.write_calibration(work / "digits_calib.npz")
    images, _ = digits_cnn.held_out()
    feeds = {digits_cnn.INPUT_NAME: np.ascontiguousarray(images[:1])}
    net = digits_cnn.trained_network()

    class Named(torch.nn.Module):  # keyword input, like the other contenders' feeds
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, **inputs):
            return self.net(inputs[digits_cnn.INPUT_NAME])

    return bench_model("digits CNN", model, calib, feeds, Named().eval(), work, runs)


# -- int8 GEMM --------------------------------------------------------------------------------


def int8_peak(work: Path) -> dict | None:
    """This CPU's int8 peak (GOPS, THREADS threads) from bench/int8_peak.c, or None."""
    machine = platform.machine()
    flags = {"x86_64": ["-mavx512f", "-mavx512bw", "-mavx512vnni"], "aarch64": ["-march=armv8.2-a+dotprod"]}.get(machine)
    cc = shutil.which("gcc")
    if flags is None or cc is None:
        return None
    exe = work / "int8_peak"
    built = subprocess.run([cc, "-O3", *flags, "-pthread", str(HERE / "int8_peak.c"), "-o", str(exe)], capture_output=True, text=True)
    if built.returncode != 0:
        return None
    best = None
    for _ in range(3):
        done = subprocess.run([str(exe), str(THREADS)], capture_output=True, text=True)
        if done.returncode != 0:  # SIGILL: the CPU lacks the instruction
            return None
        gops = float(done.stdout.split()[-1])
        best = gops if best is None else max(best, gops)
    return {"gops": best, "instruction": "vpdpbusd" if machine == "x86_64" else "sdot", "threads": THREADS}


def gemm_model(m: int, k: int, n: int):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, size=(k, n), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w", "za", "zw"], ["y"], name="gemm")],
        f"gemm_{m}x{k}x{n}",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.uint8(128), "za"),
         numpy_helper.from_array(np.int8(0), "zw")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def gemm(work: Path, runs: int) -> dict:
    import onnx

    import qcompiler

    peak = int8_peak(work)
    rows = {}
    m = 128
    for k, n in ((384, 1536), (1536, 384)):
        path = work / f"gemm_{m}x{k}x{n}.onnx"
        onnx.save(gemm_model(m, k, n), str(path))
        out = work / f"gemm_{m}x{k}x{n}_host"
        qcompile(path, "--target", "host", "--preset", "float", "-o", out)
        a = np.random.default_rng(1).integers(0, 256, size=(m, k), dtype=np.uint8)
        feeds = {"a": a}
        want = ort_session(path).run(None, feeds)[0]
        got = qcompiler.load(out).run(feeds)["y"]
        if not np.array_equal(want, got):
            raise AssertionError(f"int8 GEMM {m}x{k}x{n}: host output differs from onnxruntime")
        stats = measure({"qcompiler host": raw_vm_call(out, feeds), "ORT MatMulInteger": ort_call(path, feeds)}, runs)
        ops = 2.0 * m * n * k
        entry = {}
        for name, s in stats.items():
            gops = ops / (s["median_ms"] * 1e-3) * 1e-9
            entry[name] = {**s, "gops": gops, "fraction_of_peak": gops / peak["gops"] if peak else None}
        rows[f"M={m} K={k} N={n}"] = entry
    print(f"\nint8 GEMM (u8×s8→s32, {THREADS} threads, {MODE}); peak "
          + (f"{peak['gops']:.0f} GOPS ({peak['instruction']} loop)" if peak else "not measured (no VNNI/dotprod)"))
    print(f"{'shape':<22} {'kernel':<20} {'median ms':>10} {'GOPS':>8} {'of peak':>8}")
    for shape, entry in rows.items():
        for name, s in entry.items():
            frac = f"{100 * s['fraction_of_peak']:.0f} %" if s["fraction_of_peak"] is not None else "-"
            print(f"{shape:<22} {name:<20} {s['median_ms']:>10.3f} {s['gops']:>8.1f} {frac:>8}")
    return {"peak": peak, "gemm": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="timed runs per contender")
    parser.add_argument("--models", default="minilm,cnn,gemm", help="comma-separated: minilm, cnn, gemm")
    parser.add_argument("--work", help="working folder (default: a temporary one, removed at the end)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--mode", choices=("interleaved", "blocks"), default="interleaved",
                        help="interleaved runs without spinning thread pools, or each contender's runs back to back "
                             "with default (spinning) thread pools")
    parser.add_argument("--tune", type=int, default=0, metavar="TRIALS",
                        help="also measure a w8a8 build tuned with this many MetaSchedule trials "
                             "(tuned into a fresh database, then compiled again with it warm)")
    args = parser.parse_args(argv)
    global TUNE_TRIALS
    TUNE_TRIALS = args.tune
    set_mode(args.mode)
    print(f"== {cpu_name()}, {os.cpu_count()} logical CPUs, {THREADS} threads per contender", flush=True)
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(chosen) - {"minilm", "cnn", "gemm"})
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from minilm, cnn, gemm")
    temp = None if args.work else tempfile.TemporaryDirectory()
    work = Path(args.work or temp.name)
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpu": cpu_name(), "threads": THREADS}, "mode": args.mode, "tune_trials": args.tune}
    try:
        for name in chosen:
            results[name] = {"minilm": minilm, "cnn": cnn, "gemm": gemm}[name](work, args.runs)
    finally:
        if temp is not None:
            temp.cleanup()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
