"""Running work on a Ray cluster (``--cluster local:N`` or ``--cluster ray://HOST:PORT``).

Nothing here imports Ray until a cluster is asked for. A :class:`Cluster` maps a
module-level function over items as Ray tasks (order kept, each retried when its worker
dies) and ships large arguments once (:meth:`Cluster.put`). What runs on it is written so
that the result is bit-identical to one process (calibration statistics merge exactly,
see :mod:`qcompiler.histogram`), whatever the number of workers and the order they finish.

A lost cluster (no answer at the address, a worker pool that died for good) is a
:class:`~qcompiler.errors.ClusterError`: one line, exit 2.

Fault drills: with ``QCOMPILER_FAULT_DRILL=KIND:INDEX:FOLDER`` the task ``INDEX`` of the
work ``KIND`` (e.g. ``calibration``) kills its own worker process the first time it runs
(a marker file in ``FOLDER`` remembers it); Ray retries it, and the result must not change.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import ClusterError

_LOCAL = re.compile(r"^local:(\d+)$")
_REMOTE = re.compile(r"^ray://[^\s:/]+:\d+$")
#: How often a task whose worker died is run again.
RETRIES = 3


@dataclasses.dataclass
class Cluster:
    """A connected Ray cluster; use as a context manager (``connect(spec)``)."""

    spec: str
    workers: int
    _started_here: bool = False

    def put(self, value: Any):
        import ray

        return ray.put(value)

    def map(self, function: Callable, items: Sequence, *args) -> list:
        """``[function(item, *args) for item in items]`` as Ray tasks (``args`` may be
        :meth:`put` references), results in item order."""
        import ray

        remote = ray.remote(max_retries=RETRIES, retry_exceptions=False)(function).options(
            runtime_env={"env_vars": _worker_env()})
        refs = [remote.remote(item, *args) for item in items]
        try:
            return ray.get(refs)
        except ray.exceptions.RayError as exc:
            raise ClusterError(f"cluster {self.spec}: {_first_line(exc)}") from None

    def map_with_state(self, make_state: Callable, state_args: tuple, function: Callable, items: Sequence) -> list:
        """``[function(state, item) for item in items]`` where each worker builds ``state =
        make_state(*state_args)`` once (a Ray actor per worker: an onnxruntime session, say)
        and items go to the workers in turn; results in item order. A worker that dies is
        restarted (its state built again) and its items run again."""
        import ray

        actor = ray.remote(max_restarts=RETRIES, max_task_retries=RETRIES)(_StatefulWorker).options(
            runtime_env={"env_vars": _worker_env()})
        workers = [actor.remote(make_state, *state_args) for _ in range(min(self.workers, len(items)) or 1)]
        refs = [workers[i % len(workers)].run.remote(function, item) for i, item in enumerate(items)]
        try:
            return ray.get(refs)
        except ray.exceptions.RayError as exc:
            raise ClusterError(f"cluster {self.spec}: {_first_line(exc)}") from None
        finally:
            for worker in workers:
                ray.kill(worker)

    def close(self) -> None:
        if self._started_here:
            import ray

            ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _StatefulWorker:
    """A Ray actor holding one piece of state for many calls."""

    def __init__(self, make_state: Callable, *args):
        self.state = make_state(*args)
        self.calls = 0

    def run(self, function: Callable, item):
        self.calls += 1
        fault_drill(getattr(function, "__name__", "task"), self.calls - 1)
        return function(self.state, item)


def connect(spec: str) -> Cluster:
    """Start a local Ray (``local:N``: N worker CPUs) or join one (``ray://HOST:PORT``)."""
    local = _LOCAL.match(spec or "")
    if not local and not _REMOTE.match(spec or ""):
        raise ClusterError(f"--cluster {spec!r}: expected local:N or ray://HOST:PORT")
    try:
        import ray
    except ImportError:
        raise ClusterError("--cluster needs Ray: pip install 'qcompiler[cluster]'") from None
    if ray.is_initialized():
        return Cluster(spec, int(ray.available_resources().get("CPU", 1)))
    import logging

    # The notice that a new local cluster uses token authentication (the default) is not news.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    try:
        if local:
            workers = int(local.group(1))
            if workers < 1:
                raise ClusterError(f"--cluster {spec!r}: needs at least one worker")
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                     configure_logging=False)
        else:
            ray.init(address=spec, log_to_driver=False, logging_level="ERROR", configure_logging=False)
            workers = int(ray.cluster_resources().get("CPU", 1))
    except ClusterError:
        raise
    except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:
        raise ClusterError(f"--cluster {spec}: cannot connect: {_first_line(exc)}") from None
    return Cluster(spec, workers, _started_here=True)


def _worker_env() -> dict[str, str]:
    """Environment the workers need to compute what this process computes (read at each
    call: a fault drill set after the cluster started still reaches the tasks)."""
    keep = ("QCOMPILER_FAULT_DRILL", "OMP_NUM_THREADS", "TVM_NUM_THREADS")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def shards(items: Sequence, count: int) -> list[list]:
    """``items`` in ``count`` contiguous, nearly equal parts (none empty)."""
    count = max(1, min(count, len(items)))
    size, extra = divmod(len(items), count)
    out, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        out.append(list(items[start:end]))
        start = end
    return out


def fault_drill(kind: str, index: int) -> None:
    """Kill this worker the first time task ``index`` of ``kind`` runs, if a drill asks."""
    drill = os.environ.get("QCOMPILER_FAULT_DRILL", "")
    parts = drill.split(":", 2)
    if len(parts) != 3 or parts[0] != kind or parts[1] != str(index):
        return
    marker = Path(parts[2]) / f"{kind}-{index}.killed"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("killed once\n")
    os._exit(1)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
