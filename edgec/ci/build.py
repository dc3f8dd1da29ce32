"""``edgec ci build``: one verified artifact per target of an inventory, and ``dist/index.json``.

Each target is built once (``edgec.build.build``); the boards of one target share that build
through the step cache, and each evaluates and profiles it in turn. A target no attached board
serves is evaluated here when its code runs here, measured here only when it *is* this host
(``cpu = "native"``), and otherwise has its latency predicted by ``--latency-model`` (marked so)
or left empty. The published folder ``dist/<model>-<target>-<hash12>/`` holds the deployable
files, the runner and the manifest without what varies from run to run (cache hits), so two
builds from the same inputs publish the same bytes; measurements live in the index only.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgec.artifact import atomic_directory, read_manifest
from edgec.ci.index import INDEX_FORMAT, write_index
from edgec.errors import BudgetError, ConfigError, DeviceError, EdgecError
from edgec.measure import MeasureSpec


@dataclass(frozen=True)
class CiRequest:
    """What ``edgec ci build`` was asked: the model, where to build for, and how."""

    model: Path
    targets: tuple[str, ...] = ()  # --targets; with --devices: only these of the inventory's
    devices: Path | None = None  # an inventory folder: its boards, and their targets
    only_device: str | None = None  # --device NAME: just this board (a runner on the board)
    recipe: str | None = None  # every target's recipe (default: the target's own, else int8)
    overrides: dict[str, Any] = field(default_factory=dict)  # --set PASS.PARAM=VALUE
    from_study: str | None = None
    storage: str | None = None
    budget: float | None = None  # top-1 points each build may lose (default: the recipe's)
    out: Path = Path("dist")
    data: Path | None = None
    measure: MeasureSpec = field(default_factory=MeasureSpec)
    eval_count: int = 0  # images a board evaluates (0: the whole evaluation split)
    rounds: int = 3  # separate measurements per artifact: their spread is the latency's CI
    latency_model: Path | None = None  # predicts latency where no board measures
    cache: bool = True


@dataclass(frozen=True)
class Job:
    """One entry of the index: a target, and the board that evaluates and profiles it."""

    target: str
    device: str | None = None  # the board's inventory name; None: no board
    device_ref: str = "local"  # what BuildRequest.device takes (a TOML path for --devices)


@dataclass(frozen=True)
class Configuration:
    """The recipe, backend, overrides and budget every target is built with."""

    recipe: str | None = None
    backend: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    budget: float | None = None
    source: str = ""  # "study NAME, trial N" when it came from a search


def plan_jobs(request: CiRequest) -> list[Job]:
    """The (target, board) pairs to build, in a stable order; ConfigErrors name what is wrong."""
    from edgec.targets import load_target

    wanted = tuple(load_target(name).name for name in request.targets)
    if request.devices is None:
        if request.only_device:
            return [_board_job(request.only_device, wanted)]
        if not wanted:
            raise ConfigError("edgec ci build needs --targets a,b,c or --devices DIR")
        return [Job(name) for name in dict.fromkeys(wanted)]
    return _inventory_jobs(request.devices, wanted, request.only_device)


def _inventory_jobs(folder: Path, wanted: tuple[str, ...], only: str | None) -> list[Job]:
    from edgec.devices.inventory import load_inventory
    from edgec.targets import load_target

    if not Path(folder).is_dir():
        raise ConfigError(f"--devices {folder}: no such folder; give the inventory folder "
                          f"(devices/, see `edgec devices list`)")
    boards, bad = load_inventory(folder)
    if bad:
        raise ConfigError(f"--devices {folder}: {bad[0]}")
    boards = [b for b in boards if (not only or b.name == only)
              and (not wanted or load_target(b.target).name in wanted)]
    if only and not boards:
        raise ConfigError(f"--device {only}: no such board in {folder} serving "
                          f"{', '.join(wanted) or 'any target'}")
    jobs = [Job(load_target(b.target).name, b.name, str(Path(folder) / f"{b.name}.toml"))
            for b in boards]
    served = {job.target for job in jobs}
    jobs += [Job(name) for name in dict.fromkeys(wanted) if name not in served and not only]
    if not jobs:
        raise ConfigError(f"--devices {folder} holds no board; add one with `edgec devices add` "
                          f"or give --targets")
    return sorted(jobs, key=lambda job: (job.target, job.device or ""))


def _board_job(name: str, wanted: tuple[str, ...]) -> Job:
    from edgec.devices.inventory import load_device
    from edgec.targets import load_target

    board = load_device(name)
    target = load_target(board.target).name
    if wanted and target not in wanted:
        raise ConfigError(f"--device {name} is a {target} board, not one of {', '.join(wanted)}")
    return Job(target, board.name, name)


def configuration(request: CiRequest) -> Configuration:
    """The explicit recipe, or a study's pick (its recipe, backend, overrides and budget);
    ``--set`` values apply on top of either."""
    if not request.from_study:
        return Configuration(request.recipe, overrides=dict(request.overrides),
                             budget=request.budget)
    if request.recipe:
        raise ConfigError(f"--from-study {request.from_study} builds the pick's recipe; "
                          f"drop --recipe {request.recipe}")
    from edgec.search.study import load_pick

    pick = load_pick(request.from_study, request.storage)
    return Configuration(pick.recipe, pick.backend, {**pick.overrides, **request.overrides},
                         pick.budget if request.budget is None else request.budget,
                         f"study {pick.study}, trial {pick.trial}")


def run_ci(request: CiRequest, progress: Callable[[str], None] = lambda message: None
           ) -> dict[str, Any]:
    """Build, evaluate and profile every job; publish the artifacts and write the index.

    A job that fails is an entry with its error (the others still run); the caller decides the
    exit status from the entries' status (:func:`failures`)."""
    from edgec import __version__

    jobs, config = plan_jobs(request), configuration(request)
    model_name = _model_name(request.model)
    entries = []
    with tempfile.TemporaryDirectory(prefix="edgec-ci-") as builds:
        for job in jobs:
            progress(f"{job.target}{' on ' + job.device if job.device else ''}: building")
            entries.append(build_entry(request, config, job, model_name, Path(builds),
                                       progress))
    index = {"format": INDEX_FORMAT, "model": model_name, "model_file": str(request.model),
             "recipe": config.recipe, "from_study": config.source or None,
             "budget": config.budget, "edgec": __version__, "entries": entries}
    write_index(request.out, index)
    return index


def _model_name(model: Path) -> str:
    from edgec.model import load_model_config

    return load_model_config(model).name


def build_entry(request: CiRequest, config: Configuration, job: Job, model_name: str,
                builds: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    """One index entry: built, published and described; a failure is an entry too."""
    from edgec.targets import load_target

    target = load_target(job.target)
    base = {"target": job.target, "device": job.device, "artifact": "", "hash": "",
            "recipe": config.recipe or target.options.get("recipe", "int8"),
            "backend": config.backend or "", "status": "ok", "error": "", "note": "",
            "accuracy": None,
            "latency": None, "peak_rss_mb": None, "size_bytes": 0, "versions": {},
            "budget": None}
    try:
        result, reached = _build_with_fallback(request, config, job, target, builds, progress)
        latency = measure_rounds(request, job, reached, target, result.directory, progress)
    except BudgetError as exc:
        return {**base, "status": "over budget", "error": str(exc)}
    except EdgecError as exc:
        return {**base, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    name = publish(result.directory, request.out, f"{model_name}-{job.target}-"
                   f"{result.manifest['hash'][:12]}")
    entry = {**base, **describe(result.manifest, latency), "artifact": name,
             "note": "" if reached or not job.device else f"board {job.device} not reached: "
                                                         f"evaluated here, not measured"}
    if entry["latency"] is None and request.latency_model is not None:
        entry["latency"], why_not = predicted_latency(request, job, request.out / name)
        entry["note"] = "; ".join(filter(None, [entry["note"], why_not]))
    return entry


def _build_with_fallback(request: CiRequest, config: Configuration, job: Job, target,
                         builds: Path, progress):
    """(the build evaluated on the job's board, whether the board was reached); when it cannot
    be reached, the build without it (evaluated here)."""
    from edgec.build import BuildRequest, build

    backend = config.backend if config.backend in target.backends else None
    build_request = BuildRequest(
        request.model, job.target, config.recipe, request.data, builds,
        request.measure, profile=False, device=job.device_ref, eval_count=request.eval_count, backend=backend,
        overrides=config.overrides, budget=config.budget, cache=request.cache,
        reference=False)
    try:
        return build(build_request, progress), job.device is not None
    except DeviceError as exc:
        if job.device is None:
            raise
        progress(f"{job.device} unreachable ({exc}); building {job.target} without it")
        return build(replace(build_request, device="local"), progress), False


def measure_rounds(request: CiRequest, job: Job, reached: bool, target, directory: Path,
                   progress) -> dict[str, Any] | None:
    """``request.rounds`` fresh measurements on the board (or on this host when it is the
    target), combined by :func:`edgec.measure.across_rounds`; None where nothing can measure.
    Never from the cache: a rebuild is measured again, so the gate compares two runs."""
    from edgec.devices import open_device
    from edgec.measure import across_rounds

    if not reached and target.cpu != "native":
        return None
    device = open_device(job.device_ref if reached else "local")
    try:
        rounds = []
        for number in range(request.rounds):
            progress(f"{job.target}: measuring on {device.name}, round {number + 1}")
            rounds.append(device.measure(directory, request.measure))
    finally:
        getattr(device, "close", lambda: None)()
    return {**across_rounds(rounds), "source": "measured", "on": device.name}


def describe(manifest: dict[str, Any], latency: dict[str, Any] | None) -> dict[str, Any]:
    """The entry's fields read from a finished build and its measurement."""
    ledger = manifest.get("budget") or {}
    return {"hash": manifest["hash"], "backend": manifest["entry"]["backend"],
            "accuracy": _accuracy(manifest),
            "latency": None if latency is None else {
                k: v for k, v in latency.items() if k != "peak_rss_mb"},
            "peak_rss_mb": None if latency is None else round(latency["peak_rss_mb"], 1),
            "size_bytes": manifest["size_bytes"], "versions": manifest["versions"],
            "budget": {"points": ledger["points"], "spent": ledger["spent"]} if ledger else None}


def _accuracy(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Top-1 on the board when it evaluated, else on this host; None when neither could."""
    for record in (manifest.get("accuracy_on_device"), manifest.get("accuracy")):
        if record and "top1" in record:
            return {"top1": record["top1"], "on": record["measured_on"]["device"],
                    "images": record["total"]}
    return None


def predicted_latency(request: CiRequest, job: Job,
                      directory: Path) -> tuple[dict[str, Any] | None, str]:
    """(the latency model's mean for the board, or the target's name, marked predicted, '') or
    (None, why it could not predict: no model of that board, another runtime version, ...)."""
    from edgec.search.predict import Predictor

    try:
        predictor = Predictor.load(request.latency_model, job.device or job.target,
                                   request.measure.threads)
        prediction = predictor.predict(directory)
    except EdgecError as exc:
        return None, f"latency not predicted: {exc}"
    value = prediction.latency_ms
    return {"p50_ms": value, "mean_ms": value, "ci95_ms": value * prediction.error, "n": 0,
            "rounds": 0, "source": "predicted", "on": job.device or job.target}, ""


PUBLISHED_EXTRA = ("manifest.json",)  # besides the manifest's files (deployable ones, runner.py)


def publish(directory: Path, dist: Path, name: str) -> str:
    """Copy the deployable files and a run-independent manifest to ``dist/name`` (atomically;
    an existing folder of that name holds the same content by its hash and is kept)."""
    final = dist / name
    if final.is_dir():
        return name
    manifest = reproducible_manifest(read_manifest(directory))
    with atomic_directory(final) as tmp:
        for file in manifest["files"]:
            (tmp / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(directory / file, tmp / file)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return name


def reproducible_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest without what one run of the same build differs in: whether a step came
    from the cache (measurements are not in the manifest; the index holds them)."""
    kept = dict(manifest)
    kept["lineage"] = [{k: v for k, v in step.items() if k != "cache"}
                       for step in manifest.get("lineage", [])]
    return kept


def failures(index: dict[str, Any]) -> list[str]:
    """One line per entry that is not ok, naming the target, the board and the numbers."""
    lines = []
    for entry in index["entries"]:
        if entry["status"] == "ok":
            continue
        where = entry["target"] + (f" on {entry['device']}" if entry["device"] else "")
        lines.append(f"{where}: {entry['status']}: {entry['error']}")
    return lines
