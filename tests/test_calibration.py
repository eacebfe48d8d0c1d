"""Calibration statistics: exact streaming histograms, range estimators, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from builders import mlp, rng, to_ir
from qcompiler.calibdata import CalibrationData, input_specs
from qcompiler.calibration import ActivationStats
from qcompiler.histogram import AdaptiveHistogram, estimate_sqnr_db
from qcompiler.interpreter import ReferenceInterpreter
from qcompiler.passmanager import PassContext
from qcompiler.quant import QFormat


def test_histogram_merging_is_exact_and_batch_independent():
    data = rng(0).standard_normal(20000) * np.linspace(0.01, 50, 20000)  # the range keeps growing
    one = AdaptiveHistogram(512)
    one.add(data)
    chunked = AdaptiveHistogram(512)
    for chunk in np.array_split(data, 37):
        chunked.add(chunk)
    assert one.width == chunked.width and one.kmin == chunked.kmin
    np.testing.assert_array_equal(one.counts, chunked.counts)
    # Same counts as a direct histogram on the final grid.
    direct = np.histogram(data, bins=one.edges())[0]
    np.testing.assert_array_equal(one.counts[0], direct)
    assert one.total() == data.size


def test_float32_data_bins_as_its_float64_copy():
    """Bins are ⌊x·(1/w)⌋ with w a power of two: exact in float32, so float32 data (binned
    without a float64 copy) and its float64 copy give the same histogram, channels too."""
    data = (rng(1).standard_normal((3, 5000)) * np.array([[0.001], [1.0], [300.0]])).astype(np.float32)
    for channels in (1, 3):
        single, double = AdaptiveHistogram(256, channels), AdaptiveHistogram(256, channels)
        for chunk in np.array_split(data, 7, axis=1):
            single.add(chunk if channels == 3 else chunk.ravel())
            double.add(chunk.astype(np.float64) if channels == 3 else chunk.ravel().astype(np.float64))
        assert single.width == double.width and single.kmin == double.kmin
        np.testing.assert_array_equal(single.counts, double.counts)


def test_stats_skip_non_finite_values():
    from qcompiler.calibration import TensorStats

    clean = rng(2).standard_normal((2, 64)).astype(np.float32)
    dirty = clean.copy()
    dirty[0, :3] = [np.nan, np.inf, -np.inf]
    stats = TensorStats("x", dirty.shape, 0, AdaptiveHistogram(128))
    stats.update(dirty)
    finite = np.concatenate([clean[0, 3:], clean[1]])
    assert (stats.min, stats.max) == (float(finite.min()), float(finite.max()))
    assert stats.hist.total() == finite.size


def test_quantiles_within_a_bin():
    data = rng(1).standard_normal(100000)
    hist = AdaptiveHistogram(2048)
    hist.add(data)
    for q in (0.001, 0.5, 0.999):
        assert abs(hist.quantile(q) - np.quantile(data, q)) <= 2 * hist.width


def _stats(model, samples):
    ctx = PassContext(calibration=CalibrationData.from_samples(samples).bind(input_specs(model)))
    return ctx.analysis(ActivationStats(), model)


def test_activation_stats_match_direct_computation():
    model = to_ir(mlp())
    samples = [{"x": rng(i).standard_normal((1, 16)).astype(np.float32)} for i in range(10)]
    stats = _stats(model, samples)
    interpreter = ReferenceInterpreter(model)
    runs = [interpreter.run_all(s) for s in samples]
    for name in ("h1", "h2", "y"):
        values = np.stack([r[name] for r in runs])
        assert stats[name].min == pytest.approx(float(values.min()), rel=1e-5)
        assert stats[name].max == pytest.approx(float(values.max()), rel=1e-5)
        np.testing.assert_allclose(stats[name].channel_max, values.max(axis=(0, 1)), rtol=1e-5)
        assert stats[name].count == values.size
    assert "h0" in stats  # every float activation is observed


def test_range_methods_on_heavy_tails():
    from qcompiler.calibration import TensorStats

    stats = TensorStats("t", (100001,), 0, AdaptiveHistogram(2048))
    stats.update(np.concatenate([rng(2).standard_normal(100000), [60.0]]).astype(np.float32))
    fmt = QFormat.parse("int8:per-tensor")
    assert stats.range("minmax", fmt) == (-60.0, 60.0)
    for method in ("percentile", "entropy"):
        lo, hi = stats.range(method, fmt)
        assert 2.0 < hi < 20.0 and lo == -hi, (method, lo, hi)  # clips the lone outlier
    lo, hi = stats.range("mse", fmt)  # MSE weighs the outlier's clipping error against rounding noise
    assert 2.0 < hi < 60.0 and lo == -hi
    lo, hi = stats.range("minmax", QFormat.parse("uint8:per-tensor:asym"))
    assert hi == 60.0 and lo == pytest.approx(stats.min)
    with pytest.raises(ValueError, match="unknown range method"):
        stats.range("median", fmt)


def test_sqnr_estimate_tracks_bits():
    hist = AdaptiveHistogram(2048)
    hist.add(rng(3).standard_normal(50000))
    low = estimate_sqnr_db(hist, -6, 6, 2**8)
    high = estimate_sqnr_db(hist, -6, 6, 2**16)
    assert 30 < low < 45 and high > low + 40  # ~6 dB per bit


def test_stats_are_deterministic():
    model = to_ir(mlp())
    samples = [{"x": rng(i).standard_normal((1, 16)).astype(np.float32)} for i in range(6)]
    a, b = _stats(model, samples), _stats(model, samples)
    for name in a:
        np.testing.assert_array_equal(a[name].hist.counts, b[name].hist.counts)
