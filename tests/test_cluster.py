"""Scale-out: exact histogram merging, calibration and allocate-bits on a Ray cluster,
fault drills, the compile farm (--jobs), and clear errors for a cluster that is not there."""

from __future__ import annotations

import filecmp
import itertools
import os
from pathlib import Path

import numpy as np
import pytest

import qcompiler
from builders import rng
from qcompiler.cluster import shards
from qcompiler.errors import InputError
from qcompiler.histogram import AdaptiveHistogram
from qcompiler.jobs import load_jobs

# -- exact merging (no cluster needed) ---------------------------------------------------------


def _sequential(samples, bins=64, channels=1):
    hist = AdaptiveHistogram(bins, channels)
    for s in samples:
        hist.add(s)
    return hist


@pytest.mark.parametrize("channels", [1, 3])
def test_shards_started_at_the_first_width_merge_into_the_sequential_histogram(channels):
    """Ranges that grow, shrink and shift sign between samples: any split into shards, merged
    in any order, equals adding every sample in one histogram (width, origin, counts)."""
    scales = [0.01, 5.0, 0.2, 40.0, 1.0, 300.0, 0.5]
    samples = [(rng(i).standard_normal((channels, 50)) * s + (s if i % 2 else -s)) for i, s in enumerate(scales)]
    whole = _sequential(samples, channels=channels)
    first = _sequential(samples[:1], channels=channels)
    for cut in ([1, 3], [2, 5], [4]):
        parts = np.split(np.arange(1, len(samples)), [c - 1 for c in cut])
        shard_hists = []
        for part in parts:
            h = AdaptiveHistogram(64, channels, width=first.width)
            for i in part:
                h.add(samples[i])
            shard_hists.append(h)
        for order in itertools.permutations(range(len(shard_hists))):
            merged = first.copy()
            for i in order:
                merged.merge(shard_hists[i])
            assert (merged.width, merged.kmin) == (whole.width, whole.kmin)
            np.testing.assert_array_equal(merged.counts, whole.counts)


def test_merging_an_empty_histogram_changes_nothing():
    h = _sequential([rng(0).standard_normal(100)])
    before = h.copy()
    h.merge(AdaptiveHistogram(64, width=h.width))
    assert (h.width, h.kmin) == (before.width, before.kmin)
    np.testing.assert_array_equal(h.counts, before.counts)


def test_shards_are_contiguous_and_never_empty():
    assert shards(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert shards([1, 2], 5) == [[1], [2]]


@pytest.mark.slow
def test_a_malformed_cluster_spec_is_one_line_without_starting_anything(cli, tmp_path):
    done = cli("model.onnx", "-t", "reference", "-o", tmp_path / "out", "--cluster", "local")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "expected local:N or ray://HOST:PORT" in done.stderr or "no such file" in done.stderr


def test_job_files_are_checked_before_anything_runs(tmp_path):
    path = tmp_path / "jobs.toml"
    path.write_text('[[job]]\nmodel = "m.onnx"\ntarget = "host"\n')
    with pytest.raises(InputError, match="job 1: needs output"):
        load_jobs(path)
    path.write_text('[[job]]\nmodel = "m.onnx"\ntarget = "host"\noutput = "o"\ncolour = "red"\n')
    with pytest.raises(InputError, match="unknown field 'colour'"):
        load_jobs(path)
    path.write_text('[[job]]\nmodel = "m.onnx"\ntarget = "host"\noutput = "o"\n' * 2)
    with pytest.raises(InputError, match="a second job named 'o'"):
        load_jobs(path)
    path.write_text("not toml [")
    with pytest.raises(InputError, match="not TOML"):
        load_jobs(path)
    path.write_text('[[job]]\nmodel = "m.onnx"\ntarget = "host"\noutput = "out/a"\ncalib = "c.npz"\n')
    (job,) = load_jobs(path)
    assert job.model == str(tmp_path / "m.onnx") and job.calib == str(tmp_path / "c.npz")


# -- on a local Ray cluster ----------------------------------------------------------------------

ALLOCATE = "fold-constants,fold-batchnorm,insert-fake-quant{wide_below_db=30},allocate-bits{budget=6.0},lower-integer"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from qcompiler.examples import digits_cnn

    work = tmp_path_factory.mktemp("cluster")
    return digits_cnn.export_onnx(work / "digits.onnx"), digits_cnn.write_calibration(work / "calib.npz")


@pytest.fixture(scope="module")
def ray_cluster():
    pytest.importorskip("ray")
    from qcompiler.cluster import connect

    with connect("local:2") as cluster:
        yield cluster


def _same_files(a: Path, b: Path) -> list[str]:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    return [n for n in names if not filecmp.cmp(a / n, b / n, shallow=False)]


@pytest.mark.slow
def test_calibration_and_sweep_on_a_cluster_give_byte_identical_artifacts(digits, ray_cluster, tmp_path):
    model, calib = digits
    for name, cluster in (("one", None), ("two", ray_cluster)):
        qcompiler.compile(str(model), "npu-sim", tmp_path / name, pipeline=ALLOCATE, calib=str(calib), report=True,
                          cluster=cluster)
    assert _same_files(tmp_path / "one", tmp_path / "two") == []


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_changes_nothing(digits, ray_cluster, tmp_path, monkeypatch):
    """Fault drill: the first calibration shard and the first sweep variant each kill their
    worker process once; Ray runs them again and every output file is unchanged."""
    model, calib = digits
    qcompiler.compile(str(model), "npu-sim", tmp_path / "clean", pipeline=ALLOCATE, calib=str(calib), report=True)
    drills = tmp_path / "drills"
    for kind in ("calibration", "_score_variant"):
        monkeypatch.setenv("QCOMPILER_FAULT_DRILL", f"{kind}:0:{drills}")
        out = tmp_path / kind
        qcompiler.compile(str(model), "npu-sim", out, pipeline=ALLOCATE, calib=str(calib), report=True,
                          cluster=ray_cluster)
        assert (drills / f"{kind}-0.killed").exists()  # the worker really died once
        assert _same_files(tmp_path / "clean", out) == []


@pytest.mark.slow
def test_compile_farm_with_a_bad_job(digits, tmp_path, cli):
    """Six jobs (the digits CNN × three targets, twice) and one bad one, on a local cluster:
    six artifacts, one line naming the failed job, exit status 1."""
    model, calib = digits
    jobs = []
    for target, preset in itertools.product(("reference", "npu-sim", "fpga-sim"), ("w8a8", "w4a8")):
        jobs.append(f'[[job]]\nmodel = "{model}"\ntarget = "{target}"\noutput = "out/{target}-{preset}"\n'
                    f'preset = "{preset}"\ncalib = "{calib}"\n')
    jobs.append('[[job]]\nname = "typo"\nmodel = "no-such-model.onnx"\ntarget = "host"\noutput = "out/typo"\n')
    (tmp_path / "jobs.toml").write_text("\n".join(jobs))
    done = cli("--jobs", tmp_path / "jobs.toml", "--cluster", "local:2", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert sorted(os.listdir(tmp_path / "out")) == sorted(f"{t}-{p}" for t in ("reference", "npu-sim", "fpga-sim")
                                                         for p in ("w8a8", "w4a8"))
    failed = [line for line in done.stderr.splitlines() if "failed" in line]
    assert len(failed) == 1 and failed[0].startswith("qcompile: job 'typo' failed: ")
    assert failed[0].endswith("no-such-model.onnx: no such file")
    assert "6 of 7 jobs compiled, 1 failed" in done.stdout


@pytest.mark.slow
def test_an_unreachable_cluster_is_one_line_and_nothing_is_written(digits, tmp_path, cli):
    pytest.importorskip("ray")
    model, calib = digits
    done = cli(model, "-t", "reference", "-o", tmp_path / "out", "--calib", calib, "--preset", "w8a8",
               "--cluster", "ray://127.0.0.1:1")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "cannot connect" in done.stderr and not (tmp_path / "out").exists()
