"""Shared fixtures: exported MiniLM models and calibration data (built once per session)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("minilm")


@pytest.fixture(scope="session")
def minilm_dynamo(minilm_dir) -> Path:
    """all-MiniLM-L6-v2 from the dynamo exporter: opset 18+, weights in external data."""
    from qcompiler.examples import minilm

    return minilm.export_onnx(minilm_dir / "dynamo" / "minilm.onnx", dynamo=True)


@pytest.fixture(scope="session")
def minilm_legacy(minilm_dir) -> Path:
    """all-MiniLM-L6-v2 from the legacy TorchScript exporter: opset 17, one file."""
    from qcompiler.examples import minilm

    return minilm.export_onnx(minilm_dir / "legacy" / "minilm.onnx", dynamo=False)


@pytest.fixture(scope="session")
def minilm_calib(minilm_dir) -> Path:
    from qcompiler.examples import minilm

    calib, _ = minilm.calibration_and_eval_sentences(16, 0)
    return minilm.write_calibration(minilm_dir / "calib16.npz", calib)


def run_cli(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """Run the real ``qcompile`` console script."""
    exe = Path(sys.executable).with_name("qcompile")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=900)


@pytest.fixture
def cli():
    return run_cli
