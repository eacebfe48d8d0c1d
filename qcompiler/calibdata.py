"""Calibration data: ``.npz`` files keyed by model input name, streamed sample by sample.

Each array has shape ``(N, *input_shape)``: a leading sample axis in front of the full
model input, so a batch-1 input of shape ``(1, 128)`` is stored as ``(N, 1, 128)``.
A folder of such files is read file by file in name order; only one file's arrays
are in memory at a time. Files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CalibrationDataError


@dataclass(frozen=True)
class InputSpec:
    """Name, static shape and numpy dtype of one model input, and for an input that
    indexes a table (token ids into a Gather) the values it may hold and why."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    valid_range: tuple[int, int] | None = None
    range_reason: str = ""


class CalibrationData:
    """A re-iterable stream of feed dicts ``{input_name: array}``, one per sample."""

    def __init__(self, chunks: Iterable[Mapping[str, np.ndarray]] | None = None, *, files: list[Path] | None = None):
        self._chunks = list(chunks) if chunks is not None else None
        self._files = files
        self._specs: list[InputSpec] | None = None
        self._count: int | None = None

    # -- construction -------------------------------------------------------------

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> CalibrationData:
        """Arrays keyed by input name, each with a leading sample axis."""
        return cls([{k: np.asarray(v) for k, v in arrays.items()}])

    @classmethod
    def from_samples(cls, samples: Iterable[Mapping[str, np.ndarray]]) -> CalibrationData:
        """One feed dict per sample (arrays without the sample axis)."""
        return cls([{k: np.asarray(v)[None] for k, v in s.items()} for s in samples])

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> CalibrationData:
        """A ``.npz`` file, or a folder of ``.npz`` files."""
        path = Path(path)
        try:
            if not path.exists():
                raise CalibrationDataError(f"calibration data {path}: no such file or folder")
            if path.is_dir():
                files = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
                if not files:
                    raise CalibrationDataError(f"calibration folder {path} holds no .npz files")
            else:
                if path.suffix != ".npz":
                    raise CalibrationDataError(f"calibration data {path}: expected a .npz file or a folder of them")
                if not path.is_file():  # a FIFO or a device would block or never end
                    raise CalibrationDataError(f"calibration data {path}: not a regular file")
                files = [path]
        except OSError as exc:
            raise CalibrationDataError(f"calibration data {path}: cannot read: {exc.strerror or exc}") from None
        return cls(files=files)

    # -- validation ---------------------------------------------------------------

    def bind(self, specs: Iterable[InputSpec]) -> CalibrationData:
        """Check every chunk against the model inputs; raise naming the first mismatch."""
        self._specs = list(specs)
        count = 0
        for where, chunk in self._iter_chunks():
            count += self._check_chunk(where, chunk)
        if count == 0:
            raise CalibrationDataError("the calibration set is empty (0 samples)")
        self._count = count
        return self

    def _check_chunk(self, where: str, chunk: Mapping[str, np.ndarray]) -> int:
        specs = {s.name: s for s in self._specs or []}
        unknown = sorted(set(chunk) - set(specs))
        if unknown:
            raise CalibrationDataError(
                f"{where}: array '{unknown[0]}' is not a model input; inputs are {sorted(specs)}"
            )
        missing = sorted(set(specs) - set(chunk))
        if missing:
            raise CalibrationDataError(f"{where}: no array for model input '{missing[0]}'")
        counts = set()
        for name, spec in specs.items():
            array = chunk[name]
            if not isinstance(array, np.ndarray):
                raise CalibrationDataError(f"{where}: '{name}' is not an array")
            _check_layout(where, name, array.shape, array.dtype, spec)
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise CalibrationDataError(f"{where}: array '{name}' holds NaN or infinite values")
            counts.add(array.shape[0])
        if len(counts) > 1:
            raise CalibrationDataError(f"{where}: arrays disagree on the number of samples {sorted(counts)}")
        return counts.pop() if counts else 0

    # -- iteration ----------------------------------------------------------------

    def _iter_chunks(self) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        if self._chunks is not None:
            for index, chunk in enumerate(self._chunks):
                yield f"calibration arrays #{index}", dict(chunk)
            return
        for path in self._files or []:
            yield str(path), _read_npz(path, self._specs)

    def __len__(self) -> int:
        if self._count is None:
            raise CalibrationDataError("calibration data is not bound to a model yet")
        return self._count

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """One feed dict per sample, in order."""
        for _, chunk in self._iter_chunks():
            count = next(iter(chunk.values())).shape[0] if chunk else 0
            for i in range(count):
                yield {name: np.asarray(array[i]) for name, array in chunk.items()}

    def first(self) -> dict[str, np.ndarray]:
        return next(iter(self))


def _check_layout(where: str, name: str, shape: tuple[int, ...], dtype: np.dtype, spec: InputSpec) -> None:
    """Shape ``(N, *spec.shape)`` and the input's dtype, or an error naming the array."""
    if dtype.hasobject:
        raise CalibrationDataError(f"{where}: array '{name}' holds Python objects")
    if len(shape) != len(spec.shape) + 1 or tuple(shape[1:]) != spec.shape:
        want = "x".join(map(str, ("N",) + spec.shape))
        raise CalibrationDataError(
            f"{where}: array '{name}' has shape {'x'.join(map(str, shape)) or 'scalar'}, "
            f"expected {want} (a leading sample axis, then the input shape)"
        )
    if dtype != spec.dtype:
        raise CalibrationDataError(
            f"{where}: array '{name}' has dtype {dtype}, the model input is {spec.dtype}"
        )


def _read_npz(path: Path, specs: Iterable[InputSpec] | None = None) -> dict[str, np.ndarray]:
    """Read one .npz file; every member's header is checked before any array is allocated."""
    try:
        if not zipfile.is_zipfile(path):
            raise CalibrationDataError(f"{path}: not a readable .npz file (not a zip archive)")
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                _check_member(path, archive, info, {s.name: s for s in specs or ()})
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError, RuntimeError, zlib.error) as exc:
        # RuntimeError: an encrypted member; zlib.error: damaged compressed data
        raise CalibrationDataError(f"{path}: not a readable .npz file ({_one_line(exc)})") from None
    except ValueError as exc:
        if "pickle" in str(exc):
            raise CalibrationDataError(f"{path}: holds pickled (object) arrays, which are never loaded") from None
        raise CalibrationDataError(f"{path}: {_one_line(exc)}") from None


def _check_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, specs: dict[str, InputSpec]) -> None:
    if not info.filename.endswith(".npy") or info.is_dir():
        raise CalibrationDataError(f"{path}: member '{info.filename}' is not a .npy array")
    name = info.filename[: -len(".npy")]
    with archive.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise CalibrationDataError(
                    f"{path}: array '{name}' uses .npy format {version[0]}.{version[1]}; save it with numpy.savez"
                )
            header = member.tell()
        except (ValueError, TypeError, SyntaxError) as exc:
            raise CalibrationDataError(f"{path}: array '{name}' has a damaged .npy header ({_one_line(exc)})") from None
    if dtype.hasobject:
        raise CalibrationDataError(f"{path}: holds pickled (object) arrays, which are never loaded")
    if specs and name not in specs:
        raise CalibrationDataError(
            f"{path}: array '{name}' is not a model input; inputs are {sorted(specs)}"
        )
    if name in specs:
        _check_layout(str(path), name, tuple(shape), dtype, specs[name])
    count = 1
    for dim in shape:
        count *= dim
        if count > info.file_size:
            break
    if count * dtype.itemsize > info.file_size - header:
        raise CalibrationDataError(
            f"{path}: array '{name}' has shape {'x'.join(map(str, shape))} but holds only "
            f"{max(info.file_size - header, 0)} bytes of data"
        )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def input_specs(model) -> list[InputSpec]:
    """The static input specs of an IR model (graph inputs that are not initializers)."""
    specs = []
    for value in model.graph.inputs:
        dims = tuple(int(d) for d in value.shape) if value.shape is not None else ()
        specs.append(InputSpec(value.name, dims, value.dtype.numpy()))
    return specs
