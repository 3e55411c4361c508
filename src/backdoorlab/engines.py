"""Where grid cells run: locally (in this process, or ``workers`` processes) or on Ray.

Tasks are plain functions of plain data (configs as JSON, weights as safetensors bytes) that
return :class:`CellOutcome` lists; they never touch the store. The driver
(:func:`backdoorlab.bench.run_grid`) alone writes the database.

- ``victim_task``: prepare the data, train the victim (or load the cached weights the driver sent),
  evaluate CA / ASR. Returns the weights, so defense tasks and the cache get them.
- ``defense_task``: rebuild the same poisoned data (deterministic: seeded generators), load the
  victim's weights, run one defense (or an inspector and the cleanser that reuses its inspection). The prepared data is kept per worker process (keyed by the
  victim), so the defenses of one victim share one preparation on a worker.
- ``group_task``: a victim trained by a training-time attack (input-aware, pruning-aware) cannot
  be cached, so it runs with all its defenses in one task.

Engines: :class:`LocalEngine` (``workers=1``: run in the driver, one task at a time, in order;
``workers>1``: a spawn process pool, one torch thread each) and :class:`RayEngine` (tasks on a
local Ray instance or an existing cluster, ``num_cpus=1`` and one torch thread per task).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from backdoorlab.errors import BackdoorLabError

log = logging.getLogger(__name__)


@dataclass
class CellOutcome:
    """What a task returns for one cell."""

    cell_id: str
    ok: bool
    metrics: dict[str, float] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=dict)
    weights: bytes | None = None
    error: str | None = None
    seconds: float = 0.0
    pid: int = 0


@dataclass(frozen=True)
class VictimPayload:
    """A trained victim as the defense tasks receive it."""

    weights: bytes
    metrics: dict[str, float]


# ----------------------------------------------------------------------------- task helpers
_PREP_CACHE: "OrderedDict[str, Any]" = OrderedDict()
_PREP_CACHE_SIZE = 2


def _config(cfg_json: str):
    from backdoorlab.config import ExperimentConfig

    return ExperimentConfig.model_validate_json(cfg_json)


def _threads(n: int | None) -> None:
    from backdoorlab.runtime import tune_allocator

    tune_allocator()  # every task runs this first, in whatever worker process it lands (idempotent)
    if n is not None:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def _prepared(cfg) -> Any:
    """The prepared (poisoned) data of ``cfg``; reused within this process for the same victim."""
    from backdoorlab.experiment import prepare

    key = cfg.victim_key()
    if key in _PREP_CACHE:
        _PREP_CACHE.move_to_end(key)
        return _PREP_CACHE[key]
    prep = prepare(cfg)
    _PREP_CACHE[key] = prep
    while len(_PREP_CACHE) > _PREP_CACHE_SIZE:
        _PREP_CACHE.popitem(last=False)
    return prep


def model_to_bytes(model) -> bytes:
    from backdoorlab.models import save_model

    with tempfile.TemporaryDirectory(prefix="backdoorlab-w-") as d:
        p = Path(d) / "w.safetensors"
        save_model(model, p)
        return p.read_bytes()


def model_from_bytes(data: bytes, num_classes: int, input_shape) -> Any:
    from backdoorlab.models import load_model

    with tempfile.TemporaryDirectory(prefix="backdoorlab-w-") as d:
        p = Path(d) / "w.safetensors"
        p.write_bytes(data)
        return load_model(p, num_classes=num_classes, input_shape=tuple(input_shape))


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, BackdoorLabError):
        return str(exc)
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _victim_outcome(cell_id: str, cfg, prep, model, history: dict, cached: bool, t0: float) -> CellOutcome:
    from backdoorlab.experiment import evaluate_victim
    from backdoorlab.records import victim_figures

    metrics = evaluate_victim(model, prep, cfg.train.eval_batch_size)
    metrics["victim_from_cache"] = float(cached)
    figs = victim_figures(prep, history, cfg.name)
    return CellOutcome(cell_id, True, metrics, figs, history, model_to_bytes(model), None,
                       time.perf_counter() - t0, os.getpid())


def _defense_outcome(cell_id: str, cfg, prep, model, before: dict[str, float], t0: float,
                     context: dict | None = None) -> CellOutcome:
    from backdoorlab.defenses import DEFENSES
    from backdoorlab.experiment import run_defense

    d = cfg.defenses[0]
    defense = DEFENSES.build(d.name, d.extras(), where=f"defense {d.name}")
    from backdoorlab.experiment import defense_context

    context = {} if context is None else context
    if "reference" not in context:  # shared (in place) by the defenses of one task
        context.update(defense_context(cfg, prep, None))
    ca, asr = before["clean_accuracy"], before.get("attack_success_rate")
    m, figs = run_defense(defense, model, prep, ca, asr, cfg.train.eval_batch_size, context, seed=cfg.seed)
    metrics = {**m, "clean_accuracy_before": ca}
    if asr is not None:
        metrics["attack_success_rate_before"] = asr
    return CellOutcome(cell_id, True, metrics, figs, {}, None, None, time.perf_counter() - t0, os.getpid())


# ----------------------------------------------------------------------------- tasks
def _start(cfg_json: str, threads: int | None):
    """The task's experiment config, with torch set up (the engine's thread count wins)."""
    from backdoorlab.experiment import setup_torch

    _threads(threads)
    cfg = _config(cfg_json)
    setup_torch(cfg)
    _threads(threads)
    return cfg


def victim_task(cell_id: str, cfg_json: str, cached_weights: bytes | None, threads: int | None) -> list[CellOutcome]:
    """Train (or load) and evaluate one victim."""
    t0 = time.perf_counter()
    try:
        from backdoorlab.experiment import train_victim

        cfg = _start(cfg_json, threads)
        prep = _prepared(cfg)
        data = prep.train_set
        if cached_weights is not None:
            model, history, cached = model_from_bytes(cached_weights, data.num_classes, data.shape), {}, True
        else:
            model, history, cached = train_victim(cfg, prep, None)
        return [_victim_outcome(cell_id, cfg, prep, model, history, cached, t0)]
    except Exception as exc:  # reported as a failed cell; the grid goes on
        log.debug("victim cell %s failed", cell_id, exc_info=True)
        return [CellOutcome(cell_id, False, error=_error_text(exc), seconds=time.perf_counter() - t0, pid=os.getpid())]


def defense_task(cells: list[tuple[str, str]], victim: VictimPayload, threads: int | None) -> list[CellOutcome]:
    """Run defenses against a trained victim, in order, sharing a context: a cleanser after an
    inspector reuses its inspection (the driver chains them only when that changes no result)."""
    out: list[CellOutcome] = []
    context: dict = {}
    for cell_id, cfg_json in cells:
        t0 = time.perf_counter()
        try:
            _threads(threads)
            cfg = _config(cfg_json)
            prep = _prepared(cfg)
            data = prep.train_set
            model = model_from_bytes(victim.weights, data.num_classes, data.shape)
            out.append(_defense_outcome(cell_id, cfg, prep, model, victim.metrics, t0, context))
        except Exception as exc:
            log.debug("defense cell %s failed", cell_id, exc_info=True)
            out.append(CellOutcome(cell_id, False, error=_error_text(exc), seconds=time.perf_counter() - t0, pid=os.getpid()))
    return out


def group_task(victim_cell_id: str, cfg_json: str, defense_cells: list[tuple[str, str]],
               threads: int | None) -> list[CellOutcome]:
    """A victim of a training-time attack and all its defenses, in one task (not cacheable)."""
    t0 = time.perf_counter()
    try:
        from backdoorlab.experiment import prepare, train_victim

        cfg = _start(cfg_json, threads)
        prep = prepare(cfg)  # mutated by the training-time attack: never shared
        model, history, cached = train_victim(cfg, prep, None)
        victim = _victim_outcome(victim_cell_id, cfg, prep, model, history, cached, t0)
    except Exception as exc:
        err = _error_text(exc)
        return [CellOutcome(victim_cell_id, False, error=err, pid=os.getpid())] + [
            CellOutcome(cid, False, error=f"victim failed: {err}", pid=os.getpid()) for cid, _ in defense_cells]
    out = [victim]
    data = prep.train_set
    for cid, djson in defense_cells:
        t1 = time.perf_counter()
        try:
            model = model_from_bytes(victim.weights, data.num_classes, data.shape)
            out.append(_defense_outcome(cid, _config(djson), prep, model, victim.metrics, t1))
        except Exception as exc:
            out.append(CellOutcome(cid, False, error=_error_text(exc), seconds=time.perf_counter() - t1, pid=os.getpid()))
    return out


# ----------------------------------------------------------------------------- engines
class Engine:
    """Runs task functions; ``wait`` returns at least one finished (handle, result or exception)."""

    name = "engine"
    workers = 1

    def submit(self, fn: Callable[..., list[CellOutcome]], *args: Any) -> Any:
        raise NotImplementedError

    def wait(self, handles: list[Any]) -> list[tuple[Any, Any]]:
        raise NotImplementedError

    def share(self, obj: Any) -> Any:
        """Something to pass to many tasks (an object reference on Ray)."""
        return obj

    def threads(self) -> int | None:
        """Torch threads per task (None: leave the process's setting)."""
        return 1

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return f"{self.name} ({self.workers} worker{'s' if self.workers != 1 else ''})"


class LocalEngine(Engine):
    """``workers=1``: tasks run in this process, in the order submitted, when waited for.
    ``workers>1``: a process pool (spawn), one torch thread per worker."""

    name = "local"

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise BackdoorLabError(f"--workers {workers}: give 1 or more")
        self.workers = workers
        self._pool = None
        self._queue: list[int] = []
        self._tasks: dict[int, tuple[Callable, tuple]] = {}
        self._next = 0
        if workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                             initializer=_init_worker)

    def threads(self) -> int | None:
        return None if self._pool is None else 1

    def submit(self, fn, *args):
        if self._pool is not None:
            return self._pool.submit(fn, *args)
        h = self._next
        self._next += 1
        self._tasks[h] = (fn, args)
        return h

    def wait(self, handles):
        if self._pool is not None:
            from concurrent.futures import FIRST_COMPLETED, wait

            done, _ = wait(handles, return_when=FIRST_COMPLETED)
            out = []
            for f in done:
                exc = f.exception()
                out.append((f, exc if exc is not None else f.result()))
            return out
        h = min(handles)  # the oldest submitted
        fn, args = self._tasks.pop(h)
        try:
            return [(h, fn(*args))]
        except Exception as exc:  # tasks catch their own errors; this is a bug guard
            return [(h, exc)]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _init_worker() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


class RayEngine(Engine):
    """Cells as Ray tasks (``num_cpus=1`` each, one torch thread). ``address=None`` starts a local
    Ray instance with ``workers`` CPUs; ``address="auto"`` (or ``ray://...``) joins a cluster."""

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None) -> None:
        try:
            import ray
        except ImportError as exc:
            raise BackdoorLabError("--engine ray needs Ray: pip install 'backdoorlab[ray]' "
                                   f"(or pip install ray); import failed: {exc}") from None
        self.ray = ray
        env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
        for var in ("BACKDOORLAB_PLUGINS", "PYTHONPATH"):  # plugins register in every Ray worker too
            if os.environ.get(var):
                env[var] = os.environ[var]
        self._started = False
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False,
                                  "runtime_env": {"env_vars": env}}
            if address:
                kw["address"] = address
            else:
                kw["num_cpus"] = workers or os.cpu_count() or 1
            try:
                ray.init(**kw)
            except Exception as exc:  # ConnectionError, RuntimeError: no cluster at that address
                raise BackdoorLabError(f"cannot start or reach Ray (address={address or 'local'}): {exc}; "
                                       "for a local instance omit --address") from None
            self._started = True
        self.workers = workers or int(ray.cluster_resources().get("CPU", 1))
        self._remote: dict[Callable, Any] = {}

    def submit(self, fn, *args):
        r = self._remote.get(fn)
        if r is None:
            r = self._remote[fn] = self.ray.remote(num_cpus=1, max_retries=0)(fn)
        return r.remote(*args)

    def wait(self, handles):
        ready, _ = self.ray.wait(handles, num_returns=1)
        out = []
        for h in ready:
            try:
                out.append((h, self.ray.get(h)))
            except Exception as exc:  # a worker died (RayTaskError / WorkerCrashedError)
                out.append((h, exc))
        return out

    def share(self, obj):
        return self.ray.put(obj)

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()
            self._started = False


def make_engine(name: str, workers: int | None = None, address: str | None = None) -> Engine:
    if name == "local":
        if address:
            raise BackdoorLabError("--address is for --engine ray; the local engine runs on this machine")
        return LocalEngine(workers or 1)
    if name == "ray":
        if workers is not None and workers < 1:
            raise BackdoorLabError(f"--workers {workers}: give 1 or more")
        return RayEngine(workers, address)
    raise BackdoorLabError(f"--engine {name!r}: use local or ray")
