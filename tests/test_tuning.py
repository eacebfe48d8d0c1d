"""``qcompile --tune``: MetaSchedule tuning of host kernels with a persistent database.

Tiny trial counts keep this file fast (a cold tune of a small graph takes ~20 s, most of it
fixed start-up); what is checked is the plumbing: records land in the database, tuned
builds stay bit-exact, a warm database runs no trials, other targets refuse.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import qcompiler
import target_models as tm
from builders import mlp, run, save
from qcompiler import cli
from qcompiler.pipeline import Pipeline, parse_one
from qcompiler.target import default_targets
from qcompiler.targets.tvm_bridge import tuning

#: Slow lane: tuning starts MetaSchedule, which imports TVM's tensor-intrinsic library.
pytestmark = pytest.mark.slow

TRIALS = 8


def build(model, out_dir, db, trials=TRIALS):
    # every correct record is used (not only those that beat the default schedule): no timing noise
    options = tuning.TuningOptions(trials=trials, db_dir=db, progress=False, must_beat_default=False)
    target = parse_one("host", default_targets())
    return qcompiler.compile_model(model, target, out_dir, pipeline=Pipeline([]), tuning=options).manifest


def database_files(db: Path) -> dict[str, bytes]:
    return {p.relative_to(db).as_posix(): p.read_bytes() for p in sorted(db.rglob("database_*.json"))}


@pytest.fixture(scope="module")
def tuned_mlp(tmp_path_factory):
    root = tmp_path_factory.mktemp("tuning")
    db = root / "db"
    manifest = build(tm.quantized_mlp(), root / "cold", db)
    return manifest, root, db


def test_cold_compile_tunes_and_stays_bit_exact(tuned_mlp):
    manifest, root, db = tuned_mlp
    info = manifest["tuning"]
    assert info["trials_run"] > 0
    assert info["kernels"] > 0 and info["kernels_tuned_now"] > 0
    assert info["kernels_from_database"] == 0
    assert info["kernels_tuned_now"] + info["kernels_default_schedule"] == info["kernels"]
    assert Path(info["database"]).parent == db
    records = (Path(info["database"]) / "database_tuning_record.json").read_text().splitlines()
    assert len(records) >= info["kernels_tuned_now"]
    model = tm.quantized_mlp()
    tm.assert_runner_bit_exact(qcompiler.load(root / "cold"), model, 3, "tuned")


def test_warm_database_runs_no_trials(tuned_mlp, tmp_path, monkeypatch):
    manifest, root, db = tuned_mlp
    before = database_files(db)

    def no_tuning(*args, **kwargs):  # pragma: no cover - the test fails if reached
        raise AssertionError("a warm database must not start the tuner")

    from tvm.s_tir import meta_schedule as ms

    monkeypatch.setattr(ms, "tune_tasks", no_tuning)
    warm = build(tm.quantized_mlp(), tmp_path / "warm", db)["tuning"]
    assert warm["trials_run"] == 0
    assert warm["kernels_tuned_now"] == 0
    assert warm["kernels_from_database"] == manifest["tuning"]["kernels_tuned_now"]
    assert database_files(db) == before
    # the same kernels, the same machine code
    assert (tmp_path / "warm" / "model.so").read_bytes() == (root / "cold" / "model.so").read_bytes()


def test_database_without_tuning_is_used(tuned_mlp, tmp_path):
    _, _, db = tuned_mlp
    info = build(tm.quantized_mlp(), tmp_path / "out", db, trials=0)["tuning"]
    assert info["trials_run"] == 0 and info["kernels_from_database"] > 0


def test_cli_tunes_a_float_graph(tmp_path, capsys):
    model = save(mlp(), tmp_path / "mlp.onnx")
    db = tmp_path / "db"
    status = cli.main([model, "-t", "host", "--preset", "float", "-o", str(tmp_path / "out"),
                       "--tune", str(TRIALS), "--tuning-db", str(db)])
    assert status == 0
    out = capsys.readouterr().out
    assert "tuning:" in out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    info = manifest["tuning"]
    assert info["trials_run"] > 0
    # the CLI keeps a tuned kernel only where it beat the default schedule when timed
    assert info["kernels_tuned_now"] + info["records_slower_than_default"] + info["records_rejected"] > 0
    assert Path(info["database"]).parent == db
    assert (Path(info["database"]) / "database_tuning_record.json").read_text().strip()
    x = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
    import onnx

    expected = run(onnx.load(model), {"x": x})
    got = qcompiler.load(tmp_path / "out").run({"x": x})
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-5)


def test_untuned_build_records_no_tuning(tmp_path):
    target = parse_one("host", default_targets())
    manifest = qcompiler.compile_model(tm.quantized_mlp(), target, tmp_path / "o", pipeline=Pipeline([])).manifest
    assert manifest["tuning"] is None


@pytest.mark.parametrize("target", ["reference", "npu-sim"])
def test_targets_that_cannot_tune_say_so(tmp_path, capsys, target):
    model = save(mlp(), tmp_path / "mlp.onnx")
    status = cli.main([model, "-t", target, "-o", str(tmp_path / "out"), "--tune", "4"])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"target '{target}' cannot be tuned" in err and "host" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("value", ["-1", "many"])
def test_bad_trial_counts_are_refused(tmp_path, capsys, value):
    model = save(mlp(), tmp_path / "mlp.onnx")
    assert cli.main([model, "-t", "host", "-o", str(tmp_path / "out"), "--tune", value]) == 2
    assert "--tune" in capsys.readouterr().err


def test_default_database_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("QCOMPILER_TUNING_DB", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tuning.default_db_dir() == tmp_path / "qcompiler" / "tuning"
    monkeypatch.setenv("QCOMPILER_TUNING_DB", str(tmp_path / "mine"))
    assert tuning.default_db_dir() == tmp_path / "mine"
    assert tuning.TuningOptions(db_dir=tmp_path / "x").folder == tmp_path / "x"


def test_a_wrong_record_is_not_used(tuned_mlp, tmp_path):
    """Records are checked against the untuned kernel before use (the tuner once picked a
    wrong VNNI kernel as fastest); a rejected record leaves the default schedule."""
    _, _, db = tuned_mlp
    folder = next(p for p in db.iterdir() if p.is_dir())
    verdicts = folder / "verified.json"
    saved = verdicts.read_text()
    cached = json.loads(saved)
    assert cached and set(cached.values()) == {"untimed"}
    try:
        verdicts.write_text(json.dumps({key: "differs" for key in cached}))
        info = build(tm.quantized_mlp(), tmp_path / "out", db)["tuning"]
    finally:
        verdicts.write_text(saved)
    assert info["trials_run"] == 0
    assert info["kernels_from_database"] == 0
    assert info["records_rejected"] == len(cached)
    assert info["kernels_default_schedule"] == info["kernels"]
    model = tm.quantized_mlp()
    feeds = tm.random_feeds(model, 0)
    got = qcompiler.load(tmp_path / "out").run(feeds)
    for key, value in tm.reference(model, feeds).items():
        np.testing.assert_array_equal(got[key], value)


def test_output_check_tells_kernels_apart():
    import tvm
    from tvm import te

    def kernel(add):
        a = te.placeholder((64,), "int8", name="a")
        b = te.compute((64,), lambda i: a[i] + tvm.tirx.const(add, "int8"), name="b")
        return tvm.IRModule({"main": te.create_prim_func([a, b])})

    target = tvm.target.Target("llvm")
    assert tuning.outputs_agree(kernel(1), kernel(1), target)
    assert not tuning.outputs_agree(kernel(1), kernel(2), target)
