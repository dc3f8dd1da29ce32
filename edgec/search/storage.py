"""Where a study lives, and how a trial whose process died is noticed.

A study's storage is an Optuna RDB storage (SQLite by default; any SQLAlchemy URL) with
heartbeats: while a trial builds, a thread records a heartbeat every ``interval_s``; before each
new trial, trials whose heartbeat is older than ``grace_s`` (their process was killed, or the
machine went away) are failed and their configuration is queued again
(``RetryHeartbeatStaleTrialCallback``, at most ``MAX_RETRY`` times), so a search killed
mid-trial resumes by rebuilding that one configuration, its finished steps from the cache.
"""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
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
                                          heartbeat_stale_trial_callback=retry)


def ask(study):
    """``study.ask()``; Optuna warns that heartbeats are meant for ``Study.optimize``, but an
    ask-and-tell loop that beats itself (:func:`beating`) is what they need."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        return study.ask()


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
