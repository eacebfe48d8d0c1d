"""A small CNN trained for real on scikit-learn's 8×8 digits: Conv/BN/ReLU6/pooling/Gemm.

Deterministic (fixed seeds, one CPU thread while training) and quick (a few seconds).
``export_onnx`` writes the trained network (batch 1 × 1×8×8, BatchNormalization kept
for the compiler's ``fold-batchnorm``), ``write_calibration`` a calibration ``.npz``
from training images, and ``held_out`` the test split used for accuracy.
Run ``python -m qcompiler.examples.digits_cnn OUT_DIR`` to do all three.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from functools import cache
from pathlib import Path

import numpy as np

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
INPUT_SHAPE = (1, 1, 8, 8)
SEED = 0


@cache
def dataset() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: images scaled to [0, 1] as float32 (N, 1, 8, 8).

    A fixed stratified 75/25 split of the 1797 digits.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)
    return x_tr, y_tr, x_te, y_te


def held_out() -> tuple[np.ndarray, np.ndarray]:
    """Test images (N, 1, 8, 8) and labels, never seen in training or calibration."""
    _, _, x, y = dataset()
    return x, y


def build_network():
    """conv3×3(1→16)+BN+ReLU6 → maxpool 2 → conv3×3(16→32)+BN+ReLU6 → global avg pool → Linear(32→10)."""
    import torch
    from torch import nn

    class DigitsCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(),
                nn.AdaptiveAvgPool2d(1),
            )
            self.head = nn.Linear(32, 10)

        def forward(self, x):
            return self.head(torch.flatten(self.features(x), 1))

    return DigitsCNN()


@cache
def trained_network(epochs: int = 15):
    """The network trained with Adam on the training split (same weights on every run)."""
    import torch

    torch.manual_seed(SEED)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-reproducible reductions
    try:
        net = build_network()
        x_tr, y_tr, _, _ = dataset()
        x, y = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
        optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
        order = torch.Generator().manual_seed(SEED)
        net.train()
        with torch.enable_grad():  # also when called under torch.no_grad()
            for _ in range(epochs):
                for batch in torch.randperm(len(x), generator=order).split(64):
                    optimizer.zero_grad()
                    loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
                    loss.backward()
                    optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval().requires_grad_(False)


def fp32_logits(images: np.ndarray) -> np.ndarray:
    """Logits of the trained FP32 network for images (N, 1, 8, 8)."""
    import torch

    with torch.no_grad():
        return trained_network()(torch.from_numpy(np.asarray(images, np.float32))).numpy()


def export_onnx(path: str | os.PathLike) -> Path:
    """Export the trained network at batch 1, opset 17, one file.

    The TorchScript exporter with ``TrainingMode.PRESERVE`` keeps ``BatchNormalization``
    (left for qcompiler's ``fold-batchnorm``) and writes the pooling as
    ``GlobalAveragePool`` (the dynamo exporter folds BN and writes ``ReduceMean``).
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(INPUT_SHAPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            trained_network(), (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamo=False, opset_version=17, training=torch.onnx.TrainingMode.PRESERVE,
        )
    return path


def write_calibration(path: str | os.PathLike, count: int = 128) -> Path:
    """The first ``count`` training images as calibration data, shape (count, 1, 1, 8, 8)."""
    path = Path(path)
    x_tr, _, _, _ = dataset()
    np.savez(path, **{INPUT_NAME: x_tr[:count, None]})
    return path


def top1(logits: np.ndarray) -> np.ndarray:
    return np.asarray(logits).reshape(len(logits), -1).argmax(axis=-1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="examples/digits", help="working folder")
    args = parser.parse_args(argv)
    out = Path(args.out)
    model = export_onnx(out / "digits_cnn.onnx")
    calib = write_calibration(out / "calib.npz")
    x, y = held_out()
    accuracy = float(np.mean(top1(fp32_logits(x)) == y))
    print(f"wrote {model} and {calib}; FP32 top-1 accuracy on {len(y)} held-out digits: {accuracy:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
