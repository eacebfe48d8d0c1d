"""Streaming histograms with exact merging, and the range estimators built on them.

:class:`AdaptiveHistogram` counts values on the grid ``k·w`` (``k`` integer). When
new data would need more than ``bins`` bins, the width ``w`` doubles and bin ``k``
merges into ``⌊k/2⌋`` — exactly, since ``⌊x/2w⌋ = ⌊⌊x/w⌋/2⌋``. Memory is bounded
by ``bins × channels`` whatever the number of samples, and the result does not
depend on how samples are batched.
"""

from __future__ import annotations

import math

import numpy as np


class AdaptiveHistogram:
    """Counts per channel on a shared power-of-two grid."""

    def __init__(self, bins: int = 2048, channels: int = 1, width: float | None = None):
        """``width``: the starting bin width (a power of two) instead of one fitted to the
        first data added: shards of one data set started with the width the whole set
        starts with merge into exactly the histogram of the whole set (:meth:`merge`)."""
        self.bins = bins
        self.channels = channels
        self.width: float | None = width
        self.kmin = 0
        self.started = False  # kmin is set by the first data added
        self.counts = np.zeros((channels, bins), dtype=np.int64)

    def add(self, values: np.ndarray, lo: float | None = None, hi: float | None = None) -> None:
        """Add ``values`` of shape ``(channels, n)`` (or any shape when channels == 1), all
        finite; ``lo``/``hi`` are their min/max when the caller has them.

        The bin of ``x`` is ``⌊x·(1/w)⌋``: ``w`` is a power of two, so the product is exact in
        float32 as in float64 and float32 data is binned without a float64 copy."""
        values = np.asarray(values)
        if values.dtype not in (np.float32, np.float64):
            values = values.astype(np.float64)
        values = values.reshape(self.channels, -1)
        if values.size == 0:
            return
        vmin = float(values.min()) if lo is None else float(lo)
        vmax = float(values.max()) if hi is None else float(hi)
        if not self.started:
            self.width = self.width or self.starting_width(vmin, vmax, self.bins)
            self.kmin = math.floor(vmin / self.width)
            self.started = True
        used_hi = self.kmin + self._last_used()
        while True:
            k_lo, k_hi = min(math.floor(vmin / self.width), self.kmin), max(math.floor(vmax / self.width), used_hi)
            if k_hi - k_lo + 1 <= self.bins:
                break
            self._double()
            used_hi = self.kmin + self._last_used()
        if k_lo < self.kmin:
            shift = self.kmin - k_lo
            self.counts = np.concatenate(
                [np.zeros((self.channels, shift), np.int64), self.counts[:, : self.bins - shift]], axis=1
            )
            self.kmin = k_lo
        scaled = values * values.dtype.type(1.0 / self.width)
        np.floor(scaled, out=scaled)
        index = scaled.astype(np.int64)
        index -= self.kmin
        if self.channels > 1:
            index += np.arange(self.channels)[:, None] * self.bins
        self.counts += np.bincount(index.ravel(), minlength=self.channels * self.bins).reshape(self.channels, self.bins)

    @staticmethod
    def starting_width(vmin: float, vmax: float, bins: int) -> float:
        """The bin width the first data ``[vmin, vmax]`` gets: the power of two that spans
        ``2·max|x|`` in ``bins`` bins."""
        amax = max(abs(vmin), abs(vmax)) or 2.0**-20
        return 2.0 ** math.ceil(math.log2(2.0 * amax / bins))

    def merge(self, other: AdaptiveHistogram) -> None:
        """Add ``other``'s counts. Exact: both grids are powers of two, the finer one is
        coarsened by doubling (``⌊x/2w⌋ = ⌊⌊x/w⌋/2⌋``) and both double while their union
        does not fit. Shards started with the same width (``width=`` of the constructor)
        merge, in any order, into the histogram of the whole data added in one process."""
        if not other.started:
            return
        if self.channels != other.channels or self.bins != other.bins:
            raise ValueError("merging histograms of different shapes")
        other = other.copy()
        if not self.started:
            self.width, self.kmin, self.counts, self.started = other.width, other.kmin, other.counts, True
            return
        while self.width < other.width:
            self._double()
        while other.width < self.width:
            other._double()
        while True:
            lo = min(self.kmin, other.kmin)
            hi = max(self.kmin + self._last_used(), other.kmin + other._last_used())
            if hi - lo + 1 <= self.bins:
                break
            self._double()
            other._double()
        self.counts = self._shifted(lo) + other._shifted(lo)
        self.kmin = lo

    def _shifted(self, kmin: int) -> np.ndarray:
        """The counts on a grid starting at ``kmin`` (≤ self.kmin)."""
        shift = self.kmin - kmin
        if shift == 0:
            return self.counts
        return np.concatenate([np.zeros((self.channels, shift), np.int64), self.counts[:, : self.bins - shift]], axis=1)

    def copy(self) -> AdaptiveHistogram:
        twin = AdaptiveHistogram(self.bins, self.channels)
        twin.width, twin.kmin, twin.counts, twin.started = self.width, self.kmin, self.counts.copy(), self.started
        return twin

    def _last_used(self) -> int:
        nonzero = np.nonzero(self.counts.any(axis=0))[0]
        return int(nonzero[-1]) if nonzero.size else 0

    def _double(self) -> None:
        new_kmin = self.kmin // 2
        old_k = self.kmin + np.arange(self.bins)
        new_index = old_k // 2 - new_kmin
        merged = np.zeros_like(self.counts)
        np.add.at(merged, (slice(None), new_index), self.counts)
        self.counts = merged
        self.kmin = new_kmin
        self.width *= 2.0

    # -- queries ---------------------------------------------------------------------

    def edges(self) -> np.ndarray:
        return (self.kmin + np.arange(self.bins + 1)) * (self.width or 1.0)

    def channel(self, c: int) -> AdaptiveHistogram:
        view = AdaptiveHistogram(self.bins, 1)
        view.width, view.kmin, view.counts, view.started = self.width, self.kmin, self.counts[c : c + 1], self.started
        return view

    def total(self) -> int:
        return int(self.counts.sum())

    def quantile(self, q: float) -> float:
        """The ``q``-quantile (0..1) of channel 0, interpolated linearly inside a bin."""
        counts = self.counts[0].astype(np.float64)
        total = counts.sum()
        if total == 0 or self.width is None:
            return 0.0
        cumulative = np.cumsum(counts)
        target = q * total
        i = int(np.searchsorted(cumulative, target, side="left"))
        i = min(i, self.bins - 1)
        before = cumulative[i - 1] if i > 0 else 0.0
        inside = (target - before) / counts[i] if counts[i] > 0 else 0.0
        return float((self.kmin + i + min(max(inside, 0.0), 1.0)) * self.width)

    def abs_counts(self) -> tuple[np.ndarray, float]:
        """Counts of |x| of channel 0 on bins ``[j·w, (j+1)·w)``, and ``w``."""
        counts = self.counts[0]
        k = self.kmin + np.arange(self.bins)
        folded = np.where(k >= 0, k, -k - 1)
        size = int(folded.max()) + 1 if folded.size else 1
        out = np.zeros(size, np.int64)
        np.add.at(out, folded, counts)
        return out, float(self.width or 1.0)


# -- range estimators -----------------------------------------------------------------------


def percentile_range(hist: AdaptiveHistogram, lo: float, hi: float, q: float, symmetric: bool) -> tuple[float, float]:
    """Clip to the ``q`` percentile (e.g. 99.99) of |x| (symmetric) or of each tail."""
    frac = q / 100.0
    if symmetric:
        counts, w = hist.abs_counts()
        amax = _abs_quantile(counts, w, frac)
        amax = min(amax, max(abs(lo), abs(hi)))
        return -amax, amax
    return max(lo, hist.quantile(1.0 - frac)), min(hi, hist.quantile(frac))


def _abs_quantile(counts: np.ndarray, w: float, q: float) -> float:
    total = counts.sum()
    if total == 0:
        return 0.0
    cumulative = np.cumsum(counts)
    target = q * total
    i = int(np.searchsorted(cumulative, target, side="left"))
    i = min(i, len(counts) - 1)
    before = cumulative[i - 1] if i > 0 else 0
    inside = (target - before) / counts[i] if counts[i] else 0.0
    return float((i + min(max(inside, 0.0), 1.0)) * w)


def estimate_sqnr_through_db(hist: AdaptiveHistogram, lo: float, hi: float, levels: int, function) -> float:
    """SQNR (dB) of ``f(x)`` when ``x`` is quantized to ``levels`` steps on [lo, hi] before ``f``
    is applied: ``10·log10(E[f(x)²] / E[(f(x) − f(Q(x)))²])`` over the histogram's bins. A
    square root or a logarithm after a quantized tensor magnifies the steps near 0, which
    the tensor's own SQNR does not show."""
    counts = hist.counts[0].astype(np.float64)
    edges = hist.edges()
    centers = (edges[:-1] + edges[1:]) / 2.0
    step = (hi - lo) / (levels - 1) if hi > lo else 1e-12
    rounded = np.round((np.clip(centers, lo, hi) - lo) / step) * step + lo
    with np.errstate(all="ignore"):
        exact, quantized = function(centers), function(rounded)
    keep = np.isfinite(exact) & np.isfinite(quantized)
    signal = float(np.sum(counts[keep] * exact[keep] ** 2))
    noise = float(np.sum(counts[keep] * (exact[keep] - quantized[keep]) ** 2))
    if noise <= 0.0:
        return math.inf
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _quant_mse(centers: np.ndarray, counts: np.ndarray, lo: float, hi: float, levels: int) -> float:
    """Expected squared error of quantizing a histogram to ``levels`` steps on [lo, hi]."""
    step = (hi - lo) / (levels - 1) if hi > lo else 1e-12
    clipped = np.clip(centers, lo, hi)
    rounding = np.round((clipped - lo) / step) * step + lo
    error = (centers - rounding) ** 2
    inside = (centers >= lo) & (centers <= hi)
    error = np.where(inside, step * step / 12.0, error)  # uniform noise inside, clipping outside
    return float(np.sum(counts * error))


def mse_range(hist: AdaptiveHistogram, lo: float, hi: float, bits: int, symmetric: bool, steps: int = 100) -> tuple[float, float]:
    """The clipping range minimising expected quantization MSE over the histogram.

    Searches scaled ranges ``r·[lo, hi]`` for ``r`` in (0, 1] (symmetric: ``±r·max|x|``).
    """
    counts = hist.counts[0].astype(np.float64)
    edges = hist.edges()
    centers = (edges[:-1] + edges[1:]) / 2.0
    levels = 2**bits - (1 if symmetric else 0)
    best, best_range = math.inf, (lo, hi)
    amax = max(abs(lo), abs(hi))
    for r in np.linspace(1.0 / steps, 1.0, steps):
        cand = (-amax * r, amax * r) if symmetric else (lo * r, hi * r)
        err = _quant_mse(centers, counts, cand[0], cand[1], levels)
        if err < best * (1.0 - 1e-12):  # prefer the wider range on ties
            best, best_range = err, cand
    return best_range


def entropy_range(hist: AdaptiveHistogram, lo: float, hi: float, bits: int) -> tuple[float, float]:
    """Symmetric threshold minimising KL(P‖Q) between the |x| histogram clipped at the
    threshold (P, outliers folded into the last bin) and its quantization to
    ``2^(bits−1)`` levels (Q) — the TensorRT calibration procedure."""
    counts, w = hist.abs_counts()
    counts = counts.astype(np.float64)
    n = len(counts)
    levels = 2 ** (bits - 1)
    if n <= levels:
        amax = max(abs(lo), abs(hi))
        return -amax, amax
    best, best_i = math.inf, n
    for i in range(levels, n + 1, max(1, (n - levels) // 256)):
        p = counts[:i].copy()
        p[i - 1] += counts[i:].sum()
        if p.sum() == 0:
            continue
        groups = np.array_split(np.arange(i), levels)
        q = np.zeros(i)
        for g in groups:
            nonzero = counts[g] > 0
            if nonzero.any():
                q[g[nonzero]] = counts[g].sum() / nonzero.sum()
        p /= p.sum()
        qs = q.sum()
        if qs == 0:
            continue
        q /= qs
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best:
            best, best_i = kl, i
    amax = min(best_i * w, max(abs(lo), abs(hi)))
    return -amax, amax


def estimate_sqnr_db(hist: AdaptiveHistogram, lo: float, hi: float, levels: int) -> float:
    """SQNR (dB) of quantizing the histogram's values to ``levels`` steps on [lo, hi]:
    ``10·log10(E[x²] / E[(x − Q(x))²])`` with uniform noise inside and clipping outside."""
    counts = hist.counts[0].astype(np.float64)
    edges = hist.edges()
    centers = (edges[:-1] + edges[1:]) / 2.0
    signal = float(np.sum(counts * centers * centers))
    noise = _quant_mse(centers, counts, lo, hi, levels)
    if noise <= 0.0:
        return math.inf
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
