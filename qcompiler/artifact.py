"""Artifacts: an output folder written atomically, its manifest, and loading it back.

``OUT_DIR/manifest.json`` records the target, the canonical pipeline, the inputs and
outputs, tool versions and a SHA-256 of every file. It holds no timestamps, so the
same inputs give byte-identical artifacts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path

import numpy as np

from .errors import ModelFormatError, OutputDirError
from .target import Runner, default_targets

MANIFEST = "manifest.json"
FORMAT = "qcompiler-artifact/1"
_VERSIONED = ("qcompiler", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy", "apache-tvm")


@contextlib.contextmanager
def atomic_output_dir(
    out_dir: str | os.PathLike, *, force: bool = False, protect: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out_dir``; rename it into place on success.

    On any exception the temporary folder is removed and ``out_dir`` is untouched.
    An existing non-empty ``out_dir`` is refused unless ``force`` (see
    :func:`check_output_dir` for what ``force`` still refuses, and ``protect``).
    """
    out_dir = check_output_dir(out_dir, force=force, protect=protect)
    parent = out_dir.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    except OSError as exc:
        raise OutputDirError(f"cannot write the output folder {out_dir}: {exc.strerror}") from None
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        try:
            if out_dir.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=parent))
                try:
                    out_dir.rename(trash / "old")
                    try:
                        tmp.rename(out_dir)
                    except OSError:
                        (trash / "old").rename(out_dir)  # put the previous folder back
                        raise
                finally:
                    shutil.rmtree(trash, ignore_errors=True)
            else:
                tmp.rename(out_dir)
        except OSError as exc:  # e.g. created by someone else meanwhile
            raise OutputDirError(f"cannot move the result into {out_dir}: {exc.strerror}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(
    out_dir: str | os.PathLike, *, force: bool = False, protect: Iterable[str | os.PathLike] = ()
) -> Path:
    """Refuse an output path that is a file, a non-empty folder (unless ``force``), or unwritable.

    Even with ``force``, a folder is never replaced if it is (or holds) the current
    folder or one of the ``protect`` paths (the input model, the calibration data).
    """
    out_dir = Path(out_dir)
    if str(out_dir) == "":
        raise OutputDirError("the output folder name is empty")
    try:
        return _check_output_dir(out_dir, force, protect)
    except OSError as exc:  # a name too long, a loop of symlinks, no permission to look
        raise OutputDirError(f"cannot use the output folder {out_dir}: {exc.strerror or exc}") from None


def _check_output_dir(out_dir: Path, force: bool, protect: Iterable[str | os.PathLike]) -> Path:
    if out_dir.is_symlink() and not out_dir.exists():
        raise OutputDirError(f"output path {out_dir} exists and is not a folder (a dangling symlink)")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(f"output path {out_dir} exists and is not a folder")
    try:
        non_empty = out_dir.is_dir() and any(out_dir.iterdir())
    except OSError as exc:
        raise OutputDirError(f"cannot read the output folder {out_dir}: {exc.strerror}") from None
    if non_empty and not force:
        raise OutputDirError(f"output folder {out_dir} exists and is not empty (use --force to replace it)")
    if non_empty:
        _refuse_replacing_inputs(out_dir, protect)
    parent = out_dir.absolute().parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputDirError(f"cannot create {out_dir}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputDirError(f"cannot write the output folder {out_dir}: {existing} is not writable")
    return out_dir


def _refuse_replacing_inputs(out_dir: Path, protect: Iterable[str | os.PathLike]) -> None:
    folders = {Path(os.path.abspath(out_dir)), out_dir.resolve()}
    for what, path in [("the current folder", Path.cwd())] + [("the input", Path(p)) for p in protect]:
        try:  # lexically or through symlinks
            places = {Path(os.path.abspath(path)), Path(path).resolve()}
        except (OSError, RuntimeError, ValueError):
            places = {Path(os.path.abspath(path))}
        if any(place.is_relative_to(folder) for place in places for folder in folders):
            shown = "" if what == "the current folder" else f" {path}"
            raise OutputDirError(
                f"output folder {out_dir} holds {what}{shown}; --force will not replace it"
            )


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def tool_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    versions = {}
    for dist in _VERSIONED + extra:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_manifest(out_dir: Path, manifest: dict) -> None:
    files = sorted(
        p for p in out_dir.rglob("*") if p.is_file() and p.name != MANIFEST
    )
    manifest = dict(manifest, format=FORMAT)
    manifest["files"] = {p.relative_to(out_dir).as_posix(): file_digest(p) for p in files}
    text = json.dumps(manifest, indent=2, sort_keys=True, default=_json_default) + "\n"
    (out_dir / MANIFEST).write_text(text)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return value.as_posix()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_manifest(out_dir: str | os.PathLike, *, verify: bool = True) -> dict:
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not path.is_file():
        raise ModelFormatError(f"{out_dir} is not a qcompiler artifact (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelFormatError(f"{path}: not a {FORMAT} manifest")
    if verify:
        for name, digest in manifest.get("files", {}).items():
            file = out_dir / name
            if not file.is_file():
                raise ModelFormatError(f"{out_dir}: file {name} listed in the manifest is missing")
            if file_digest(file) != digest:
                raise ModelFormatError(f"{out_dir}: file {name} does not match its manifest hash")
    return manifest


def load(out_dir: str | os.PathLike) -> Runner:
    """Load an artifact folder; ``.run({input: array})`` executes it where a runner exists here."""
    out_dir = Path(out_dir)
    from .decoder_layout import DECODER_FILE, DecoderLayout

    if (out_dir / DECODER_FILE).is_file():  # a decoder: its prefill and decode steps
        from .generate import DecoderRunner

        return DecoderRunner(DecoderLayout.load(out_dir), load(out_dir / "prefill"), load(out_dir / "decode"))
    manifest = read_manifest(out_dir)
    target_cls = default_targets().get(manifest["target"])
    return target_cls.load(out_dir, manifest)
