"""The in-process host runner: input tensors reused between calls, outputs never aliased."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import qcompiler
from builders import mlp, rng, to_ir


@pytest.fixture(scope="module")
def host_mlp(tmp_path_factory):
    out = tmp_path_factory.mktemp("runner") / "mlp"
    calib = {"x": np.stack([rng(i).standard_normal((1, 16)).astype(np.float32) for i in range(8)])}
    qcompiler.compile(to_ir(mlp()), "host", out, preset="w8a8", calib=calib)
    return out


@pytest.mark.slow
def test_repeated_calls_give_fresh_unaliased_results(host_mlp):
    runner = qcompiler.load(host_mlp)
    feeds = [{"x": rng(100 + i).standard_normal((1, 16)).astype(np.float32)} for i in range(4)]
    first = [runner.run(f)["y"] for f in feeds]
    again = [runner.run(f)["y"].copy() for f in feeds]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)  # results of earlier calls are not overwritten
    first[0][...] = 1e9  # writing into a result does not reach the runner
    np.testing.assert_array_equal(runner.run(feeds[0])["y"], again[0])
    strided = {"x": np.asfortranarray(np.repeat(feeds[1]["x"], 2, axis=0)[:1])}  # a non-contiguous view
    np.testing.assert_array_equal(runner.run(strided)["y"], again[1])


@pytest.mark.slow
def test_threads_share_a_runner(host_mlp):
    runner = qcompiler.load(host_mlp)
    feeds = [{"x": rng(200 + i).standard_normal((1, 16)).astype(np.float32)} for i in range(8)]
    expected = [runner.run(f)["y"] for f in feeds]
    errors = []

    def work(offset):
        for k in range(50):
            i = (offset + k) % len(feeds)
            if not np.array_equal(runner.run(feeds[i])["y"], expected[i]):
                errors.append(i)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
