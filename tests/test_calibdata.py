"""Calibration data: .npz files / folders keyed by input name, validated and streamed."""

from __future__ import annotations

import numpy as np
import pytest

from qcompiler.calibdata import CalibrationData, InputSpec
from qcompiler.errors import CalibrationDataError

SPECS = [InputSpec("ids", (1, 4), np.dtype(np.int64)), InputSpec("x", (1, 3), np.dtype(np.float32))]


def arrays(n: int):
    r = np.random.default_rng(n)
    return {"ids": r.integers(0, 9, (n, 1, 4)), "x": r.standard_normal((n, 1, 3)).astype(np.float32)}


def test_file_and_folder_stream_samples(tmp_path):
    np.savez(tmp_path / "one.npz", **arrays(3))
    data = CalibrationData.from_path(tmp_path / "one.npz").bind(SPECS)
    samples = list(data)
    assert len(data) == 3 and len(samples) == 3
    assert samples[0]["ids"].shape == (1, 4) and samples[0]["x"].dtype == np.float32
    folder = tmp_path / "folder"
    folder.mkdir()
    np.savez(folder / "a.npz", **arrays(2))
    np.savez(folder / "b.npz", **arrays(5))
    data = CalibrationData.from_path(folder).bind(SPECS)
    assert len(data) == 7
    first = list(data)[0]
    np.testing.assert_array_equal(first["x"], arrays(2)["x"][0])  # files in name order


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda a: a.pop("x"), "no array for model input 'x'"),
        (lambda a: a.update(extra=np.zeros((3, 1))), "'extra' is not a model input"),
        (lambda a: a.update(x=a["x"][:, 0]), "expected Nx1x3"),
        (lambda a: a.update(ids=a["ids"].astype(np.int32)), "dtype int32, the model input is int64"),
        (lambda a: a.update(x=a["x"][:2]), "disagree on the number of samples"),
        (lambda a: a.update(x=np.full((3, 1, 3), np.nan, np.float32)), "NaN"),
        (lambda a: a.update(x=a["x"][:0], ids=a["ids"][:0]), "empty"),
    ],
)
def test_mismatches_are_named(tmp_path, mutate, fragment):
    data = arrays(3)
    mutate(data)
    np.savez(tmp_path / "c.npz", **data)
    with pytest.raises(CalibrationDataError, match=fragment):
        CalibrationData.from_path(tmp_path / "c.npz").bind(SPECS)


def test_unreadable_inputs(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibrationDataError, match="not a readable .npz"):
        CalibrationData.from_path(tmp_path / "junk.npz").bind(SPECS)
    np.savez(tmp_path / "obj.npz", ids=np.array([{"a": 1}], dtype=object), x=np.zeros((1, 1, 3), np.float32))
    with pytest.raises(CalibrationDataError, match="pickled|Object arrays"):
        CalibrationData.from_path(tmp_path / "obj.npz").bind(SPECS)
    with pytest.raises(CalibrationDataError, match="no .npz files"):
        (tmp_path / "empty").mkdir()
        CalibrationData.from_path(tmp_path / "empty")
