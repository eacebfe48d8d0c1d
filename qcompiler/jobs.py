"""A compile farm: ``qcompile --jobs FILE`` compiles every job of a TOML file.

::

    [[job]]
    name = "minilm-host"          # optional (default: the output folder's name)
    model = "minilm.onnx"
    target = "host"
    output = "out/minilm-host"
    preset = "w8a8"               # or pipeline = "..."
    calib = "calib.npz"           # optional
    input_shapes = { input_ids = [1, 128] }   # optional
    force = true                  # optional: replace an existing output folder

Relative paths are relative to the file. Each job writes its own output folder atomically
(a failed job leaves nothing); one failed job does not stop the others. With a cluster
each job is one task (a worker that dies is retried). The result is a table, one row per
job, and the CLI's exit status is the number of failed jobs (at most 100).
"""

from __future__ import annotations

import dataclasses
import time
import tomllib
from pathlib import Path

from .errors import InputError, QCompilerError

_FIELDS = {"name", "model", "target", "output", "preset", "pipeline", "calib", "input_shapes", "force", "report"}


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    model: str
    target: str
    output: str
    preset: str | None = None
    pipeline: str | None = None
    calib: str | None = None
    input_shapes: dict | None = None
    force: bool = False
    report: bool = False
    index: int = 0  # position in the file


def load_jobs(path: str | Path) -> list[Job]:
    """The jobs of a TOML file; a malformed file or job is refused naming the job and field."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"--jobs {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"--jobs {path}: not TOML: {exc}") from None
    entries = data.get("job")
    if not isinstance(entries, list) or not entries:
        raise InputError(f"--jobs {path}: no [[job]] tables")
    base = path.parent.resolve()
    jobs, names = [], set()
    for index, entry in enumerate(entries, 1):
        where = f"--jobs {path}: job {index}"
        unknown = sorted(set(entry) - _FIELDS)
        if unknown:
            raise InputError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(sorted(_FIELDS))})")
        for field in ("model", "target", "output"):
            if not isinstance(entry.get(field), str) or not entry[field]:
                raise InputError(f"{where}: needs {field} = \"...\"")
        resolve = lambda p: str(p if Path(p).is_absolute() else base / p)
        name = str(entry.get("name") or Path(entry["output"]).name)
        if name in names:
            raise InputError(f"{where}: a second job named {name!r}")
        names.add(name)
        jobs.append(Job(
            name=name, model=resolve(entry["model"]), target=entry["target"], output=resolve(entry["output"]),
            preset=entry.get("preset"), pipeline=entry.get("pipeline"),
            calib=resolve(entry["calib"]) if entry.get("calib") else None,
            input_shapes=entry.get("input_shapes"), force=bool(entry.get("force", False)),
            report=bool(entry.get("report", False)), index=index - 1,
        ))
    return jobs


def run_job(job: Job) -> dict:
    """Compile one job; never raises: ``{"name", "status", "seconds", ...}``."""
    import qcompiler

    from .cluster import fault_drill

    start = time.perf_counter()
    row = {"name": job.name, "target": job.target, "output": job.output}
    try:
        fault_drill("job", job.index)
        shapes = {k: tuple(v) for k, v in job.input_shapes.items()} if job.input_shapes else None
        result = qcompiler.compile(job.model, job.target, job.output, preset=job.preset, pipeline=job.pipeline,
                                   calib=job.calib, input_shapes=shapes, force=job.force, report=job.report)
        row.update(status="ok", verified=result.manifest["verified"]["status"])
    except QCompilerError as exc:
        row.update(status="failed", error=_one_line(str(exc)))
    except Exception as exc:  # noqa: BLE001 - a bug in one job must not stop the farm
        row.update(status="failed", error=f"internal error: {type(exc).__name__}: {_one_line(str(exc))}")
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def run_jobs(jobs: list[Job], cluster=None, progress: bool = True) -> list[dict]:
    """Every job, in order of the file (on ``cluster`` when given: one task per job)."""
    if cluster is not None:
        return cluster.map(run_job, jobs)
    rows = []
    iterator = jobs
    if progress:
        import sys

        from tqdm import tqdm

        iterator = tqdm(jobs, desc="jobs", unit="job", file=sys.stderr, leave=False)
    for job in iterator:
        rows.append(run_job(job))
    return rows


def summary(rows: list[dict]) -> str:
    """The rows as a plain-text table, with a count of the failed jobs."""
    header = ("job", "target", "status", "seconds", "detail")
    lines = [[r["name"], r["target"], r["status"], f"{r['seconds']:.1f}",
              r.get("error") or f"{r.get('verified', '')} -> {r['output']}"] for r in rows]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    failed = sum(r["status"] != "ok" for r in rows)
    out = [fmt.format(*header), *(fmt.format(*line) for line in lines)]
    out.append(f"{len(rows) - failed} of {len(rows)} jobs compiled, {failed} failed")
    return "\n".join(out)


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."
