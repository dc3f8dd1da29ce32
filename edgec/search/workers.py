"""Many workers on one study: ``edgec search --workers K`` and ``edgec search-worker``.

The study lives in a server database (PostgreSQL; SQLite is one machine and one writer). Every
worker, on this machine or another, runs the same loop (:func:`work`) until the study holds the
request's ``trials``, counting what the other workers built:

- before each trial it fails the trials whose heartbeat stopped (a killed worker's) and queues
  their configurations again (:mod:`edgec.search.storage`); the next free worker retries them;
- it starts a trial only while the trials built plus those running elsewhere fall short of
  ``trials``, and otherwise waits: the running ones may finish the study, or die and be retried;
- a trial claims its configuration under the study's lock (:func:`edgec.search.study.claim_config`):
  one built before is a repeat, one that another worker is running is waited for and then a
  repeat, so no configuration is built twice.

A worker that joins from another machine (:func:`join`) reads the study's request from its user
attributes (``request``: model, target, device, budget, recipes, backends, fixed overrides,
measurement protocol, heartbeat...; never the storage URL). Boards are locked per measurement,
so workers on several machines share one device inventory.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from edgec.errors import SearchError
from edgec.search.storage import ask, beating, claim_lock, fail_stale_trials, is_sqlite, masked
from edgec.search.study import (
    MAX_REPEATS,
    SearchOutcome,
    SearchPlan,
    SearchRequest,
    SearchStatus,
    TrialRecord,
    _Clock,
    _one_trial,
    _stop_reason,
    best_so_far,
    build_request,
    conclude,
    describe,
    finished,
    front_lines,
    front_numbers,
    interrupted,
    open_study,
    plan_search,
    promote,
    promotion_slots,
    run_search,
    trial_records,
)

STORAGE_ENV = "EDGEC_SEARCH_STORAGE"  # search-worker's --storage, kept off the command line
POLL_S = 5.0  # longest wait between two looks at the study while other workers run its trials


@dataclass(frozen=True)
class WorkerOutcome:
    """What one worker did: the trials it built and why it stopped."""

    plan: SearchPlan
    worker: str  # host:pid, the ``worker`` attribute of the trials it ran
    new_trials: tuple[int, ...]
    done: int  # built trials the study holds
    stopped: str


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ----- edgec search --workers K -------------------------------------------------------------
def search(request: SearchRequest, workers: int = 1,
           on_status: Callable[[SearchStatus], None] = lambda status: None) -> SearchOutcome:
    """``edgec search``: with one worker and SQLite, :func:`edgec.search.study.run_search`;
    otherwise the study (in a server database) is run by this process (``workers=1``: other
    machines may join) or by ``workers`` local ``edgec search-worker`` processes, and once they
    stop, the pick is made and the report written as ``run_search`` does."""
    sqlite = is_sqlite(request.storage or "sqlite:")  # the default is an SQLite file
    if workers < 1:
        raise SearchError(f"--workers {workers}: give 1 or more")
    if workers == 1 and sqlite:
        return run_search(request, on_status)
    if sqlite:
        raise SearchError(f"--workers {workers} needs a server database: an SQLite file takes one "
                          f"writer at a time on one machine; give --storage "
                          f"postgresql://USER:PASSWORD@HOST:5432/DB")
    plan = plan_search(request)
    study = open_study(plan)
    if workers == 1:
        new, stopped = work(study, plan, on_status)
    else:
        new, stopped = _run_processes(study, plan, workers, on_status)
    status = _status(trial_records(study), request, 0.0)
    new = (*new, *promote(study, plan, status, on_status))
    records = front_here(study, plan, lambda message: on_status(replace(status, step=message)))
    return conclude(study, plan, records, status, new, stopped, on_status)


def front_here(study, plan: SearchPlan, progress: Callable[[str], None]
               ) -> tuple[TrialRecord, ...]:
    """The study's records, the artifacts of its front on this machine: the pick re-measures and
    evaluates them here, and a worker on another machine built its own. Such an artifact is
    built here again (same inputs, same artifact; this machine's cache serves what it can)."""
    from edgec.build import build

    records = trial_records(study)
    front = set(front_numbers(records))
    built: dict[str, str] = {}  # artifact folder gone here -> the folder built here
    for record in records:
        artifact = record.attrs.get("artifact")
        if record.number in front and artifact and artifact not in built \
                and not Path(artifact).is_dir():
            progress(f"building trial {record.number} here: its artifact is on "
                     f"{record.attrs.get('worker', 'another machine')}")
            built[artifact] = str(build(build_request(plan, record.config()),
                                        progress).directory)
    # every record of that artifact (repeats, equal configurations) points at the new folder
    return tuple(replace(r, attrs={**r.attrs, "artifact": built[r.attrs["artifact"]]})
                 if r.attrs.get("artifact") in built else r for r in records)


def _run_processes(study, plan: SearchPlan, count: int, on_status) -> tuple[tuple[int, ...], str]:
    """Run ``count`` ``edgec search-worker`` processes on the study and show its progress until
    they all exit; (the trials built meanwhile, why they stopped). Their output goes to
    ``OUT/workers/worker-N.log``."""
    request, logs = plan.request, plan.out / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "edgec.cli", "search-worker", "--study", plan.study_name,
            "--out", str(plan.out)]
    if request.timeout_s is not None:
        argv += ["--timeout", repr(float(request.timeout_s))]
    env = {**os.environ, STORAGE_ENV: plan.storage}
    before = {r.number for r in trial_records(study) if r.state != "running"}
    started, shown, processes = time.monotonic(), set(before), []
    try:
        for number in range(1, count + 1):
            with open(logs / f"worker-{number}.log", "w") as log:
                processes.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                  env=env))
        while True:
            alive = any(process.poll() is None for process in processes)
            records = trial_records(study)
            status = _status(records, request, time.monotonic() - started)
            for record in (r for r in records if r.state != "running" and r.number not in shown):
                shown.add(record.number)
                on_status(replace(status, finished=record))
            running = _running(records)
            on_status(replace(status, running=running,
                              step="" if running else f"{count} workers starting"))
            if not alive:
                break
            time.sleep(1.0)
    except KeyboardInterrupt:  # each worker marks its trial interrupted and queues it again
        _stop(processes)
        raise
    records = trial_records(study)
    new = tuple(r.number for r in records if r.counts and r.number not in before)
    done = finished(records)
    if done >= request.trials - promotion_slots(plan, records):
        return new, f"the study holds {done} built trials ({request.trials} asked, promotions "\
                    f"included), {count} workers"
    codes = ", ".join(str(process.returncode) for process in processes)
    reasons = {line for number in range(1, count + 1)
               for line in _tail(logs / f"worker-{number}.log") if line.startswith("stopped: ")}
    why = "; ".join(sorted(reason.removeprefix("stopped: ") for reason in reasons))
    return new, (f"the {count} workers stopped (exit codes {codes}) at {done} built trials"
                 f"{': ' + why if why else ''}; their output is in {logs}")


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    for process in processes:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(path: Path, lines: int = 20) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def _status(records, request: SearchRequest, elapsed_s: float) -> SearchStatus:
    return SearchStatus(finished(records), request.trials, elapsed_s,
                        best=describe(best_so_far(records)), front=front_lines(records))


def _running(records) -> str:
    """'trial 4: int8 on onnxruntime (host:123); trial 5: ...' for the trials being built."""
    return "; ".join(f"trial {r.number}: {r.recipe} on {r.backend}"
                     + (f" ({r.attrs['worker']})" if r.attrs.get("worker") else "")
                     for r in records if r.state == "running" and "recipe" in r.attrs)


def _in_flight(records) -> int:
    """Trials running that will count when they end: all but those waiting for another."""
    return sum(r.state == "running" and r.attrs.get("waits_for") is None for r in records)


# ----- the worker loop ----------------------------------------------------------------------
def work(study, plan: SearchPlan,
         on_status: Callable[[SearchStatus], None] = lambda status: None
         ) -> tuple[tuple[int, ...], str]:
    """Run trials of ``study`` until it holds ``plan.request.trials`` built ones (whoever built
    them), the timeout passes or the sampler asks only for built configurations; (the trials
    built here, why it stopped)."""
    request, name = plan.request, worker_name()
    clock = _Clock(time.monotonic(), request.timeout_s)
    poll_s = min(float(request.heartbeat.interval_s), POLL_S)
    new, repeats = [], 0
    while True:
        fail_stale_trials(study)  # a dead worker's trial: failed, its configuration queued
        with claim_lock(study):  # counting and asking at once: two workers never overshoot
            records = trial_records(study)
            status = _status(records, request, clock.elapsed())
            target = request.trials - promotion_slots(plan, records)  # the coordinator's
            waiting = status.done + _in_flight(records) >= target
            stop = status.done >= target or clock.out() or repeats >= MAX_REPEATS
            trial = None if stop or waiting else ask(study)
        if stop:
            return tuple(new), _stop_reason(status, request, repeats, clock)
        if trial is None:
            on_status(replace(status, running=_running(records),
                              step="waiting: the trials running elsewhere may end the study"))
            time.sleep(poll_s)
            continue
        try:
            with beating(study, trial, request.heartbeat.interval_s):
                trial.set_user_attr("worker", name)
                built = _one_trial(study, trial, plan, records, status, clock, on_status)
        except KeyboardInterrupt:
            interrupted(study, trial, time.monotonic())
            raise
        except RuntimeError as exc:  # UpdateFinishedTrialError: failed as stale by another
            if not _finished_elsewhere(study, trial):  # worker (its heartbeat came late); its
                raise  # retry builds the configuration again, from the cache
            on_status(replace(status, step=f"trial {trial.number} was failed by another worker "
                                           f"({exc}); its retry runs it again"))
            continue
        repeats = 0 if built else repeats + 1
        if built:
            new.append(trial.number)
            records = trial_records(study)
            on_status(replace(_status(records, request, clock.elapsed()),
                              finished=next(r for r in records if r.number == trial.number)))


def _finished_elsewhere(study, trial) -> bool:
    import optuna

    return study._storage.get_trial(trial._trial_id).state != optuna.trial.TrialState.RUNNING


# ----- edgec search-worker ------------------------------------------------------------------
def join(study_name: str, storage: str, device: str | None = None,
         timeout_s: float | None = None, out: Path | None = None,
         on_status: Callable[[SearchStatus], None] = lambda status: None) -> WorkerOutcome:
    """Join the study ``study_name`` in ``storage`` (made by ``edgec search``) and run its trials
    (:func:`work`) with its own request; ``device`` measures on this machine's device of that
    name instead (the same board or one just like it), ``out`` keeps the artifacts elsewhere."""
    if is_sqlite(storage):
        raise SearchError(f"--storage {storage}: an SQLite study is on one machine and takes one "
                          f"writer; workers need a server database (postgresql://...)")
    request = replace(stored_request(study_name, storage), study=study_name, storage=storage)
    for label, path in (("model", request.model), ("data", request.data)):
        if path is not None and not path.is_file():
            raise SearchError(f"the study's {label} {str(path)!r} is not here ({Path.cwd()}); run "
                              f"search-worker where that path exists, e.g. in a checkout of the "
                              f"project the search started in")
    if device and device != "local":
        from edgec.devices.inventory import load_device

        load_device(device)  # an unknown board fails here, not in every trial
    plan = plan_search(request)
    study = open_study(plan)
    study.sampler.reseed_rng()  # workers that join at once must not draw the same configurations
    plan = replace(plan, out=Path(out) if out else plan.out,
                   request=replace(plan.request, device=device or plan.request.device,
                                   timeout_s=timeout_s))
    new, stopped = work(study, plan, on_status)
    return WorkerOutcome(plan, worker_name(), new, finished(trial_records(study)), stopped)


def stored_request(study_name: str, storage: str) -> SearchRequest:
    """The request the study keeps (``request`` user attribute); SearchError when there is no
    such study or it was made by an edgec that did not keep it."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    where = masked(storage)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage,
                                  sampler=optuna.samplers.RandomSampler())
    except (KeyError, ValueError, ImportError, RuntimeError, SQLAlchemyError) as exc:
        raise SearchError(f"cannot read study {study_name!r} in {where} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); check --storage, or "
                          f"start it with `edgec search MODEL --study {study_name} --storage "
                          f"URL`") from exc
    attrs = study.user_attrs.get("request", {})
    if "model" not in attrs:
        raise SearchError(f"study {study_name!r} in {where} does not keep its request (made by "
                          f"an older edgec); run `edgec search` on it once, then join it")
    return request_from_attrs(attrs, study_name)


def request_from_attrs(attrs: dict, study_name: str = "") -> SearchRequest:
    """The :class:`SearchRequest` that :func:`edgec.search.storage.request_attrs` stored."""
    hints = typing.get_type_hints(SearchRequest)
    known = {field.name for field in dataclasses.fields(SearchRequest)}
    unknown = sorted(set(attrs) - known)
    if unknown:
        raise SearchError(f"study {study_name!r} was made by another edgec (its request has "
                          f"{', '.join(unknown)}, unknown here); install the same edgec on every "
                          f"worker")
    return SearchRequest(**{key: _typed(hints[key], value) for key, value in attrs.items()})


def _typed(hint, value):
    """A JSON value as the field's type: paths, tuples and nested dataclasses."""
    if value is None:
        return None
    kinds = typing.get_args(hint) or (hint,)
    if Path in kinds:
        return Path(value)
    nested = next((kind for kind in kinds if dataclasses.is_dataclass(kind)), None)
    if nested is not None:
        return nested(**value)
    if typing.get_origin(hint) is tuple:
        return tuple(value)
    return value
