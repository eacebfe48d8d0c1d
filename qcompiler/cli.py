"""``qcompile``: the command line.

Exit status: 0 success, 2 a problem with the input (one line on stderr), 1 a bug in
qcompiler (one line with a hint; ``--debug`` shows the traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from pathlib import Path

from .errors import InputError, PassFailure, QCompilerError, ShapeError, UnsafeModelError, UserError

PROG = "qcompile"


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, status 2
        raise UserError(f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog=PROG,
        description="Quantize and compile an ONNX model for an edge target.",
        epilog=(
            "Calibration data (--calib): a .npz file whose arrays are keyed by model input name, "
            "each of shape (N, *input_shape), or a folder of such files. Without --calib and "
            "without --preset/--pipeline, weights are quantized to int8 without data and "
            "activations stay float."
        ),
    )
    parser.add_argument("model", nargs="?", help="ONNX model file")
    parser.add_argument("--target", "-t", help="target spec, e.g. host or arm-neon{dotprod=true}")
    parser.add_argument("-o", "--output", dest="out_dir", help="output folder (must not exist or be empty)")
    parser.add_argument("--calib", help="calibration data: .npz file or folder of .npz files")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--preset", help="named pipeline (see --list-passes)")
    how.add_argument("--pipeline", help="pipeline spec, e.g. 'fold-constants,quantize-weights{format=int4:per-group:32}'")
    parser.add_argument(
        "--stop-stage", choices=["float", "fakequant", "integer"],
        help="stop the pipeline once the model reaches this stage (e.g. fakequant: keep the QDQ model; "
             "compile it again later from model.qdq.onnx)",
    )
    parser.add_argument(
        "--input-shape", action="append", default=[], metavar="NAME=DIMS",
        help="pin an input's shape, e.g. input_ids=1x128 (repeatable)",
    )
    parser.add_argument(
        "--input-value", action="append", default=[], metavar="NAME=VALUE",
        help="make an input a constant, e.g. sr=16000 (VALUE: a number filling the input, or V1,V2,...); "
             "control flow decided by it is compiled for that value (repeatable)",
    )
    parser.add_argument("--report", action="store_true", help="write report.json (and report.html) into the output")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed for anything random (default 0)")
    parser.add_argument(
        "--no-verify", action="store_true",
        help="do not run the build against the reference interpreter (by default every build is checked)",
    )
    parser.add_argument(
        "--verify-samples", type=int, default=2, metavar="N",
        help="inputs the build is checked on (calibration samples, else generated; default 2)",
    )
    tune = parser.add_argument_group("tuning (host target)")
    tune.add_argument(
        "--tune", type=_trials, default=0, metavar="TRIALS",
        help="tune the CPU kernels with TVM MetaSchedule, measuring TRIALS candidates in all "
        "(default 0: no tuning); kernels already in the tuning database are not tuned again",
    )
    tune.add_argument(
        "--tuning-db", metavar="DIR",
        help="tuning database folder (default $QCOMPILER_TUNING_DB, else "
        "$XDG_CACHE_HOME/qcompiler/tuning, i.e. ~/.cache/qcompiler/tuning); "
        "with --tune 0 the records found there are still used",
    )
    scale = parser.add_argument_group("scale-out (needs Ray: pip install 'qcompiler[cluster]')")
    scale.add_argument(
        "--cluster", metavar="SPEC",
        help="compute calibration statistics on a Ray cluster: local:N (start one with N workers) or "
        "ray://HOST:PORT (join one); the output files are the same as without it",
    )
    scale.add_argument(
        "--jobs", metavar="FILE",
        help="compile every job of a TOML file ([[job]] tables: model, target, output, preset/pipeline, calib, ...) "
        "and print a summary; the exit status is the number of failed jobs",
    )
    diag = parser.add_argument_group("diagnostics")
    diag.add_argument("--time-passes", action="store_true", help="print the time each pass took")
    diag.add_argument("--print-ir-after-change", action="store_true", help="print the IR (stderr) after each pass that changed it")
    diag.add_argument("--verify-each", action="store_true", help="verify the IR after every pass")
    diag.add_argument("--check-numerics", action="store_true", help="run the reference interpreter around every pass and report error/SQNR")
    diag.add_argument("--reproducer-dir", help="where to save a reproducer if a pass crashes")
    diag.add_argument("--debug", action="store_true", help="show Python tracebacks and warnings")
    parser.add_argument("--list-passes", action="store_true", help="list passes, their options, and presets")
    parser.add_argument("--list-targets", action="store_true", help="list targets")
    parser.add_argument(
        "--setup", metavar="TARGET", choices=["arm-neon"],
        help="install what a target needs outside Python (arm-neon: cross toolchain, qemu, aarch64 TVM runtime)",
    )
    parser.add_argument("--version", action="store_true", help="print the version")
    return parser


def _trials(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of trials, got {_shorten(text)!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"the number of trials must be 0 or more, got {value}")
    return value


def parse_input_values(items: list[str]) -> dict[str, list[float]]:
    from .specialize import parse_input_value

    values: dict[str, list[float]] = {}
    for item in items:
        name, numbers = parse_input_value(item)
        if name in values:
            raise InputError(f"--input-value gives {name!r} twice")
        values[name] = numbers
    return values


def parse_input_shapes(items: list[str]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.rpartition("=")
        dims = dims.strip()
        shown = _shorten(item)
        if not sep or not name or not re.fullmatch(r"[-+]?\d+([x,][-+]?\d+)*", dims):
            raise ShapeError(f"--input-shape {shown!r}: expected NAME=DIMS such as input_ids=1x128")
        parts = re.split(r"[x,]", dims)
        if any(part.startswith("-") for part in parts):
            raise ShapeError(f"--input-shape {shown!r}: dimensions must be positive integers")
        for part in parts:
            if len(part.lstrip("+0")) > 18:  # beyond int64 long before int() would refuse it
                raise ShapeError(f"--input-shape {shown!r}: dimension {_shorten(part, 24)} is too large")
        if name in shapes:
            raise ShapeError(f"--input-shape gives {name!r} twice")
        shapes[name] = tuple(int(d) for d in parts)
    return shapes


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _list_passes(out) -> None:
    from .pipeline import default_registry, describe
    from .presets import PRESETS

    print("Passes:", file=out)
    for cls in default_registry():
        print("  " + describe(cls).replace("\n", "\n  "), file=out)
    print("\nPresets (--preset NAME is the same as --pipeline SPEC):", file=out)
    for preset in PRESETS.values():
        needs = " [needs --calib]" if preset.needs_calibration else ""
        print(f"  {preset.name}: {preset.summary}{needs}\n      {preset.spec}", file=out)


def _list_targets(out) -> None:
    from .pipeline import describe
    from .target import default_targets

    print("Targets:", file=out)
    for cls in default_targets():
        print("  " + describe(cls).replace("\n", "\n  "), file=out)
        print(f"      executes: {cls.capabilities.describe()}", file=out)


def run(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "generate":  # qcompile generate OUT ...: a decoder artifact
        from .cli_generate import run_generate

        return run_generate(argv[1:], PROG)
    if argv and argv[0] == "decoder":  # qcompile decoder HF_FOLDER ...: compile a causal LM
        from .cli_decoder import run_decoder

        return run_decoder(argv[1:], PROG)
    args = build_parser().parse_args(argv)
    out = sys.stdout
    if args.version:
        from . import __version__

        print(f"{PROG} {__version__}", file=out)
        return 0
    if args.list_passes or args.list_targets:
        if args.list_passes:
            _list_passes(out)
        if args.list_targets:
            _list_targets(out)
        return 0
    if args.setup:
        from .targets import aarch64_toolchain

        aarch64_toolchain.setup(log=lambda message: print(f"{PROG}: {message}", file=out))
        return 0
    if args.jobs:
        return _run_jobs(args, out)
    if not args.model:
        raise UserError(f"no model given (see {PROG} --help)")
    if not args.target:
        raise UserError(f"no --target given (see {PROG} --list-targets)")
    if not args.out_dir:
        raise UserError("no output folder given (-o OUT_DIR)")
    return _compile(args, out)


def _run_jobs(args, out) -> int:
    """``--jobs FILE``: every job, a summary table; the exit status is the number that failed."""
    import contextlib

    from .jobs import load_jobs, run_jobs, summary

    jobs = load_jobs(args.jobs)
    with contextlib.ExitStack() as stack:
        cluster = None
        if args.cluster:
            from .cluster import connect

            cluster = stack.enter_context(connect(args.cluster))
        rows = run_jobs(jobs, cluster=cluster, progress=sys.stderr.isatty())
    print(summary(rows), file=out)
    for row in rows:
        if row["status"] != "ok":
            print(f"{PROG}: job {row['name']!r} failed: {row['error']}", file=sys.stderr)
    return min(sum(r["status"] != "ok" for r in rows), 100)


def _compile(args, out) -> int:
    from . import instruments as inst
    from .artifact import check_output_dir
    from .calibdata import CalibrationData
    from .compiler import compile_model
    from .onnx_import import PICKLE_REFUSAL, PICKLE_SUFFIXES, load_onnx
    from .pipeline import Pipeline, parse_one
    from .graph import get_stage
    from .presets import choose, get_preset, stop_at
    from .target import default_targets

    model_path = Path(args.model)
    if model_path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeModelError(f"{model_path}: {PICKLE_REFUSAL}")
    input_shapes = parse_input_shapes(args.input_shape)
    input_values = parse_input_values(args.input_value)
    target = parse_one(args.target, default_targets())
    # refuse before any expensive work; --force never replaces a folder holding an input
    protect = [model_path] + ([Path(args.calib)] if args.calib else [])
    check_output_dir(args.out_dir, force=args.force, protect=protect)
    if args.pipeline:
        Pipeline.parse(args.pipeline)  # a bad spec fails before the model is read
    elif args.preset:
        get_preset(args.preset)
    tuning = None
    if args.tune or args.tuning_db:
        if not target.tunable:
            from .errors import TargetError

            tunable = sorted(cls.name for cls in default_targets() if cls.tunable)
            raise TargetError(
                f"target '{target.name}' cannot be tuned (--tune and --tuning-db work for: {', '.join(tunable)})"
            )
        from .targets.tvm_bridge.tuning import TuningOptions

        tuning = TuningOptions(
            trials=args.tune, db_dir=Path(args.tuning_db) if args.tuning_db else None,
            progress=True, seed=args.seed,
        )
    calibration = CalibrationData.from_path(args.calib) if args.calib else None
    model = load_onnx(args.model, input_shapes=input_shapes, input_values=input_values)
    pipeline, note = choose(args.preset, args.pipeline, get_stage(model), calibration is not None)
    if note:
        print(f"{PROG}: note: {note}", file=out)
    if args.stop_stage:
        pipeline = stop_at(pipeline, get_stage(model), args.stop_stage)

    instruments = [inst.Reproducer(args.reproducer_dir)]
    timing = inst.Timing() if args.time_passes else None
    if timing:
        instruments.append(timing)
    if args.print_ir_after_change:
        instruments.append(inst.PrintIRAfterChange(sys.stderr))
    if args.verify_each:
        instruments.append(inst.VerifyEach())
    if args.check_numerics:
        instruments.append(inst.NumericCheck())

    result = compile_model(
        model, target, args.out_dir,
        pipeline=pipeline, calibration=calibration, seed=args.seed,
        instruments=instruments, force=args.force, report=args.report,
        log=(lambda m: print(m, file=sys.stderr)) if args.debug else (lambda m: None),
        tuning=tuning, verify=not args.no_verify, verify_samples=args.verify_samples,
        cluster=args.cluster,
    )
    for message in result.context.warnings:
        print(f"{PROG}: warning: {_one_line(message)}", file=sys.stderr)
    if timing:
        print(timing.table(), file=out)
    if args.check_numerics:
        for entry in result.context.report.get("numeric_check", []):
            details = ", ".join(f"{k}={v:.4g}" for k, v in entry.items() if k != "pass")
            print(f"numeric check: {entry['pass']}: {details}", file=out)
    tuned = result.manifest.get("tuning")
    if tuned:
        print(
            f"{PROG}: tuning: {tuned['trials_run']} trials; {tuned['kernels_tuned_now']} kernels tuned now, "
            f"{tuned['kernels_from_database']} from {tuned['database']}, "
            f"{tuned['kernels_default_schedule']} with the default schedule "
            f"({tuned.get('records_slower_than_default', 0)} tuned records slower than it, "
            f"{tuned['records_rejected']} wrong)",
            file=out,
        )
    nodes = sum(1 for _ in result.model.graph)
    print(
        f"{PROG}: wrote {args.out_dir} (target {target}, stage {result.manifest['stage']}, {nodes} nodes; "
        f"{_verified(result.manifest['verified'])})",
        file=out,
    )
    return 0


def _verified(entry: dict) -> str:
    status = entry["status"]
    if status in ("skipped", "not-run"):
        return f"not verified: {_shorten(entry['reason'], 80)}"
    return f"verified {status} on {entry['samples']} {entry['inputs']} input{'s' if entry['samples'] != 1 else ''}"


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    if not debug:
        warnings.simplefilter("ignore")
        os.environ.setdefault("TVM_LOG_LEVEL", "FATAL")
    try:
        return run(argv)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except UserError as exc:
        if debug:
            raise
        print(f"{PROG}: error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except PassFailure as exc:
        if debug:
            raise
        print(f"{PROG}: internal error: {_one_line(str(exc))} (re-run with --debug and file a bug)", file=sys.stderr)
        return 1
    except QCompilerError as exc:
        if debug:
            raise
        print(f"{PROG}: internal error: {_one_line(str(exc))} (re-run with --debug and file a bug)", file=sys.stderr)
        return exc.exit_code
    except MemoryError:
        if debug:
            raise
        print(f"{PROG}: internal error: out of memory (re-run with --debug and file a bug)", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: one line, and how to get the details
        if debug:
            raise
        print(
            f"{PROG}: internal error: {type(exc).__name__}: {_one_line(str(exc))} "
            "(re-run with --debug and file a bug)",
            file=sys.stderr,
        )
        return 1


def _one_line(text: str) -> str:
    """Whitespace runs become one space; other control characters (a NUL in a name) are escaped."""
    text = " ".join(text.split()) or "no details"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
