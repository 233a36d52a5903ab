"""Optuna's side of a sweep: its study in the platform's own database (RDBStorage on the
database Django uses: PostgreSQL, or the embedded SQLite file), and the sampler and pruner a
sweep asked for.

Optuna's tables are created by ``migrate`` (migration 0002 of this app), never at run time, so
two processes never race to create them. Nothing here is called inside a Django transaction: on
SQLite, Optuna's own connection would wait for the write lock that transaction holds.
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Any
from urllib.parse import quote

import optuna
from django.db import connections
from optuna.pruners import BasePruner, MedianPruner, NopPruner, SuccessiveHalvingPruner
from optuna.samplers import BaseSampler, GridSampler, RandomSampler, TPESampler
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import event
from sqlalchemy.pool import NullPool

from tuneplex.sweeps import space
from tuneplex.sweeps.models import Sweep, SweepTrial

log = logging.getLogger(__name__)
# Optuna logs each trial at INFO through a handler of its own: through ours instead, quieter.
optuna.logging.disable_default_handler()
optuna.logging.enable_propagation()
optuna.logging.set_verbosity(optuna.logging.WARNING)

# SQLite (the embedded default): the same lock wait as Django's connection (settings.py).
SQLITE_TIMEOUT_SECONDS = 20
# TPE samples at random until this many trials have ended (Optuna's default is 10, more than
# many sweeps' whole budget): a third of the budget, at least 2 and at most 10.
TPE_MAX_STARTUP_TRIALS = 10

_storages: dict[str, RDBStorage] = {}
_storages_lock = threading.Lock()


def storage_url(settings_dict: dict[str, Any]) -> str:
    """SQLAlchemy's URL of the database a Django connection uses (the test database in tests)."""
    if settings_dict["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{settings_dict['NAME']}"
    if not settings_dict["ENGINE"].endswith("postgresql"):
        raise RuntimeError(f"Sweeps store their studies in PostgreSQL or SQLite, not "
                           f"{settings_dict['ENGINE']}.")
    user = quote(settings_dict.get("USER") or "postgres", safe="")
    password = f":{quote(settings_dict['PASSWORD'], safe='')}" if settings_dict.get("PASSWORD") else ""
    host = settings_dict.get("HOST") or "127.0.0.1"
    port = settings_dict.get("PORT") or 5432
    return f"postgresql+psycopg://{user}{password}@{host}:{port}/{quote(settings_dict['NAME'], safe='')}"


def open_storage(settings_dict: dict[str, Any], *, create_tables: bool = False) -> RDBStorage:
    """An RDBStorage on that database. No pool: each operation connects and lets go, so nothing
    is held across a Celery worker's fork or between a beat's steps."""
    url = storage_url(settings_dict)
    sqlite = url.startswith("sqlite")
    kwargs: dict[str, Any] = {"poolclass": NullPool}
    if sqlite:
        kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_SECONDS}
    storage = RDBStorage(url, engine_kwargs=kwargs, skip_table_creation=not create_tables)
    if sqlite:
        _begin_immediate(storage.engine)
    return storage


def _begin_immediate(engine) -> None:
    """Optuna reads, then writes, in one transaction: on SQLite a deferred transaction that
    turns into a writer fails at once (SQLITE_BUSY) when another connection writes meanwhile.
    Taking the write lock at BEGIN makes it wait instead, as Django's connection does."""

    @event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_connection, record) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def storage() -> RDBStorage:
    """This process's storage on the default database (one per database, kept)."""
    url = storage_url(connections["default"].settings_dict)
    with _storages_lock:
        if url not in _storages:
            _storages[url] = open_storage(connections["default"].settings_dict)
        return _storages[url]


def sampler_for(sweep: Sweep, *, next_number: int) -> BaseSampler:
    """The sweep's sampler for its next trial. Samplers are not stored in the study, so a step
    makes one each time: seeded with the sweep's seed plus the trial's number, a random or TPE
    sampler does not suggest the same values at every step; the grid, shuffled by the sweep's
    seed alone, hands out its points in the same order every time (trial n takes point n)."""
    if sweep.sampler == Sweep.Sampler.GRID:
        return GridSampler({p.name: p.grid() for p in space.stored(sweep.search_space)},
                           seed=sweep.seed)
    seed = sweep.seed + next_number
    if sweep.sampler == Sweep.Sampler.RANDOM:
        return RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return TPESampler(seed=seed, constant_liar=True,  # running trials count as middling
                          n_startup_trials=max(2, min(TPE_MAX_STARTUP_TRIALS, sweep.max_trials // 3)))


def distributions(sweep: Sweep) -> dict[str, Any]:
    return {p.name: p.distribution() for p in space.stored(sweep.search_space)}


def pruner_for(sweep: Sweep) -> BasePruner:
    if sweep.pruner == Sweep.Pruner.MEDIAN:
        return MedianPruner(n_startup_trials=sweep.pruner_startup_trials,
                            n_warmup_steps=sweep.pruner_warmup_steps)
    if sweep.pruner == Sweep.Pruner.SUCCESSIVE_HALVING:
        # Rungs from the first evaluation's step, or from the warm-up when one is set.
        return SuccessiveHalvingPruner(min_resource=sweep.pruner_warmup_steps or "auto")
    return NopPruner()


def study_for(sweep: Sweep, *, next_number: int = 0) -> optuna.Study:
    """The sweep's study (created on its first step), with its sampler and pruner."""
    sampler, pruner = sampler_for(sweep, next_number=next_number), pruner_for(sweep)
    try:
        return optuna.load_study(study_name=sweep.study_name, storage=storage(), sampler=sampler,
                                 pruner=pruner)
    except KeyError:
        return optuna.create_study(study_name=sweep.study_name, storage=storage(),
                                   sampler=sampler, pruner=pruner,
                                   direction=direction(sweep), load_if_exists=True)


def direction(sweep: Sweep) -> str:
    """A validation loss is minimized, an eval's statistic maximized."""
    return "maximize" if sweep.metric == Sweep.Metric.EVAL else "minimize"


def intermediate(sweep: Sweep, loss: float) -> float:
    """What the pruner is told of a validation loss: in the study's direction (negated when the
    study maximizes an eval's statistic, so that a higher loss is still behind)."""
    return -loss if sweep.metric == Sweep.Metric.EVAL else loss


# Optuna's end states → the trial's, unless the caller meant a cancellation (told as FAIL).
ENDED = {TrialState.COMPLETE: SweepTrial.State.COMPLETE, TrialState.PRUNED: SweepTrial.State.PRUNED,
         TrialState.FAIL: SweepTrial.State.FAILED}


def tell(study: optuna.Study, trial: SweepTrial, *, state: TrialState,
         value: float | None = None) -> FrozenTrial:
    """Tell Optuna how the trial ended, unless it was told already (a step and a cancellation
    may both try): the returned trial is what Optuna holds, whichever came first."""
    return study.tell(trial.number, value if state == TrialState.COMPLETE else None, state=state,
                      skip_if_finished=True)
