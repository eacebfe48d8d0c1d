"""Hostile and malformed inputs (tests/corpus.py): exact error class, one line, nothing left behind.

Every case runs through the Python API (the exact error class and message fragment)
and a representative subset (all of them with QCOMPILER_CORPUS_CLI=all) through the
real ``qcompile`` console script, several at a time: exit status 2, exactly one line
on stderr naming the problem, no traceback, and the case folder byte-for-byte as it
was (no output folder, no temporary sibling, an existing folder untouched).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

import corpus
from qcompiler import errors

#: Peak Python/numpy allocation allowed while refusing an absurd shape (in process).
API_MEMORY_LIMIT = 64 << 20
#: Peak resident size allowed for a ``qcompile`` process refusing an absurd shape.
CLI_RSS_LIMIT = 1 << 30
#: A case that takes longer than this through the CLI is a hang.
CLI_TIMEOUT = 120

REQUIRED_CATEGORIES = {
    "file", "random bytes", "truncated protobuf", "not a model", "graph structure",
    "duplicate names", "initializer data", "negative dimensions", "absurd dimensions",
    "unknown op", "unknown domain", "attributes", "arity", "versions", "external data",
    "NaN/Inf weights", "calibration data", "pipeline syntax", "pipeline options", "targets",
    "output folder", "pickle", "--input-shape",
}


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its kind, size and content digest (symlinks not followed)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            info = path.lstat()
            kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
            content = path.read_bytes() if kind == "file" and path.is_file() else None  # not FIFOs
            found[str(path.relative_to(root))] = (kind, info.st_size if kind == "file" else 0, hash(content))
    return found


def _skip_reason(case: corpus.Case, folder: Path) -> str | None:
    return case.precondition(folder) if case.precondition else None


def test_corpus_covers_every_category():
    counts = corpus.categories()
    assert len(corpus.CASES) >= 60, len(corpus.CASES)
    assert REQUIRED_CATEGORIES <= set(counts), REQUIRED_CATEGORIES - set(counts)
    for case in corpus.CASES:
        assert issubclass(case.error, errors.UserError), case.id
        assert case.fragment, case.id


# -- the Python API ---------------------------------------------------------------------


@pytest.mark.parametrize("case", corpus.CASES, ids=[c.id for c in corpus.CASES])
def test_python_api(case: corpus.Case, tmp_path: Path):
    reason = _skip_reason(case, tmp_path)
    if reason:
        pytest.skip(reason)
    inv = case.build(tmp_path)
    before = _snapshot(tmp_path)
    if case.bounded_memory:
        tracemalloc.start()
    try:
        with pytest.raises(errors.QCompilerError) as caught:
            case.api(inv)
    finally:
        peak = tracemalloc.get_traced_memory()[1] if case.bounded_memory else 0
        if case.bounded_memory:
            tracemalloc.stop()
    exc = caught.value
    assert type(exc) is case.error, f"{type(exc).__name__}: {exc}"
    assert case.fragment in str(exc), str(exc)
    assert peak < API_MEMORY_LIMIT, f"allocated {peak} bytes before refusing"
    assert _snapshot(tmp_path) == before, "the run left files behind or changed the case folder"


# -- the real console script ------------------------------------------------------------


#: Cases worth a CLI run beyond the first of each category (a process costs ~0.7 s).
CLI_EXTRA = {
    "random-bytes-seed2", "pytorch-zip-named-onnx", "range-computed-limit", "calib-huge-header",
    "calib-pickled-object-array", "external-location-nul-byte", "external-symlink-out",
    "input-shape-giant-number", "input-shape-negative", "pipeline-unknown-pass", "unknown-target",
}


def _cli_selection() -> list[corpus.Case]:
    """The first case of each category, every output-folder case and CLI_EXTRA
    (every case with QCOMPILER_CORPUS_CLI=all)."""
    if os.environ.get("QCOMPILER_CORPUS_CLI") == "all":
        return list(corpus.CASES)
    chosen, seen = [], set()
    for case in corpus.CASES:
        if case.category not in seen or case.category == "output folder" or case.id in CLI_EXTRA:
            chosen.append(case)
        seen.add(case.category)
    return chosen


CLI_CASES = _cli_selection()


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str
    max_rss: int  # bytes
    before: dict
    after: dict
    skipped: str | None = None


#: Runs ``qcompile`` as its child and writes the child's peak RSS (KiB) to argv[1]. A process
#: forked from pytest would report pytest's own RSS as its peak: Linux keeps the high-water
#: mark of the address space it replaces at exec, so the measurement needs a small parent.
_RSS_WRAPPER = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def _run_qcompile(args: list[str], cwd: Path | None) -> tuple[int, str, str, int]:
    """Run the console script; return status, stdout, stderr and its peak RSS in bytes."""
    exe = Path(sys.executable).with_name("qcompile")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryDirectory() as tmp:
        rss_file = Path(tmp) / "rss"
        proc = subprocess.Popen([sys.executable, "-c", _RSS_WRAPPER, str(rss_file), str(exe), *args],
                                stdout=out, stderr=err, cwd=cwd, start_new_session=True)
        timer = threading.Timer(CLI_TIMEOUT, lambda: os.killpg(proc.pid, 9))
        timer.start()
        try:
            code = proc.wait()
        finally:
            timer.cancel()
        out.seek(0)
        err.seek(0)
        rss = int(rss_file.read_text()) * 1024 if rss_file.exists() else 0
        return code, out.read().decode(errors="replace"), err.read().decode(errors="replace"), rss


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, CliRun]:
    """All selected cases through ``qcompile``, a few processes at a time."""
    root = tmp_path_factory.mktemp("cli-corpus")

    def one(case: corpus.Case) -> tuple[str, CliRun]:
        folder = root / case.id
        folder.mkdir()
        reason = _skip_reason(case, folder)
        if reason:
            return case.id, CliRun(0, "", "", 0, {}, {}, skipped=reason)
        inv = case.build(folder)
        before = _snapshot(folder)
        code, out, err, rss = _run_qcompile(inv.cli_args(), inv.cwd)
        return case.id, CliRun(code, out, err, rss, before, _snapshot(folder))

    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        return dict(pool.map(one, CLI_CASES))


@pytest.mark.slow  # one qcompile subprocess per case
@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli(case: corpus.Case, cli_runs):
    run = cli_runs[case.id]
    if run.skipped:
        pytest.skip(run.skipped)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == case.error.exit_code == 2, run.stderr
    assert len(lines) == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert lines[0].startswith("qcompile: error: "), lines[0]
    assert case.fragment in lines[0], lines[0]
    assert run.after == run.before, "the run left files behind or changed the case folder"
    if case.bounded_memory:
        assert run.max_rss < CLI_RSS_LIMIT, f"peak RSS {run.max_rss >> 20} MiB"


# -- output folder: the positive side of the rules ------------------------------------------


def test_force_replaces_a_non_empty_folder_atomically(tmp_path):
    import qcompiler

    inv = corpus.valid(tmp_path)
    inv.out.mkdir()
    (inv.out / "old.txt").write_text("previous run")
    qcompiler.compile(str(inv.model), "reference", inv.out, preset="float", force=True)
    assert (inv.out / "manifest.json").is_file() and not (inv.out / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "out"]  # no siblings left


def test_failure_inside_the_build_leaves_nothing(tmp_path, monkeypatch):
    """A crash after the temporary folder exists (here in the target) removes it again."""
    import qcompiler
    from qcompiler.targets.reference import ReferenceTarget

    def crash(self, model, out_dir, ctx):
        (out_dir / "model.onnx").write_bytes(b"half")
        raise RuntimeError("simulated crash in build")

    monkeypatch.setattr(ReferenceTarget, "build", crash)
    inv = corpus.valid(tmp_path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        qcompiler.compile(str(inv.model), "reference", inv.out, preset="float")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


# -- internal errors: status 1, one line, a hint ---------------------------------------------


@pytest.mark.parametrize(
    "exc", [RuntimeError("boom"), KeyError("missing"), MemoryError(), RecursionError("too deep"), errors.QCompilerError("odd")],
    ids=lambda e: type(e).__name__,
)
def test_internal_errors_are_one_line_with_a_hint(exc, tmp_path, monkeypatch, capsys):
    from qcompiler import cli, onnx_import

    def broken(*args, **kwargs):
        raise exc

    monkeypatch.setattr(onnx_import, "load_onnx", broken)
    inv = corpus.valid(tmp_path)
    status = cli.main(inv.cli_args())
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1, err
    assert err[0].startswith("qcompile: internal error:")
    assert "re-run with --debug" in err[0]
    assert not inv.out.exists()
    with pytest.raises(type(exc)):
        cli.main(inv.cli_args() + ["--debug"])
