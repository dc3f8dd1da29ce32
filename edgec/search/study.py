"""``edgec search``: one Optuna study over recipes, their declared spaces and the target's backends.

A trial chooses a recipe (the categorical parameter ``recipe``), that recipe's backend
(``<recipe>/backend``) and a point of the recipe's declared space for the target
(:func:`edgec.space.pipeline_space`, narrowed by its ``[search]``), each dimension asked as
``<recipe>/<pass.param>`` so that one name always has one distribution, whichever recipes a
study holds. The trial is an ordinary ``edgec build`` (:func:`edgec.build.build`) with those
overrides, so the step cache shares the work of trials with a common prefix and a configuration
built before costs a cache lookup.

Objectives: latency mean on the device (ms, minimised), top-1 on the accuracy budget's held-out
slice of the training split (percent, maximised; the test split's top-1 is stored for reporting
and never chooses anything) and the model files' size (bytes, minimised). The budget is an
Optuna constraint (``trial.set_constraint``; feasible when the held-out drop is within the
points). A build that fails, a BudgetError included, is a FAIL trial with the error stored in its
user attributes; the study goes on. The storage (SQLite by default) is the search's memory: the
same ``study`` and ``storage`` resume it, and trials already finished are not run again.

Successive halving over fine-tune epochs: a recipe whose prune step fine-tunes is built with
``screen`` of its epochs and a budget ``SCREEN_SLACK`` times wider (a *screened* trial: it guides
the sampler, is never on the front, never picked); at the end the fastest screened trials that
could win are *promoted*, built again in full under the real budget (:func:`promote`).
"""

from __future__ import annotations

import math
import time
import tomllib
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgec.errors import BudgetError, EdgecError, SearchError
from edgec.measure import MeasureSpec
from edgec.search.pick import feasible_front
from edgec.search.predict import MeasureGate, Predictor, pairs_by_backend, resolve_mode
from edgec.search.storage import (
    Heartbeat,
    ask,
    beating,
    claim_lock,
    fail_stale_trials,
    masked,
    open_storage,
    request_attrs,
    retried_from,
)
from edgec.space import Space

DIRECTIONS = ("minimize", "maximize", "minimize")  # latency ms, held-out top-1 %, size bytes
CONSTRAINT = "accuracy_budget"  # held-out drop minus the budget's points: feasible when <= 0
# searched where they fit
DEFAULT_RECIPES = ("fp32", "int8", "prune-int8", "mobile-int8", "prune-mobile-int8")
BASELINES = ("fp32", "int8")  # enqueued first, with the recipes' own values, so they are plotted
INT8_PASSES = ("quantize", "quantize_pt2e")  # their output is int8 (or int4/int8)
SCREENABLE = ("prune",)  # passes whose fine-tune a screened trial shortens
CASCADE_PASSES = ("early_exit",)  # their models deploy as cascades: the build picks the backend
AUTO_BACKEND = "auto"  # the backend choice of such recipes: whatever the build chooses
STARTUP_TRIALS = 8  # random trials before TPE models the front (the baselines count)
MAX_REPEATS = 20  # the sampler asked this many built configurations in a row: stop
RECIPE_PARAM = "recipe"
# Successive halving over fine-tune epochs: a trial whose recipe fine-tunes is screened with a
# fifth of its epochs (ResNet-20's prune step: 1 epoch instead of 5); only the fastest screened
# configurations that could beat every fully built one get the full fine-tune, at the end.
SCREEN_FRACTION = 0.2
PROMOTE = 1
# A short fine-tune loses more than the full one (ResNet-20 pruned to 20 % fewer MACs: 1.2-2.2
# points after 1 epoch, under 1 after 5), so a screened trial is held to a budget this many
# times wider; the promoted one meets the real budget.
SCREEN_SLACK = 3.0
FINETUNE_PARAM = "finetune_epochs"


@dataclass(frozen=True)
class SearchRequest:
    """What ``edgec search`` needs. ``overrides`` are fixed for every trial (``{"budget.holdout":
    250}`` for a small calibration split); a ``pass.param`` key applies to the recipes that run
    that pass and takes that dimension out of their spaces. Unset names resolve in
    :func:`plan_search`."""

    model: Path
    target: str = "local"
    device: str = "local"  # measure (and evaluate) there: devices/NAME.toml
    budget: float = 1.0  # top-1 points a configuration may lose on the held-out slice
    trials: int = 24  # finished trials the study should hold (a resumed study counts its own)
    timeout_s: float | None = None  # no new trial starts after this many seconds of this run
    study: str | None = None  # default: <model name>-<target>
    storage: str | None = None  # default: sqlite:///<out>/<study>.db
    recipes: tuple[str, ...] = ()  # names or TOML paths; default: DEFAULT_RECIPES that fit
    backends: tuple[str, ...] = ()  # only these of the target's backends (default: all that fit)
    overrides: dict[str, Any] = field(default_factory=dict)
    measure: MeasureSpec = field(default_factory=MeasureSpec)
    out: Path | None = None  # default: search/<study>; artifacts go to <out>/build
    seed: int = 0
    data: Path | None = None  # data TOML (default: the model TOML's)
    remeasure_rounds: int = 4  # interleaved rounds when the two fastest cannot be told apart
    view: str = "auto"  # the budget's view for every recipe (auto: see budget_overrides)
    heartbeat: Heartbeat = field(default_factory=Heartbeat)  # a dead trial's process: noticed
    recheck: int | None = None  # images to re-check the pick on (None: as many as held out)
    eval_count: int = 0  # test images the device evaluates per trial (0: all; for slow boards)
    screen: float = SCREEN_FRACTION  # share of the fine-tune epochs a trial is screened with
    promote: int = PROMOTE  # screened trials rebuilt with the full fine-tune at the end
    latency_model: Path | None = None  # `edgec latency fit` file: see edgec.search.predict
    measure_trials: str | None = None  # all | promising | none (None: by what can measure)


@dataclass(frozen=True)
class Candidate:
    """A recipe the study may choose: its space for the target and the backends it may use."""

    name: str  # the pipeline's name: the value of the study's ``recipe`` parameter
    recipe: str  # as the user gave it (built-in name or TOML path), for the rebuild command
    space: Space
    backends: tuple[str, ...]
    passes: tuple[str, ...]
    finetunes: dict[str, float] = field(default_factory=dict)  # pass -> its fine-tune epochs


@dataclass(frozen=True)
class SearchPlan:
    """A request resolved: study name, folders, storage, the recipes and why others sit out."""

    request: SearchRequest
    study_name: str
    out: Path
    storage: str
    candidates: dict[str, Candidate]
    skipped: tuple[tuple[str, str], ...] = ()
    fixed: dict[str, Any] = field(default_factory=dict)  # overrides of every trial (budget.*)
    predictor: Predictor | None = None  # the latency model, when the request gave one
    measure_trials: str = "all"  # resolved: see edgec.search.predict

    @property
    def build_root(self) -> Path:
        return self.out / "build"


@dataclass(frozen=True)
class TrialConfig:
    """One configuration: recipe, backend and the overrides handed to the build."""

    recipe: str
    backend: str
    overrides: dict[str, Any]
    baseline: bool = False
    fidelity: float = 1.0  # the share of its fine-tune epochs it is built with (1: all)


@dataclass(frozen=True)
class TrialRecord:
    """A finished (or running) trial as the report and the pick read it."""

    number: int
    state: str  # complete | screened | predicted | failed | over budget | interrupted | running
    values: tuple[float, ...] | None
    feasible: bool
    attrs: dict[str, Any]

    @property
    def recipe(self) -> str:
        return self.attrs.get("recipe", "?")

    @property
    def backend(self) -> str:
        return self.attrs.get("backend", "?")

    @property
    def overrides(self) -> dict[str, Any]:
        return self.attrs.get("overrides", {})

    @property
    def baseline(self) -> bool:
        return bool(self.attrs.get("baseline"))

    @property
    def fidelity(self) -> float:
        return float(self.attrs.get("fidelity", 1.0))

    @property
    def screened(self) -> bool:
        """Built with a share of its fine-tune (see ``SCREEN_FRACTION``): never picked."""
        return self.fidelity < 1.0

    @property
    def measured(self) -> bool:
        """Built and measured: complete, or screened."""
        return self.state in ("complete", "screened")

    @property
    def scored(self) -> bool:
        """Built with objective values: measured, or predicted by the latency model."""
        return self.state in ("complete", "screened", "predicted")

    @property
    def within_budget(self) -> bool:
        """Its held-out drop is inside the budget (a screened trial's too; its latency measured
        or predicted)."""
        return self.scored and self.attrs["heldout_drop"] <= self.attrs["budget_points"] + 1e-9

    @property
    def latency_ms(self) -> float:
        return self.attrs["latency_mean_ms"]

    @property
    def ci95_ms(self) -> float:
        return self.attrs["latency_ci95_ms"]

    @property
    def heldout_top1(self) -> float:
        return self.attrs["heldout_top1"]

    @property
    def size_bytes(self) -> int:
        return self.attrs["size_bytes"]

    @property
    def counts(self) -> bool:
        """Whether it counts towards the trials asked for: built (complete or failed), not
        interrupted and not a repeat of an earlier configuration."""
        return self.state not in ("running", "interrupted") and "repeat_of" not in self.attrs

    def config(self, fidelity: float | None = None) -> TrialConfig:
        """Its configuration (with ``fidelity`` instead of its own: a promotion)."""
        return TrialConfig(self.recipe, self.backend, dict(self.overrides), self.baseline,
                           self.fidelity if fidelity is None else fidelity)

    def label(self) -> str:
        """'int8 on onnxruntime (quantize.mode=mixed)'; floats to 4 significant digits."""
        changes = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in self.overrides.items() if not k.startswith("budget."))
        screened = f" [screened: {self.fidelity:g} of the fine-tune]" if self.screened else ""
        return f"{self.recipe} on {self.backend}" + (f" ({changes})" if changes else "") + screened


@dataclass(frozen=True)
class SearchStatus:
    """What a live display shows: progress, the trial being built and the best so far."""

    done: int
    total: int
    elapsed_s: float
    running: str = ""  # "trial 5: int8 on onnxruntime"
    step: str = ""  # the build's latest progress message
    best: str = ""  # the fastest feasible trial so far
    front: tuple[str, ...] = ()  # the feasible front, fastest first (short labels)
    finished: TrialRecord | None = None  # set once, when a trial of this run ends


@dataclass(frozen=True)
class SearchOutcome:
    """The study after this run: every trial, those run now, the pick and the report files."""

    plan: SearchPlan
    records: tuple[TrialRecord, ...]
    front: tuple[int, ...]  # feasible Pareto-optimal trial numbers
    new_trials: tuple[int, ...]
    pick: Any = None  # edgec.search.pick.Pick, or None without a feasible trial
    command: tuple[str, ...] = ()  # `edgec build ...` that rebuilds the pick (from the cache)
    stopped: str = ""  # why this run stopped asking for trials
    reports: tuple[Path, ...] = ()


# ----- planning ---------------------------------------------------------------------------
def plan_search(request: SearchRequest) -> SearchPlan:
    """Resolve names and defaults; SearchError when no recipe can be searched on the target."""
    from edgec.model import load_model_config
    from edgec.targets import load_target

    if request.trials < 1:
        raise SearchError(f"--trials {request.trials}: a search needs at least 1 trial")
    if not 0 < request.screen <= 1 or request.promote < 0:
        raise SearchError(f"--screen {request.screen:g} / --promote {request.promote}: give a "
                          f"share of the fine-tune in (0, 1] (1: no screening) and 0 or more "
                          f"promotions")
    config, target = load_model_config(request.model), load_target(request.target)
    unknown = [name for name in request.backends if name not in target.backends]
    if unknown:
        raise SearchError(f"--backend {', '.join(unknown)}: not a backend of target "
                          f"{target.name!r}; choose from {', '.join(target.backends)}")
    study = request.study or f"{config.name}-{target.name}"
    if "/" in study or not study.strip():
        raise SearchError(f"--study {study!r}: give a name without '/', e.g. {config.name}-search")
    out = Path(request.out) if request.out else Path("search") / study
    storage = request.storage or f"sqlite:///{out / f'{study}.db'}"
    fixed = {**budget_overrides(request, config), **request.overrides}
    candidates, skipped = _candidates(request, target, fixed)
    predictor = None
    if request.latency_model is not None:
        board = request.device if request.device != "local" or target.runs_on_host \
            else target.name
        predictor = Predictor.load(request.latency_model, board, request.measure.threads)
    mode = resolve_mode(request.measure_trials, predictor,
                        request.device != "local" or target.runs_on_host)
    return SearchPlan(request, study, out, storage, candidates, tuple(skipped), fixed,
                      predictor, mode)


def budget_overrides(request: SearchRequest, config) -> dict[str, Any]:
    """One accuracy budget for every recipe, whatever their own ``[budget]`` says: the points,
    one view, one held-out slice, and a re-check tail after it that only the pick's check reads.

    The view 'auto' is 'shifted' for images of at least 16x16 pixels (the pretrained ResNets
    memorised their training split: ~99.8 % on any slice of it in the plain view) and 'plain'
    otherwise: shifted 8x8 digits are unreadable (the digits CNN scored 18 % on them)."""
    from edgec.accuracy import VIEWS
    from edgec.budget import BudgetSpec
    from edgec.data import load_data_config

    view = request.view
    if view == "auto":
        shape = tuple(config.input.shape)
        view = "shifted" if len(shape) == 3 and min(shape[1:]) >= 16 else "plain"
    if view not in VIEWS:
        raise SearchError(f"--view {request.view!r}: choose auto or one of {', '.join(VIEWS)}")
    holdout = int(request.overrides.get("budget.holdout", 0))
    data = request.data or (config.resolve(config.data) if config.data else None)
    if data is None:
        raise SearchError(f"model {config.name!r} names no data; pass --data DATA.toml")
    images = len(load_data_config(data).load("calibration"))
    count = BudgetSpec(request.budget, holdout=holdout).holdout_count(images)
    recheck = count if request.recheck is None else request.recheck
    return {"budget.points": request.budget, "budget.view": view, "budget.holdout": count,
            "budget.recheck": recheck}


def _candidates(request: SearchRequest, target, fixed: dict[str, Any]
                ) -> tuple[dict[str, Candidate], list]:
    """The recipes to search; a named one that cannot run on the target is a SearchError, a
    default one is skipped with its reason."""
    named = bool(request.recipes)
    candidates, skipped = {}, []
    for recipe in request.recipes or DEFAULT_RECIPES:
        candidate, reason = _candidate(recipe, target, request.backends, fixed)
        if reason and named:
            raise SearchError(f"--recipe {recipe}: {reason}")
        if reason:
            skipped.append((recipe, reason))
            continue
        if candidate.name in candidates:
            raise SearchError(f"--recipe {recipe}: a recipe named {candidate.name!r} is already "
                              f"searched; give each recipe its own name")
        candidates[candidate.name] = candidate
    if not candidates:
        why = "; ".join(f"{name}: {reason}" for name, reason in skipped)
        raise SearchError(f"no recipe to search on target {target.name!r} ({why}); name one "
                          f"with --recipe (see `edgec recipes`)")
    return candidates, skipped


def _candidate(recipe: str, target, only: tuple[str, ...],
               fixed: dict[str, Any]) -> tuple[Candidate | None, str]:
    """(the recipe as a candidate, '') or (None, why it cannot be searched on ``target``)."""
    from edgec.recipes import load_recipe, recipe_search
    from edgec.space import pipeline_space

    pipeline = load_recipe(recipe)
    unsupported = [f"{s.pass_.name}: {r}" for s in pipeline.steps if (r := s.pass_.supports(target))]
    if unsupported:
        return None, f"target {target.name!r} cannot run it ({'; '.join(unsupported)})"
    passes = tuple(step.pass_.name for step in pipeline.steps)
    backends = _backends(pipeline, target, only)
    if not backends:
        return None, (f"no backend of target {target.name!r}"
                      f"{' among ' + ', '.join(only) if only else ''} takes its "
                      f"{pipeline.steps[-1].pass_.produces!r} output")
    space = pipeline_space(pipeline, target, recipe_search(recipe)).fixing(fixed)
    candidate = Candidate(pipeline.name, str(recipe), space, backends, passes)
    fixed_pipeline = pipeline.with_overrides(fixed_overrides(fixed, candidate))  # bad: fails once
    finetunes = {step.pass_.name: float(getattr(step.params, FINETUNE_PARAM))
                 for step in fixed_pipeline.steps
                 if getattr(step.params, FINETUNE_PARAM, 0) and step.pass_.name in SCREENABLE}
    return replace(candidate, finetunes=finetunes), ""


def _backends(pipeline, target, only: tuple[str, ...]) -> tuple[str, ...]:
    """The target's backends (or ``only`` of them) that consume what the pipeline produces and
    support the target; an early-exit recipe deploys as a cascade, which the build picks."""
    from edgec.backends import BACKENDS

    if any(step.pass_.name in CASCADE_PASSES for step in pipeline.steps):
        return (AUTO_BACKEND,)
    produces = pipeline.steps[-1].pass_.produces
    return tuple(name for name in target.backends
                 if (not only or name in only) and name in BACKENDS
                 and BACKENDS[name].consumes == produces and BACKENDS[name]().supports(target)
                 is None and _takes_precision(BACKENDS[name](), pipeline, produces))


def _takes_precision(backend, pipeline, produces: str) -> bool:
    """Whether ``backend`` takes what an int8 pipeline makes (TVM refuses int8 QDQ models: they
    would run as float fake-quantisation); any backend takes a float pipeline's output."""
    from edgec.artifact import Artifact

    if not any(step.pass_.name in INT8_PASSES for step in pipeline.steps):
        return True
    accepts = getattr(backend, "accepts", None)
    return accepts is None or accepts(Artifact(produces, None, extras={"precision": "int8"})) \
        is None


# ----- the study --------------------------------------------------------------------------
SCHEMA_RACE_ATTEMPTS = 3


def _create_or_load(plan: SearchPlan):
    """``optuna.create_study(load_if_exists=True)``, again after a moment when another process
    (a worker, a monitor reading the study) created the storage's schema at the same instant:
    both create its tables or insert its version row, and one gets an IntegrityError or, on
    SQLite, "table ... already exists"."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(SCHEMA_RACE_ATTEMPTS):
        try:
            storage = open_storage(plan.storage, plan.request.heartbeat)
            return optuna.create_study(storage=storage, study_name=plan.study_name,
                                       directions=list(DIRECTIONS), load_if_exists=True,
                                       sampler=_sampler(plan.request.seed))
        except (IntegrityError, OperationalError) as exc:
            lost_race = isinstance(exc, IntegrityError) or "already exists" in str(exc)
            if not lost_race or attempt == SCHEMA_RACE_ATTEMPTS - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


def open_study(plan: SearchPlan):
    """Create the study, or load it (``load_if_exists``) to resume; the baselines enqueued.

    TPE, multi-objective, with ``group=True``: the space is conditional (each recipe asks its
    own parameters), and grouped TPE models each recipe's parameters jointly instead of falling
    back to random sampling outside their intersection, as NSGA-II would; NSGA-II's generations
    (50 trials by default) are also more than a board's search can afford. The sampler's seed
    moves with the trials already in the study, so a resumed search does not replay the random
    draws of its first run."""
    from sqlalchemy.exc import SQLAlchemyError

    if plan.storage.startswith("sqlite:///"):
        Path(plan.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        study = _create_or_load(plan)
    except (ValueError, ImportError, RuntimeError, SQLAlchemyError) as exc:
        raise SearchError(f"cannot open study {plan.study_name!r} in {masked(plan.storage)}: {exc}; "
                          f"check --storage or use another --study") from exc
    _check_recipes(study, plan)
    study.set_user_attr("request", request_attrs(plan.request))  # a joining worker reads it
    study.sampler = _sampler(plan.request.seed + len(study.trials))
    for name in (name for name in plan.candidates if name in BASELINES):  # in --recipe order
        enqueue_config(study, plan.candidates[name], plan.candidates[name].backends[0])
    return study


def _sampler(seed: int):
    """Multi-objective TPE, grouped (see :func:`open_study`); constraints are read from the
    trials (``set_constraint``), not from a ``constraints_func``, which Optuna 5 deprecates."""
    import optuna

    with warnings.catch_warnings():  # `group` is experimental in Optuna 5; it is what we need
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          n_startup_trials=STARTUP_TRIALS)


def _check_recipes(study, plan: SearchPlan) -> None:
    """A study keeps one set of recipes: Optuna refuses another distribution for ``recipe``."""
    for trial in study.get_trials(deepcopy=False):
        known = trial.distributions.get(RECIPE_PARAM)
        if known is not None and tuple(known.choices) != tuple(plan.candidates):
            raise SearchError(
                f"study {plan.study_name!r} searches the recipes {list(known.choices)}, this run "
                f"{list(plan.candidates)}; resume with the same --recipe list or start another "
                f"--study")


def enqueue_config(study, candidate: Candidate, backend: str,
                   overrides: Mapping[str, Any] | None = None,
                   attrs: Mapping[str, Any] | None = None) -> None:
    """Queue a configuration to be tried next (skipped when the study holds it already);
    without ``overrides`` it is the recipe as written, a baseline (built in full)."""
    params = {RECIPE_PARAM: candidate.name, f"{candidate.name}/backend": backend}
    params.update({f"{candidate.name}/{key}": value for key, value in (overrides or {}).items()})
    attrs = {**({"baseline": True, "fidelity": 1.0} if overrides is None else {}),
             **(attrs or {})}
    # a promotion repeats its screened trial's parameters: only its attributes differ
    study.enqueue_trial(params, user_attrs=attrs or None,
                        skip_if_exists="promoted_from" not in attrs)


class _Prefixed:
    """An Optuna trial seen through a prefix: ``suggest_categorical("quantize.mode", ...)`` asks
    for ``int8/quantize.mode``, so the space's own names (and conditions) stay as declared."""

    def __init__(self, trial, prefix: str):
        self._trial, self._prefix = trial, prefix

    def suggest_categorical(self, name: str, choices):
        return self._trial.suggest_categorical(self._prefix + name, choices)

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False):
        return self._trial.suggest_int(self._prefix + name, low, high, step=step, log=log)

    def suggest_float(self, name: str, low: float, high: float, log: bool = False):
        return self._trial.suggest_float(self._prefix + name, low, high, log=log)


def ask_config(trial, plan: SearchPlan) -> TrialConfig:
    """Ask ``trial`` for a recipe, its backend and (unless it is a baseline) a point of its
    space; the request's fixed overrides are added where they apply."""
    name = trial.suggest_categorical(RECIPE_PARAM, list(plan.candidates))
    candidate = plan.candidates[name]
    backend = trial.suggest_categorical(f"{name}/backend", list(candidate.backends))
    baseline = bool(trial.user_attrs.get("baseline"))
    point = {} if baseline else candidate.space.suggest(_Prefixed(trial, f"{name}/"))
    screen = plan.request.screen if candidate.finetunes else 1.0
    return TrialConfig(name, backend, {**fixed_overrides(plan.fixed, candidate), **point},
                       baseline, float(trial.user_attrs.get("fidelity", min(1.0, screen))))


def built_overrides(plan: SearchPlan, config: TrialConfig) -> dict[str, Any]:
    """The overrides the build gets: the configuration's; a screened one's fine-tune epochs cut
    to its fidelity and its budgets (the build's, and the fine-tuning passes' own caps) widened
    by ``SCREEN_SLACK``."""
    overrides = dict(config.overrides)
    if config.fidelity < 1.0:
        for pass_name, epochs in plan.candidates[config.recipe].finetunes.items():
            key = f"{pass_name}.{FINETUNE_PARAM}"
            overrides[key] = round(float(overrides.get(key, epochs)) * config.fidelity, 6)
            cap = f"{pass_name}.budget_points"
            if overrides.get(cap) is not None:
                overrides[cap] = round(float(overrides[cap]) * SCREEN_SLACK, 6)
        overrides["budget.points"] = round(plan.request.budget * SCREEN_SLACK, 6)
    return overrides


def fixed_overrides(fixed: Mapping[str, Any], candidate: Candidate) -> dict[str, Any]:
    """The overrides of every trial (:attr:`SearchPlan.fixed`) that apply to ``candidate``:
    ``budget.*`` keys (``budget.points`` first: a recipe without ``[budget]`` needs its points
    before the rest) and ``pass.param`` keys of the passes it runs."""
    applies = {key: value for key, value in fixed.items()
               if key.startswith("budget.") or key.partition(".")[0] in candidate.passes}
    points = {"budget.points": applies.pop("budget.points")} if "budget.points" in applies else {}
    return {**points, **applies}


# ----- one trial --------------------------------------------------------------------------
def build_request(plan: SearchPlan, config: TrialConfig):
    """The :class:`edgec.build.BuildRequest` of one configuration."""
    from edgec.build import BuildRequest

    request, overrides = plan.request, built_overrides(plan, config)
    return BuildRequest(request.model, request.target, plan.candidates[config.recipe].recipe,
                        request.data, plan.build_root, request.measure, device=request.device,
                        backend=None if config.backend == AUTO_BACKEND else config.backend,
                        overrides=overrides,
                        budget=overrides.get("budget.points", request.budget),
                        eval_count=request.eval_count, evaluate=False, recheck=False,
                        reference=False)  # the pick's evaluation and re-check: at the end


def run_trial(study, trial, config: TrialConfig, plan: SearchPlan,
              progress: Callable[[str], None]) -> None:
    """Build and measure ``config`` (asked of ``trial``) and tell the study; a failure is a FAIL
    trial with its error."""
    from edgec.build import build

    started = time.monotonic()
    _set_attrs(trial, _config_attrs(plan, config))
    phases = PhaseClock()
    gate = measure_gate(plan, config, trial_records(study)) if plan.predictor else None
    request = build_request(plan, config)
    try:
        result = build(replace(request, profile_when=gate), phases.wrap(progress))
        trial.set_user_attr("phases_s", phases.totals())
        values, drop = _objectives(trial, result, gate)
        trial.set_constraint(CONSTRAINT, drop - result.manifest["budget"]["points"])
        trial.set_user_attr("seconds", round(time.monotonic() - started, 2))
        trial.set_user_attr("status", _built_status(plan, config, result))
        study.tell(trial, values)
    except BudgetError as exc:
        _fail(study, trial, started, "over budget", f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # an EdgecError, or a bug: neither may end the study
        _fail(study, trial, started, "failed", f"{type(exc).__name__}: {exc}", _bug_trace(exc))


class PhaseClock:
    """Where a build's seconds went, read from its progress messages: each message starts an
    interval that lasts until the next one and belongs to the phase the message names."""

    PHASES = (("fine-tune", "fine-tune"), ("evaluating", "evaluate"),
              ("accuracy budget", "evaluate"), ("profiling", "measure"))

    def __init__(self):
        self.phase, self.since = "build", time.monotonic()
        self.seconds = {"fine-tune": 0.0, "build": 0.0, "evaluate": 0.0, "measure": 0.0}

    def wrap(self, progress: Callable[[str], None]) -> Callable[[str], None]:
        def timed(message: str) -> None:
            self._switch(next((phase for prefix, phase in self.PHASES
                               if message.startswith(prefix)), "build"))
            progress(message)
        return timed

    def _switch(self, phase: str) -> None:
        now = time.monotonic()
        self.seconds[self.phase] += now - self.since
        self.phase, self.since = phase, now

    def totals(self) -> dict[str, float]:
        """Seconds per phase so far (the running interval included)."""
        self._switch(self.phase)
        return {phase: round(seconds, 2) for phase, seconds in self.seconds.items()}


def tell_repeat(study, trial, config: TrialConfig, plan: SearchPlan,
                earlier: TrialRecord) -> None:
    """Tell ``trial``, which asked for the configuration of the finished trial ``earlier``,
    what that one found, without building; it is marked ``repeat_of`` and not counted."""
    import optuna

    copied = {k: v for k, v in earlier.attrs.items()
              if k not in ("seconds", "baseline", "phases_s")}
    _set_attrs(trial, {**copied, **_config_attrs(plan, config), "repeat_of": earlier.number,
                       "seconds": 0.0})
    if not earlier.scored:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return
    trial.set_constraint(CONSTRAINT, earlier.attrs["heldout_drop"] - earlier.attrs["budget_points"])
    study.tell(trial, list(earlier.values))


def same_config(records: tuple[TrialRecord, ...], config: TrialConfig) -> TrialRecord | None:
    """The first finished, built trial of the same recipe, backend and overrides, if any."""
    return next((r for r in records if r.counts and _same(r, config)), None)


def _same(record: TrialRecord, config: TrialConfig) -> bool:
    return (record.recipe == config.recipe and record.backend == config.backend
            and record.overrides == config.overrides and record.fidelity == config.fidelity)


def claim_config(study, trial, config: TrialConfig, plan: SearchPlan) -> TrialRecord | None:
    """Claim ``config`` for ``trial`` (its attributes set, so other workers see it running) and
    return None; or return the finished trial that built it, which ``trial`` then repeats. While
    another worker's trial runs it, ``trial`` waits (marked ``waits_for``) for that one; if that
    worker dies, the trial is failed by its heartbeat and this one builds the configuration."""
    waited = trial.user_attrs.get("waits_for") is not None  # a retry of a waiting trial
    while True:
        with claim_lock(study):  # one worker at a time, so two never claim the same config
            records = trial_records(study)
            earlier = same_config(records, config)
            running = next((r for r in records if r.state == "running" and r.number != trial.number
                            and _same(r, config)), None)
            if earlier is None and running is None:
                _set_attrs(trial, {**_config_attrs(plan, config),
                                   **({"waits_for": None} if waited else {})})
                return None
        if earlier is not None:
            return earlier
        trial.set_user_attr("waits_for", running.number)
        waited = True
        time.sleep(min(plan.request.heartbeat.interval_s, 5))
        fail_stale_trials(study)


def _set_attrs(trial, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


def _config_attrs(plan: SearchPlan, config: TrialConfig) -> dict[str, Any]:
    return {"recipe": config.recipe, "recipe_ref": plan.candidates[config.recipe].recipe,
            "backend": config.backend, "overrides": config.overrides,
            "baseline": config.baseline, "fidelity": config.fidelity}


def _built_status(plan: SearchPlan, config: TrialConfig, result) -> str:
    """complete or screened; ``predicted`` for a trial the latency model kept off the board
    (in a search that measures: it is never picked)."""
    if result.rows[1].latency is None and plan.measure_trials != "none":
        return "predicted"
    return "screened" if config.fidelity < 1 else "complete"


def measure_gate(plan: SearchPlan, config: TrialConfig, records: tuple[TrialRecord, ...]
                 ) -> MeasureGate:
    """The build's ``profile_when`` for one trial (edgec.search.predict.MeasureGate)."""
    best = best_so_far(records)
    passed_over = sum(bool(r.attrs.get("passed_over")) and r.counts for r in records)
    return MeasureGate(plan.predictor, plan.measure_trials, config.baseline,
                       None if best is None else best.latency_ms, passed_over,
                       pairs_by_backend(records), screened=config.fidelity < 1)


def _objectives(trial, result, gate: MeasureGate | None = None
                ) -> tuple[tuple[float, float, int], float]:
    """Store what the trial measured (or what the latency model predicted, see ``gate``) in its
    user attributes; (objective values, held-out drop)."""
    manifest, latency = result.manifest, result.rows[1].latency
    if gate is not None:
        _set_attrs(trial, gate.attrs())
        if latency is None:
            latency = gate.as_measurement()
    if latency is None:
        raise SearchError("the build measured no latency (the target's code does not run here "
                          "and no --device was given; a latency model predicts instead: "
                          "--latency-model FILE)")
    ledger = manifest["budget"]
    heldout = ledger["reference_top1"] - ledger["spent"]
    test = manifest.get("accuracy", {}).get("top1")
    recheck = ledger.get("recheck") or {}
    attrs = {
        "artifact": str(result.directory), "manifest_hash": manifest["hash"],
        "latency_mean_ms": latency.mean, "latency_ci95_ms": latency.ci95,
        "latency_p50_ms": latency.p50, "latency_from_cache": bool(latency.extra.get("from_cache")),
        "latency_source": latency.extra.get("source", "measured"),
        "heldout_top1": round(heldout, 4), "heldout_drop": ledger["spent"],
        "reference_top1": ledger["reference_top1"], "budget_points": ledger["points"],
        "recheck_drop": recheck.get("drop"), "recheck_images": recheck.get("images"),
        "test_top1": None if test is None else round(test * 100, 4),
        "size_bytes": manifest["size_bytes"],
        "steps": [[step["pass"], step.get("cache", "run")] for step in manifest["lineage"]],
        "warnings": list(result.warnings), **exit_attrs(manifest)}
    _set_attrs(trial, attrs)
    return (latency.mean, heldout, manifest["size_bytes"]), ledger["spent"]


def exit_attrs(manifest: dict) -> dict:
    """{"exits": ...} for a cascade: the exits kept with their rates on the threshold split, those
    the stream check dropped, and the saving it measured on the build's device (the board when
    the search measures on one); {} for other models."""
    report = next((step["report"] for step in manifest["lineage"]
                   if step["pass"] in CASCADE_PASSES), None)
    if report is None:
        return {}
    stream = report.get("stream") or {}
    return {"exits": {"kept": [[e["after"], e["rate"]] for e in report["exits"]],
                      "dropped": stream.get("dropped", []),
                      "stream_saving": stream.get("measured_saving"),
                      "measured_on": report.get("costs_measured_on")}}


def _fail(study, trial, started: float, status: str, error: str, trace: str = "") -> None:
    import optuna

    trial.set_user_attr("status", status)
    trial.set_user_attr("error", error)
    if trace:
        trial.set_user_attr("traceback", trace)
    trial.set_user_attr("seconds", round(time.monotonic() - started, 2))
    study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)


def _bug_trace(exc: BaseException) -> str:
    """The last frames where a non-edgec exception (a bug, not a refusal) was raised, also when
    a pass wrapped it in a PassError; '' for edgec's own errors."""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    if isinstance(root, EdgecError):
        return ""
    return "".join(traceback.format_exception(root, limit=-4))


def interrupted(study, trial, started: float) -> None:
    """Ctrl-C while ``trial`` ran: a FAIL trial marked ``interrupted`` (not counted), and what it
    had asked queued again so that the resumed search tries it first."""
    try:
        _fail(study, trial, started, "interrupted", "interrupted by the user (Ctrl-C)")
    except RuntimeError:  # it had been told already: nothing to try again
        return
    if trial.params:
        attrs = trial.user_attrs  # a promotion is queued again as one, at full fidelity
        keys = ("baseline", "fidelity", "promoted_from") if "promoted_from" in attrs \
            else ("baseline",)
        kept = {key: attrs[key] for key in keys if key in attrs}
        study.enqueue_trial(dict(trial.params), user_attrs=kept or None)


# ----- reading the study back -------------------------------------------------------------
def trial_records(study) -> tuple[TrialRecord, ...]:
    """Every trial of the study that started, in order."""
    import optuna

    states = {optuna.trial.TrialState.COMPLETE: "complete",
              optuna.trial.TrialState.FAIL: "failed",
              optuna.trial.TrialState.RUNNING: "running"}
    records, rechecks = [], study.user_attrs.get(RECHECKS, {})
    for trial in study.get_trials(deepcopy=False):
        if trial.state not in states:
            continue  # waiting (enqueued, not started) or pruned
        state = trial.user_attrs.get("status", states[trial.state])
        if trial.state == optuna.trial.TrialState.RUNNING:
            state = "running"
        elif "status" not in trial.user_attrs and trial.state == optuna.trial.TrialState.FAIL:
            state = "interrupted"  # its process died; the heartbeat check queued it again
        feasible = all(v <= 0 for v in trial.constraints.values()) and state == "complete"
        attrs = {**trial.user_attrs, **rechecks.get(str(trial.number), {})}
        if retried_from(trial) is not None:
            attrs["retry_of"] = retried_from(trial)
        records.append(TrialRecord(trial.number, state, tuple(trial.values or ()) or None,
                                   feasible, attrs))
    return tuple(records)


def finished(records: tuple[TrialRecord, ...]) -> int:
    """Trials that count towards ``trials``: built (complete or failed), not interrupted, not
    repeats of an earlier configuration."""
    return sum(r.counts for r in records)


def front_numbers(records: tuple[TrialRecord, ...]) -> tuple[int, ...]:
    """The Pareto front (``DIRECTIONS``) of the fully built trials, as Optuna's ``best_trials``
    holds it (the feasible ones when any is): screened trials neither join nor hide it."""
    built = [r for r in records if r.state == "complete" and r.values
             and "repeat_of" not in r.attrs]
    pool = [r for r in built if r.feasible] or built
    signs = [1 if direction == "minimize" else -1 for direction in DIRECTIONS]
    keys = {r.number: tuple(sign * value for sign, value in zip(signs, r.values)) for r in pool}

    def dominated(key) -> bool:
        return any(other != key and all(o <= k for o, k in zip(other, key))
                   for other in keys.values())

    return tuple(number for number, key in keys.items() if not dominated(key))


def best_so_far(records: tuple[TrialRecord, ...]) -> TrialRecord | None:
    """The fastest feasible trial."""
    feasible = [r for r in records if r.feasible]
    return min(feasible, key=lambda r: r.latency_ms) if feasible else None


def front_lines(records: tuple[TrialRecord, ...]) -> tuple[str, ...]:
    """'#3 int8 on onnxruntime: 0.38 ms, 91.80 %' per trial on the feasible front."""
    return tuple(f"#{r.number} {r.recipe} on {r.backend}: {r.latency_ms:.3g} ms, "
                 f"{r.heldout_top1:.2f} %" for r in feasible_front(records))


def describe(record: TrialRecord | None) -> str:
    """'trial 3: int8 on onnxruntime, 0.018 ms ± 0.001, held-out 98.80 %, 11.5 KiB'."""
    if record is None:
        return "no feasible trial yet"
    return (f"trial {record.number}: {record.label()}, {record.latency_ms:.4g} ms "
            f"± {record.ci95_ms:.2g}, held-out {record.heldout_top1:.2f} %, "
            f"{record.size_bytes / 1024:.1f} KiB")


# ----- the search -------------------------------------------------------------------------
def run_search(request: SearchRequest,
               on_status: Callable[[SearchStatus], None] = lambda status: None) -> SearchOutcome:
    """Run trials until the study holds ``request.trials`` built ones, the timeout passes or the
    sampler only repeats configurations; then pick (:mod:`edgec.search.pick`) and write the
    report (:mod:`edgec.search.report`)."""
    plan = plan_search(request)
    study = open_study(plan)
    records, status, new, stopped = _run_trials(study, plan, on_status)
    return conclude(study, plan, records, status, new, stopped, on_status)


def conclude(study, plan: SearchPlan, records: tuple[TrialRecord, ...], status: SearchStatus,
             new, stopped: str, on_status: Callable[[SearchStatus], None] = lambda status: None
             ) -> SearchOutcome:
    """The end of a search (also of one whose trials workers ran, :mod:`edgec.search.workers`):
    pick among ``records`` and write the report."""
    from edgec.search.pick import Remeasure, choose, with_rechecks
    from edgec.search.report import write_report

    request = plan.request
    front = front_numbers(records)
    again = Remeasure(request.device, request.measure, request.remeasure_rounds) \
        if plan.measure_trials != "none" else None
    def step(message: str) -> None:
        on_status(replace(status, step=message, finished=None))

    records = with_rechecks(records, front, lambda record: recheck_trial(study, plan, record,
                                                                        step))
    pick = choose(records, front, again, step)
    if pick is not None and again is None:
        pick = replace(pick, decision=f"predicted by the latency model, nothing measured: "
                                      f"{pick.decision}")
    if pick is not None:
        pick = replace(pick, test_top1=test_top1(plan, pick.record, step))
    command = rebuild_command(plan, pick.record) if pick else ()
    if pick is not None:
        study.set_user_attr("pick", {**pick.to_json(), "command": list(command)})
    outcome = SearchOutcome(plan, records, front, tuple(new), pick, command, stopped)
    return replace(outcome, reports=write_report(outcome))


RECHECKS = "rechecks"  # study attribute: {trial number: {"drop", "images"}} run by the pick


def recheck_trial(study, plan: SearchPlan, record: TrialRecord,
                  progress: Callable[[str], None]) -> TrialRecord:
    """``record`` with its re-check drop (:func:`edgec.build.recheck`, deferred by the trials),
    kept in the study's ``RECHECKS`` attribute: a finished trial's attributes cannot change."""
    from edgec.build import recheck

    if record.attrs.get("recheck_drop") is not None or not plan.fixed.get("budget.recheck"):
        return record
    progress(f"re-checking trial {record.number} on calibration images the search did not "
             f"choose on")
    entry = recheck(build_request(plan, record.config()), progress)
    if entry is None:
        return record
    found = {"recheck_drop": entry["drop"], "recheck_images": entry["images"]}
    study.set_user_attr(RECHECKS, {**study.user_attrs.get(RECHECKS, {}),
                                   str(record.number): found})
    return replace(record, attrs={**record.attrs, **found})


def test_top1(plan: SearchPlan, record: TrialRecord,
              progress: Callable[[str], None]) -> float | None:
    """The pick's top-1 (%) on the evaluation split, for the report: trials skip it (nothing
    chooses by it), so only the pick's artifact is evaluated, here. None when its code does not
    run on this host (e.g. an aarch64 .so) or the evaluation fails."""
    from edgec.build import evaluate_built

    progress(f"evaluating the pick (trial {record.number}) on the evaluation split")
    try:
        top1 = evaluate_built(Path(record.attrs["artifact"]), plan.request.model,
                              plan.request.data)
    except EdgecError as exc:
        progress(f"the pick's evaluation failed: {exc}")
        return None
    return None if top1 is None else round(top1 * 100, 4)


def _run_trials(study, plan: SearchPlan, on_status):
    """The trial loop, the promotions, and the loop again if a promotion slot went unused:
    (records, last status, numbers of the trials built, why it stopped). Promotions count
    towards ``trials``: ``--trials 24`` builds 24 configurations, promotions included; one
    more when nothing could be promoted at the 23rd but a later trial can be."""
    request = plan.request
    clock = _Clock(time.monotonic(), request.timeout_s)
    records = trial_records(study)
    status = SearchStatus(finished(records), request.trials, 0.0,
                          best=describe(best_so_far(records)), front=front_lines(records))
    on_status(status)
    new: list[int] = []
    target = request.trials - promotion_slots(plan, records)
    status, repeats = _trial_loop(study, plan, target, clock, status, new, on_status)
    new += promote(study, plan, status, on_status)
    status = replace(status, done=finished(trial_records(study)))
    if status.done < request.trials and repeats < MAX_REPEATS:
        status, repeats = _trial_loop(study, plan, request.trials, clock, status, new, on_status)
        # a slot left unused, and a trial since then worth promoting: it is promoted all the same
        new += promote(study, plan, status, on_status)
    return trial_records(study), status, new, _stop_reason(status, request, repeats, clock)


def promotion_slots(plan: SearchPlan, records: tuple[TrialRecord, ...]) -> int:
    """Trials kept for promotions not made yet: none when no recipe is screened."""
    request = plan.request
    if request.screen >= 1 or not any(c.finetunes for c in plan.candidates.values()):
        return 0
    made = {r.attrs["promoted_from"] for r in records if "promoted_from" in r.attrs}
    return max(0, min(request.promote - len(made), request.trials - 1))


def _trial_loop(study, plan: SearchPlan, target: int, clock, status: SearchStatus,
                new: list[int], on_status) -> tuple[SearchStatus, int]:
    """Run trials until the study holds ``target`` built ones, the timeout passes or the sampler
    only repeats; the trials built are appended to ``new``; (last status, repeats in a row)."""
    repeats, records = 0, trial_records(study)
    while status.done < target and not clock.out() and repeats < MAX_REPEATS:
        fail_stale_trials(study)  # a trial whose process died: failed, its configuration queued
        trial = ask(study)
        try:
            with beating(study, trial, plan.request.heartbeat.interval_s):
                built = _one_trial(study, trial, plan, records, status, clock, on_status)
        except KeyboardInterrupt:
            interrupted(study, trial, time.monotonic())
            raise
        records = trial_records(study)
        repeats = 0 if built else repeats + 1
        if built:
            new.append(trial.number)
            status = _finished_status(status, records, trial.number, clock)
            on_status(status)
    return status, repeats


def _finished_status(status: SearchStatus, records, number: int, clock) -> SearchStatus:
    """The display's status once trial ``number`` has been built."""
    return replace(status, done=finished(records), running="", step="",
                   elapsed_s=clock.elapsed(), best=describe(best_so_far(records)),
                   front=front_lines(records),
                   finished=next(r for r in records if r.number == number))


def promote(study, plan: SearchPlan, status: SearchStatus,
            on_status: Callable[[SearchStatus], None] = lambda status: None) -> list[int]:
    """Successive halving's last rung: rebuild with the full fine-tune the fastest screened
    trials inside the budget that could beat every fully built feasible one (within the drift a
    board shows, :data:`edgec.search.pick.DRIFT_FRACTION`), at most ``request.promote`` of them
    in the study; (the trials built). They run as enqueued trials (``promoted_from``), so a
    killed search resumes them."""
    clock, new = _Clock(time.monotonic(), None), []
    while (chosen := next_promotion(trial_records(study), plan)) is not None:
        screened, config = chosen
        candidate = plan.candidates[config.recipe]
        point = {key: value for key, value in config.overrides.items()
                 if key not in fixed_overrides(plan.fixed, candidate)}
        enqueue_config(study, candidate, config.backend, point,
                       {"fidelity": 1.0, "promoted_from": screened.number,
                        **({"baseline": True} if config.baseline else {})})
        trial = ask(study)
        status = replace(status, step=f"promoting trial {screened.number}: the full fine-tune")
        try:
            with beating(study, trial, plan.request.heartbeat.interval_s):
                built = _one_trial(study, trial, plan, trial_records(study), status, clock,
                                   on_status)
        except KeyboardInterrupt:
            interrupted(study, trial, time.monotonic())
            raise
        if built:
            new.append(trial.number)
            status = _finished_status(status, trial_records(study), trial.number, clock)
            on_status(status)
    return new


def next_promotion(records: tuple[TrialRecord, ...], plan: SearchPlan
                   ) -> tuple[TrialRecord, TrialConfig] | None:
    """(the screened trial to promote next, its full configuration), or None."""
    from edgec.search.pick import DRIFT_FRACTION

    tried = {r.attrs["promoted_from"] for r in records if "promoted_from" in r.attrs}
    if len(tried) >= plan.request.promote:
        return None
    best = best_so_far(records)
    bar = math.inf if best is None else best.latency_ms * (1 + DRIFT_FRACTION)
    for record in sorted((r for r in records if r.screened and r.state in ("screened", "predicted")
                          and r.counts and r.within_budget and r.number not in tried),
                         key=lambda r: r.latency_ms):
        if record.latency_ms >= bar:
            return None
        config = record.config(fidelity=1.0)
        if same_config(records, config) is None:
            return record, config
    return None


def _one_trial(study, trial, plan: SearchPlan, records, status: SearchStatus, clock,
               on_status) -> bool:
    """Ask ``trial`` for a configuration and build it (True), or tell it the result of the
    same configuration built before (False)."""
    config = ask_config(trial, plan)
    earlier = same_config(records, config) or claim_config(study, trial, config, plan)
    if earlier is not None:
        tell_repeat(study, trial, config, plan, earlier)
        return False
    status = replace(status, running=f"trial {trial.number}: {config.recipe} on {config.backend}",
                     step="", finished=None)
    on_status(status)
    run_trial(study, trial, config, plan, lambda message: on_status(
        replace(status, step=message, elapsed_s=clock.elapsed())))
    return True


@dataclass(frozen=True)
class _Clock:
    started: float
    timeout_s: float | None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def out(self) -> bool:
        return self.timeout_s is not None and self.elapsed() >= self.timeout_s


def _stop_reason(status: SearchStatus, request: SearchRequest, repeats: int,
                 clock: _Clock) -> str:
    if status.done >= request.trials:
        return f"the study holds {status.done} built trials ({request.trials} asked)"
    if repeats >= MAX_REPEATS:
        return (f"the sampler asked only for configurations already built, {repeats} times in a "
                f"row: the space looks exhausted at {status.done} trials")
    return f"the timeout of {clock.timeout_s:g} s passed after {status.done} trials"


# ----- the rebuild command ----------------------------------------------------------------
def rebuild_command(plan: SearchPlan, record: TrialRecord) -> tuple[str, ...]:
    """``edgec build`` arguments that give the trial's artifact again (every step, evaluation
    and measurement from the cache)."""
    request, spec = plan.request, plan.request.measure
    args = ["edgec", "build", str(request.model), "--target", request.target,
            "--recipe", record.attrs["recipe_ref"], "--budget", _number(request.budget),
            "--out", str(plan.build_root), "--repeat", str(spec.repeat),
            "--min-time", _number(spec.min_time_s), "--threads", str(spec.threads)]
    if record.backend != AUTO_BACKEND:
        args += ["--backend", record.backend]
    if request.device != "local":
        args += ["--device", request.device]
    if request.eval_count:
        args += ["--eval-count", str(request.eval_count)]
    if request.data:
        args += ["--data", str(request.data)]
    for key, value in record.overrides.items():
        args += ["--set", f"{key}={toml_text(value)}"]
    return tuple(args)


def _number(value: float) -> str:
    return repr(float(value))


def toml_text(value: Any) -> str:
    """A value as ``--set`` reads it (TOML; a bare word stays a string); None as ``none``, the
    word a recipe's ``[search]`` uses for it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        try:
            tomllib.loads(f"v = {value}")
        except tomllib.TOMLDecodeError:
            return value
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


# ----- rebuilding the pick: edgec build --from-study -------------------------------------
@dataclass(frozen=True)
class StudyPick:
    """What ``edgec build --from-study`` needs from a finished study: the pick's recipe,
    backend (None: the build chooses) and overrides, and the study's target and budget."""

    study: str
    trial: int
    recipe: str
    backend: str | None
    overrides: dict[str, Any]
    target: str
    budget: float
    model: Path | None = None  # the model TOML the study searched (as it was given)


def default_storage(study: str) -> str:
    """Where ``edgec search --study NAME`` keeps its study when no --storage or --out is given."""
    return f"sqlite:///{Path('search') / study / f'{study}.db'}"


def load_pick(study: str, storage: str | None = None, trial: int | None = None) -> StudyPick:
    """The pick of a finished search, or its trial number ``trial`` (SearchError when the study
    is missing or has no pick)."""
    import optuna

    storage = storage or default_storage(study)
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        raise SearchError(f"no study database {storage.removeprefix('sqlite:///')!r}; give the "
                          f"search's --storage, or run `edgec search ... --study {study}` first")
    try:
        loaded = optuna.load_study(study_name=study, storage=storage)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise SearchError(f"no study {study!r} in {storage}: {exc}") from exc
    pick, request = loaded.user_attrs.get("pick"), loaded.user_attrs.get("request", {})
    if not pick:
        raise SearchError(f"study {study!r} has no pick yet (no trial finished inside the "
                          f"budget); run `edgec search` on it again")
    number = pick["trial"] if trial is None else trial
    if not 0 <= number < len(loaded.trials) or "recipe_ref" not in loaded.trials[number].user_attrs:
        raise SearchError(f"study {study!r} has no built trial {number}")
    attrs = loaded.trials[number].user_attrs
    backend = attrs["backend"] if attrs["backend"] != AUTO_BACKEND else None
    return StudyPick(study, number, attrs["recipe_ref"], backend, dict(attrs["overrides"]),
                     request.get("target", "local"), float(request.get("budget", 1.0)),
                     Path(request["model"]) if request.get("model") else None)
