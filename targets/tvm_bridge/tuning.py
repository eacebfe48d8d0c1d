"""Auto-tuning of CPU kernels with TVM MetaSchedule, kept in a persistent database.

Part of the TVM bridge layer (imports ``tvm`` lazily). :class:`Tuner` is handed to
:func:`targets.tvm_bridge.compile` (``tune=``); on the fused Relax module (after
legalisation and fusion) it:

1. extracts one tuning task per distinct kernel, leaving out the kernels qcompiler
   schedules itself (PrimFuncs with the ``SCHEDULED`` attribute: the ``qc_int8_*``
   dot-product kernels);
2. looks every task up in the JSON database of the target (``DB/<target key>/``:
   MetaSchedule's ``database_workload.json`` and ``database_tuning_record.json``,
   keyed by the structural hash of the kernel); tasks that already have a record are
   not tuned again, so a compile with a warm database runs zero trials;
3. tunes the remaining tasks for ``trials`` measured candidates in total (an
   in-process builder, MetaSchedule's local runner in a subprocess fed with inputs
   integer kernels can take, an ``xgb`` cost model where ``xgboost`` is installed, else
   a random one); a task that gets no working candidate is listed in
   ``no_records.json`` and not tuned again;
4. checks the best records against the kernel as qcompiler would build it, on random
   inputs: integer outputs must be bit-identical, float ones close (reductions may be
   reordered), run in a subprocess (a crash counts as a difference); a record that
   differs is skipped for the next best one; a correct one is used only where it beats
   qcompiler's default schedule of the kernel (``must_beat_default``); verdicts are
   cached in ``verified.json`` next to the database;
5. applies the chosen records (``relax.transform.MetaScheduleApplyDatabase`` with an
   in-memory database of those records) and marks the tuned kernels ``SCHEDULED`` so
   the default CPU schedule leaves them alone; every other kernel keeps qcompiler's.

``Tuner.report`` says what happened (for the manifest).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Records checked per kernel before giving up on tuning it (the rest keep the default schedule).
_MAX_CANDIDATES = 5
#: Measured candidates per search round (MetaSchedule's ``num_trials_per_iter``) at most.
_TRIALS_PER_ITER = 64
_VERIFIED = "verified.json"
#: Kernels that were tuned but gave no working candidate (not tuned again).
_FRUITLESS = "no_records.json"


def default_db_dir() -> Path:
    """``$QCOMPILER_TUNING_DB``, else ``$XDG_CACHE_HOME/qcompiler/tuning`` (``~/.cache/qcompiler/tuning``)."""
    env = os.environ.get("QCOMPILER_TUNING_DB")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "qcompiler" / "tuning"


@dataclass(frozen=True)
class TuningOptions:
    """``trials``: measured candidates in total for the kernels without a record (0: use
    the database only, tune nothing); ``db_dir``: the database folder (None: default)."""

    trials: int = 0
    db_dir: Path | None = None
    progress: bool = True
    seed: int = 0
    #: Use a tuned kernel only where it runs faster than qcompiler's default schedule
    #: (timed when the record is checked); False: whenever it is correct.
    must_beat_default: bool = True

    @property
    def folder(self) -> Path:
        return Path(self.db_dir).expanduser() if self.db_dir is not None else default_db_dir()


def target_key(target) -> str:
    """Folder name of a target's database: readable kind/cpu, plus a hash of the whole target."""
    text = str(target)
    cpu = target.attrs.get("mcpu") or target.attrs.get("mtriple") or ""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{target.kind.name}-{cpu}").strip("-")
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


@dataclass
class _Task:
    name: str
    mod: Any  # IRModule {"main": PrimFunc} as MetaSchedule sees it
    weight: int
    record: Any = None  # the verified TuningRecord, if any
    trials: int = 0  # candidates measured in this compile


@dataclass
class Tuner:
    options: TuningOptions
    log: Any = field(default=lambda message: None)
    report: dict = field(default_factory=dict)

    def __call__(self, mod, target):
        """Tune (where needed) and apply the database to a fused Relax module ``mod``."""
        import tvm
        from tvm.s_tir import meta_schedule as ms

        from .common import SCHEDULED

        start = time.perf_counter()
        folder = self.options.folder / target_key(target)
        folder.mkdir(parents=True, exist_ok=True)
        tasks = []
        for task in ms.relax_integration.extract_tasks(mod, target):
            func = task.dispatched[0]["main"]
            if func.attrs is not None and SCHEDULED in func.attrs:
                continue
            tasks.append(_Task(task.task_name, task.dispatched[0], int(task.weight)))
        database = ms.database.JSONDatabase(work_dir=str(folder), module_equality="structural")
        # kernels tuned before without a single working candidate are not tuned again
        fruitless = _load_json(folder / _FRUITLESS)
        missing = [t for t in tasks if not _has_record(database, t.mod) and _task_key(t) not in fruitless]
        trials = 0
        error = None
        if missing and self.options.trials > 0:
            try:
                with target:
                    trials = self._tune(missing, target, database, folder)
            except Exception as exc:  # noqa: BLE001 - the records saved so far are still used
                error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                print(f"qcompile: note: tuning stopped early ({error}); using the records saved so far",
                      file=sys.stderr)
            tried = [t for t in missing if t.trials and not _has_record(database, t.mod)]
            if tried:
                fruitless.update({_task_key(t): t.trials for t in tried})
                _save_json(folder / _FRUITLESS, fruitless)
        verified = _load_json(folder / _VERIFIED)
        chosen = ms.database.MemoryDatabase(module_equality="structural")
        rejected, slower = _choose_records(database, tasks, target, verified, self.options.must_beat_default)
        for task in tasks:
            if task.record is not None:
                chosen.commit_tuning_record(
                    ms.database.TuningRecord(
                        task.record.trace, chosen.commit_workload(task.mod), task.record.run_secs,
                        target, task.record.args_info,
                    )
                )
        _save_json(folder / _VERIFIED, verified)
        applied = [t for t in tasks if t.record is not None]
        new = {id(t) for t in missing}
        if applied:
            with target, chosen, tvm.transform.PassContext(opt_level=3):
                mod = tvm.relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
            mod = _mark_tuned(mod, SCHEDULED)
        self.report = {
            "database": str(folder),
            "trials_requested": self.options.trials,
            "trials_run": trials,
            "kernels": len(tasks),
            "kernels_tuned_now": sum(1 for t in applied if id(t) in new),
            "kernels_from_database": sum(1 for t in applied if id(t) not in new),
            "kernels_default_schedule": len(tasks) - len(applied),
            "records_rejected": rejected,
            "records_slower_than_default": slower,
        }
        if error is not None:
            self.report["error"] = error
        self.log(f"tuning: {self.report} in {time.perf_counter() - start:.1f} s")
        return mod

    def _tune(self, tasks: list[_Task], target, database, folder: Path) -> int:
        from tvm.s_tir import meta_schedule as ms

        per_iter = max(1, min(_TRIALS_PER_ITER, self.options.trials // len(tasks)))
        cores = int(target.attrs.get("num-cores") or os.cpu_count() or 1)
        with tempfile.TemporaryDirectory(prefix="qc-tune-") as work:
            contexts = [
                ms.TuneContext(
                    mod=task.mod, target=target, space_generator="post-order-apply",
                    search_strategy=_search_strategy(per_iter), task_name=task.name,
                    rand_state=self.options.seed + i, num_threads=cores,
                    logger=_quiet_logger(task.name),
                ).clone()
                for i, task in enumerate(tasks)
            ]
            counter = _TrialCounter(self.options.trials, self.options.progress, tasks)
            try:
                ms.tune_tasks(
                    tasks=contexts, task_weights=[float(t.weight) for t in tasks], work_dir=work,
                    max_trials_global=self.options.trials, num_trials_per_iter=per_iter,
                    builder=_in_process_builder(work), runner=_runner(),
                    database=database, cost_model=_cost_model(cores),
                    measure_callbacks=ms.MeasureCallback.create("default") + [_measure_callback(counter)],
                    task_scheduler="gradient",
                )
            finally:
                counter.close()
        return counter.count


def _search_strategy(per_iter: int):
    """MetaSchedule's evolutionary search, its population scaled down for small budgets
    (the defaults sample thousands of schedules per round: minutes for a few trials)."""
    from tvm.s_tir import meta_schedule as ms

    return ms.search_strategy.EvolutionarySearch(
        population_size=min(512, max(64, 8 * per_iter)),
        init_min_unmeasured=min(50, max(8, per_iter)),
        max_fail_count=2 if per_iter < 32 else 5,
        genetic_num_iters=2 if per_iter < 32 else 4,
    )


def _has_record(database, mod) -> bool:
    if not database.has_workload(mod):
        return False
    return bool(database.get_top_k(database.commit_workload(mod), 1))


def _task_key(task: _Task) -> str:
    return hashlib.sha256(task.mod.script(show_meta=False).encode()).hexdigest()


def _record_key(task: _Task, record) -> str:
    text = task.mod.script(show_meta=False) + "\n" + str(record.trace)
    return hashlib.sha256(text.encode()).hexdigest()


def _choose_records(database, tasks: list[_Task], target, verified: dict, must_beat_default: bool):
    """Set each task's ``record`` to its best record that computes what the untuned kernel
    does (and, with ``must_beat_default``, runs faster than qcompiler's default schedule);
    checked in a subprocess, cached in ``verified``. Returns (rejected, slower) counts."""
    candidates = {}
    for i, task in enumerate(tasks):
        if database.has_workload(task.mod):
            candidates[i] = list(database.get_top_k(database.commit_workload(task.mod), _MAX_CANDIDATES))
    position = dict.fromkeys(candidates, 0)
    rejected = slower = 0
    while True:
        pending = []
        for i, records in candidates.items():
            while position[i] < len(records) and tasks[i].record is None:
                record = records[position[i]]
                key = _record_key(tasks[i], record)
                verdict = _verdict(verified.get(key), must_beat_default)
                if verdict is None:
                    pending.append((i, record, key))
                    break
                if verdict == "same" or (verdict == "slower" and not must_beat_default):
                    tasks[i].record = record
                elif verdict == "slower":
                    slower += 1
                    position[i] = len(records)  # the next best are slower still
                else:
                    rejected += 1
                    position[i] += 1
        if not pending:
            return rejected, slower
        verdicts = _check_records([(tasks[i].mod, record) for i, record, _ in pending], target, must_beat_default)
        for (i, record, key), verdict in zip(pending, verdicts):
            verified[key] = verdict


def _verdict(cached, timed: bool) -> str | None:
    """A cached check result: "same", "slower" (same, not faster than the default schedule),
    "differs", or None (not checked; "untimed": checked without timing)."""
    if cached is True or cached == "untimed":
        return None if timed else "same"
    if cached is False:
        return "differs"
    return cached


def _check_records(pairs, target, timed: bool) -> list[str]:
    """For each ``(workload, record)``: does the record's schedule compute what the workload does?"""
    from tvm import s_tir

    tuned = []
    for mod, record in pairs:
        try:
            sch = s_tir.Schedule(mod)
            record.trace.apply_to_schedule(sch, remove_postproc=False)
            tuned.append(sch.mod)
        except Exception:  # noqa: BLE001 - a record that does not replay is not used
            tuned.append(None)
    baselines = [_default_schedule(mod, target) for mod, _ in pairs] if timed else None
    verdicts = _compare_many([(mod, t) for (mod, _), t in zip(pairs, tuned)], target, baselines)
    return [v if timed or v != "same" else "untimed" for v in verdicts]


def _default_schedule(mod, target):
    """The kernel as qcompiler schedules it without tuning."""
    import tvm

    from .schedules import cpu_kernel_schedule

    with target:
        func = cpu_kernel_schedule(mod["main"])
    return tvm.IRModule({"main": func}) if func is not None else mod


def outputs_agree(plain, tuned, target) -> bool:
    """Whether two versions of one kernel (``IRModule`` ``{"main": PrimFunc}``) give the same
    results on random inputs: integer buffers bit-identical, float ones close."""
    return _compare_many([(plain, tuned)], target)[0] == "same"


def _compare_many(pairs, target, baselines=None) -> list[str]:
    """"same" or "differs" for each ``(plain, tuned)`` pair (``tuned`` None: "differs"); with
    ``baselines`` (one module per pair), "slower" where ``tuned`` is correct but not faster
    than the baseline. Everything is built here and run in a subprocess, so a kernel that
    crashes on the random inputs (a division by zero, an index out of range) only counts
    as a difference."""
    import subprocess

    import tvm
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    verdicts: list[str] = ["differs"] * len(pairs)
    with tempfile.TemporaryDirectory(prefix="qc-check-") as work:
        jobs = []
        for index, (plain, tuned) in enumerate(pairs):
            if tuned is None:
                continue
            versions = [("plain", plain), ("tuned", tuned)]
            if baselines is not None:
                versions.append(("baseline", baselines[index]))
            try:
                paths = {}
                for name, mod in versions:
                    paths[name] = os.path.join(work, f"{index}-{name}.so")
                    tvm.compile(mod, target=target).export_library(paths[name])
            except Exception:  # noqa: BLE001 - a schedule that does not build is not used
                continue
            args = [[str(info.dtype), [int(d) for d in info.shape]] for info in ArgInfo.from_prim_func(plain["main"])]
            jobs.append({"index": index, **paths, "args": args})
        while jobs:
            spec = os.path.join(work, "jobs.json")
            Path(spec).write_text(json.dumps(jobs))
            done = subprocess.run(
                [sys.executable, "-m", "qcompiler.targets.tvm_bridge.tuning", "--check", spec],
                capture_output=True, text=True, timeout=600,
            )
            answered = 0
            for line in done.stdout.splitlines():
                if line.startswith("verdict "):
                    _, index, verdict = line.split()
                    verdicts[int(index)] = verdict
                    answered += 1
            if done.returncode == 0 and answered == len(jobs):
                break
            jobs = jobs[answered + 1 :]  # the job it died on stays "differs"
    return verdicts


def _check_worker(spec: str) -> None:
    """Subprocess side of :func:`_compare_many`: one ``verdict INDEX same|differs|slower`` line per job."""
    import tvm

    dev = tvm.cpu()
    for job in json.loads(Path(spec).read_text()):
        libs = [tvm.runtime.load_module(job["plain"]), tvm.runtime.load_module(job["tuned"])]
        rng = np.random.default_rng(0)
        same = True
        for _ in range(2):
            arrays = [_random_array(rng, dtype, shape) for dtype, shape in job["args"]]
            results = []
            for lib in libs:
                tensors = [tvm.runtime.tensor(a, dev) for a in arrays]
                lib["main"](*tensors)
                results.append([t.numpy() for t in tensors])
            same = same and all(_same(want, got) for want, got in zip(*results))
        verdict = "same" if same else "differs"
        if same and "baseline" in job:
            args = [tvm.runtime.tensor(a, dev) for a in arrays]
            tuned_s = _seconds(libs[1], dev, args)
            baseline_s = _seconds(tvm.runtime.load_module(job["baseline"]), dev, args)
            if tuned_s >= 0.97 * baseline_s:
                verdict = "slower"
        print(f"verdict {job['index']} {verdict}", flush=True)


def _seconds(lib, dev, args) -> float:
    timer = lib.time_evaluator("main", dev, number=1, repeat=5, min_repeat_ms=10)
    return float(min(timer(*args).results))


def _same(want: np.ndarray, got: np.ndarray) -> bool:
    if want.dtype.kind != "f":
        return bool(np.array_equal(got, want))
    finite = np.abs(want[np.isfinite(want)])
    scale = max(float(finite.max()) if finite.size else 1.0, 1.0)
    return bool(np.allclose(got, want, rtol=1e-4, atol=1e-5 * scale, equal_nan=True))


def _random_array(rng, dtype: str, shape) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype in (np.int8, np.uint8):  # data: the full range (catches saturating dot products)
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, endpoint=True, dtype=dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    # wider integers may be indices, shifts, sizes or divisors: small positive values
    return rng.integers(1, 4, shape).astype(dtype)


def _mark_tuned(mod, attribute: str):
    import tvm

    mod = mod.clone() if hasattr(mod, "clone") else mod
    for gvar, func in list(mod.functions.items()):
        if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and func.attrs.get("tirx.is_scheduled"):
            mod[gvar] = func.with_attr(attribute, True)
    return mod


_ALLOC = "qcompiler.tuning.alloc_argument"


def _runner():
    """MetaSchedule's local runner (a subprocess) with inputs the kernels can take: its
    default fills every buffer with random bits, so integer kernels divide by zero or
    index out of range, crash, and leave no record."""
    from tvm.s_tir import meta_schedule as ms

    return ms.runner.LocalRunner(timeout_sec=30, f_alloc_argument=_ALLOC, initializer=_runner_init)


def _runner_init() -> None:
    """Runs in the runner's worker process: registers the argument allocator."""
    import tvm

    def alloc(device, args_info, alloc_repeat):
        rng = np.random.default_rng(0)
        return [
            [tvm.runtime.tensor(_random_array(rng, dtype, shape), device) for _, dtype, shape in args_info]
            for _ in range(alloc_repeat)
        ]

    tvm.register_global_func(_ALLOC, alloc, override=True)


def _cost_model(cores: int):
    from tvm.s_tir import meta_schedule as ms

    try:
        import psutil  # noqa: F401
        import xgboost  # noqa: F401
    except ImportError:
        return ms.CostModel.create("random")
    return ms.CostModel.create("xgb", num_tuning_cores=cores)


def _in_process_builder(work: str):
    """Builds candidates in this process (MetaSchedule's LocalBuilder starts workers that
    each spend ~30 s importing TVM's tensor intrinsics, and time out)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.ir.utils import derived_object
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for item in build_inputs:
                try:
                    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(item.mod)
                    lib = tvm.compile(mod, target=item.target)
                    # MetaSchedule deletes the folder of each artifact once measured
                    path = os.path.join(tempfile.mkdtemp(prefix="candidate", dir=work), "kernel.so")
                    lib.export_library(path)
                    results.append(BuilderResult(path, None))
                except Exception as exc:  # noqa: BLE001 - a candidate that fails to build is skipped
                    results.append(BuilderResult(None, f"{type(exc).__name__}: {exc}"))
            return results

    del ms
    return InProcessBuilder()


class _TrialCounter:
    """Counts measured candidates; draws a progress bar on stderr (tqdm where installed)."""

    def __init__(self, total: int, show: bool, tasks: list[_Task]):
        self.tasks = tasks
        self.count = 0
        self.total = total
        self.bar = None
        self.show = show
        if show:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="tuning", unit="trial", file=sys.stderr, leave=False)
            except ImportError:
                self.bar = None

    def add(self, n: int, task_id: int) -> None:
        self.count += n
        task = ""
        if 0 <= task_id < len(self.tasks):
            self.tasks[task_id].trials += n
            task = self.tasks[task_id].name
        if not self.show:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(task if len(task) <= 32 else task[:29] + "...", refresh=False)
            self.bar.update(n)
        else:
            print(f"\rtuning: {self.count}/{self.total} trials", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.show and self.count:
            print(file=sys.stderr)


def _measure_callback(counter: _TrialCounter):
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
    from tvm.ir.utils import derived_object

    @derived_object
    class Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            counter.add(len(measure_candidates), int(task_id))

    return Progress()


def _quiet_logger(name: str):
    import logging

    logger = logging.getLogger(f"qcompiler.tuning.{name}")
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    return logger


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name, dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=0, sort_keys=True))
    os.replace(tmp, path)


if __name__ == "__main__":  # the check worker: python -m qcompiler.targets.tvm_bridge.tuning --check JOBS.json
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        _check_worker(sys.argv[2])
    else:
        sys.exit("usage: python -m qcompiler.targets.tvm_bridge.tuning --check JOBS.json")
