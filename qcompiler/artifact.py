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
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import numpy as np

from .errors import ModelFormatError, OutputDirError
from .target import Runner, default_targets

MANIFEST = "manifest.json"
FORMAT = "qcompiler-artifact/1"
_VERSIONED = ("qcompiler", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy", "apache-tvm")


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out_dir``; rename it into place on success.

    On any exception the temporary folder is removed and ``out_dir`` is untouched.
    An existing non-empty ``out_dir`` is refused unless ``force``.
    """
    out_dir = check_output_dir(out_dir, force=force)
    parent = out_dir.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    except OSError as exc:
        raise OutputDirError(f"cannot write the output folder {out_dir}: {exc.strerror}") from None
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=parent))
            out_dir.rename(trash / "old")
            tmp.rename(out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(out_dir: str | os.PathLike, *, force: bool = False) -> Path:
    """Refuse an output path that is a file, a non-empty folder (unless ``force``), or unwritable."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(f"output path {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise OutputDirError(f"output folder {out_dir} exists and is not empty (use --force to replace it)")
    parent = out_dir.absolute().parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputDirError(f"cannot create {out_dir}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputDirError(f"cannot write the output folder {out_dir}: {existing} is not writable")
    return out_dir


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
    manifest = read_manifest(out_dir)
    target_cls = default_targets().get(manifest["target"])
    return target_cls.load(out_dir, manifest)
