"""Where a study lives, and how a trial whose process died is noticed.

A study's storage is an Optuna RDB storage (SQLite by default; any SQLAlchemy URL) with
heartbeats: while a trial builds, a thread records a heartbeat every ``interval_s``; before each
new trial, trials whose heartbeat is older than ``grace_s`` (their process was killed, or the
machine went away) are failed and their configuration is queued again
(``RetryHeartbeatStaleTrialCallback``, at most ``MAX_RETRY`` times), so a search killed
mid-trial resumes by rebuilding that one configuration, its finished steps from the cache.

Several workers (processes, machines) may share one study in a server database (PostgreSQL):
the study keeps its request (:func:`request_attrs`) so that a worker can join it by name, and
:func:`claim_lock` lets one worker at a time look at what is built or running and claim a
configuration, so that no two workers build the same one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

MAX_RETRY = 2  # a configuration whose process died this many times is left failed


@dataclass(frozen=True)
class Heartbeat:
    """How often a running trial says it is alive, and how long silence means it is dead (the
    grace must cover the longest pause of a busy machine: a build's step never blocks the
    heartbeat thread for long, but a 2-core machine under load can be slow to schedule it)."""

    interval_s: int = 30
    grace_s: int = 120


def open_storage(url: str, heartbeat: Heartbeat):
    """An RDB storage at ``url`` with heartbeats and the stale-trial retry."""
    import optuna

    with warnings.catch_warnings():  # heartbeats and the retry are experimental in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
        return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat.interval_s,
                                          grace_period=heartbeat.grace_s,
                                          heartbeat_stale_trial_callback=retry,
                                          engine_kwargs=None if is_sqlite(url) else
                                          {"pool_pre_ping": True})  # a server may drop idle ones


def is_sqlite(url: str) -> bool:
    """Whether ``url`` is an SQLite file: one machine, one writer at a time, no workers."""
    return url.startswith("sqlite:")


def masked(url: str) -> str:
    """A storage URL without its password, for messages."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "the --storage URL"


def request_attrs(request) -> dict:
    """What the study keeps of its request (a dataclass: paths as strings, tuples as lists,
    nested dataclasses as dicts), for a worker that joins it by name. Never the storage URL,
    which may hold a password and which the worker is given anyway, nor the run's timeout."""
    attrs = json.loads(json.dumps(dataclasses.asdict(request), default=str))
    for key in ("storage", "timeout_s"):
        attrs.pop(key, None)
    return attrs


def claim_lock(study):
    """A context that one worker of the study holds at a time, across machines, while it reads
    what is built or running and claims a configuration (or asks for a trial). PostgreSQL: a
    transaction-scoped advisory lock, freed when the block ends or its connection dies. Other
    databases: none (SQLite has one machine and, here, one worker; elsewhere two workers that
    claim the same configuration at the same instant may both build it)."""
    storage = getattr(study._storage, "_backend", study._storage)  # Optuna wraps it in a cache
    engine = getattr(storage, "engine", None)
    if engine is None or engine.dialect.name != "postgresql":
        return nullcontext()
    return _advisory_lock(engine, f"edgec-claim/{study._study_id}")


@contextmanager
def _advisory_lock(engine, name: str):
    from sqlalchemy import text

    key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big",
                         signed=True)
    with engine.connect() as connection, connection.begin():
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        yield


def ask(study):
    """``study.ask()``, the new trial's first heartbeat recorded at once (a trial that never beat
    is never stale: a worker killed before :func:`beating` starts would leave it running for
    ever); Optuna warns that heartbeats are meant for ``Study.optimize``, but an ask-and-tell
    loop that beats itself is what they need."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        trial = study.ask()
    study._storage.record_heartbeat(trial._trial_id)
    return trial


def fail_stale_trials(study) -> None:
    """Fail the trials whose heartbeat stopped and queue their configurations again."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def retried_from(trial) -> int | None:
    """The number of the trial whose process died and which ``trial`` runs again, if any."""
    return trial.system_attrs.get("failed_trial")


@contextmanager
def beating(study, trial, interval_s: int):
    """Record ``trial``'s heartbeat every ``interval_s`` seconds while the block runs."""
    storage, stop = study._storage, threading.Event()  # Optuna exposes no public getter

    def beat() -> None:
        while True:
            storage.record_heartbeat(trial._trial_id)
            if stop.wait(interval_s):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
