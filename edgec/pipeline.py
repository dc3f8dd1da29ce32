"""The Pass protocol and the Pipeline that chains passes from a recipe."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

from edgec import step_outputs
from edgec.artifact import Artifact, LineageStep
from edgec.config import from_dict, suggest
from edgec.errors import ConfigError, EdgecError, PassError


@dataclass
class Context:
    """What passes may use besides the artifact: target, input spec, data, scratch dir."""

    target: Any
    input_spec: Any
    calibration: Any = None  # edgec.data.Dataset or None (data-free)
    workdir: Path = Path(".")
    seed: int = 0
    baseline: Any = None  # the float torch model, for distillation and accuracy budgets
    evaluation: Any = None  # only for reporting, never for choices
    cpu: Any = None  # edgec.cpu.CpuInfo of the machine that runs the artifact (None: the target's)
    backend: str | None = None  # the backend the build asked for (None: the target's first fit)
    device: Any = None  # edgec.devices.Device where passes time candidates (None: LocalDevice)
    progress: Callable[[str], None] = field(default=lambda message: None)
    cache: Any = None  # edgec.cache.Cache: steps are looked up before they run (None: no cache)
    ledger: Any = None  # edgec.budget.Ledger: the build's one accuracy budget (None: no budget)


class Pass(Protocol):
    """A compiler pass: consumes one artifact stage, produces another."""

    name: ClassVar[str]
    consumes: ClassVar[str]
    produces: ClassVar[str]
    Params: ClassVar[type]

    def supports(self, target) -> str | None:
        """None if the pass can run for ``target``, else the reason it cannot."""

    def run(self, artifact: Artifact, params: Any, ctx: Context) -> Artifact: ...


@dataclass(frozen=True)
class Step:
    pass_: Pass
    params: Any

    def lineage(self, report: dict[str, Any] | None = None) -> LineageStep:
        return LineageStep(self.pass_.name, asdict(self.params), report or {})


class Pipeline:
    """An ordered list of (Pass, Params), checked to chain stage to stage at construction."""

    def __init__(self, steps: list[Step], name: str = "custom", budget: Any = None):
        self.steps = list(steps)
        self.name = name
        self.budget = budget  # edgec.budget.BudgetSpec from the recipe's [budget], or None
        for before, after in zip(self.steps, self.steps[1:]):
            if before.pass_.produces != after.pass_.consumes:
                raise ConfigError(
                    f"pipeline {name!r}: {before.pass_.name!r} produces {before.pass_.produces!r} "
                    f"but {after.pass_.name!r} consumes {after.pass_.consumes!r}; reorder the steps"
                )

    @property
    def consumes(self) -> str:
        return self.steps[0].pass_.consumes if self.steps else "onnx"

    def config(self) -> list[dict[str, Any]]:
        return [{"pass": s.pass_.name, "params": asdict(s.params)} for s in self.steps]

    def with_overrides(self, overrides: dict[str, Any]) -> Pipeline:
        """A copy with step parameters replaced: ``{"prune.ratio": 0.2, "quantize.mode":
        "mixed"}``; keys are ``pass.param`` and validated like recipe keys."""
        steps, budget = list(self.steps), self.budget
        for key, value in overrides.items():
            name, dot, param = key.partition(".")
            if not dot or not param:
                raise ConfigError(f"override {key!r} is not 'pass.param' (e.g. quantize.mode)")
            if name == "budget":  # the recipe's [budget]: budget.points, budget.holdout, ...
                budget = _budget_override(budget, param, value, key)
                continue
            where = [i for i, step in enumerate(steps) if step.pass_.name == name]
            if not where:
                names = [step.pass_.name for step in steps]
                raise ConfigError(f"override {key!r}: recipe {self.name!r} has no pass {name!r}; "
                                  f"{suggest(name, names, 'its passes')}")
            if len(where) > 1:
                raise ConfigError(f"override {key!r}: recipe {self.name!r} runs {name!r} "
                                  f"{len(where)} times; edit the recipe instead")
            step = steps[where[0]]
            values = {**asdict(step.params), param: value}
            steps[where[0]] = Step(step.pass_, from_dict(type(step.params), values,
                                                         f"override {key!r} ({name})"))
        return Pipeline(steps, self.name, budget)

    def check_target(self, target) -> None:
        for step in self.steps:
            reason = step.pass_.supports(target)
            if reason:
                raise ConfigError(f"pass {step.pass_.name!r} cannot run for target "
                                  f"{target.name!r}: {reason}")

    def run(self, artifact: Artifact, ctx: Context,
            on_step: Callable[[str, float], None] = lambda name, seconds: None) -> Artifact:
        """Apply every step; a failure is a PassError naming the failing and the finished passes.

        With ``ctx.cache`` each step is looked up before it runs (edgec.step_outputs): the
        longest cached prefix is skipped and only its last output is restored. With
        ``ctx.ledger`` every step that runs is charged what its output lost."""
        if artifact.stage != self.consumes:
            raise ConfigError(f"pipeline {self.name!r} starts from a {self.consumes!r} model, "
                              f"got a {artifact.stage!r} model; use a recipe that fits it")
        if ctx.ledger is not None:
            ctx.ledger.steps = [step.pass_.name for step in self.steps]
        run = _CachedRun(self.steps, artifact, ctx)
        artifact, first = run.skip_cached_prefix()
        for index in range(first, len(self.steps)):
            artifact = run.run_step(index, artifact, on_step)
        return run.marked(artifact)


def _budget_override(budget, param: str, value: Any, key: str):
    """The recipe's BudgetSpec with ``param`` replaced (a recipe without one starts from
    ``points`` alone)."""
    from edgec.budget import BudgetSpec

    values = asdict(budget) if budget is not None else {}
    if budget is None and param != "points":
        raise ConfigError(f"override {key!r}: the recipe has no [budget]; set budget.points "
                          f"(or --budget) first")
    return from_dict(BudgetSpec, {**values, param: value}, f"override {key!r} (budget)")


class _CachedRun:
    """One Pipeline.run: step keys, cache lookups, the ledger's charges, each step's status."""

    def __init__(self, steps: list[Step], source: Artifact, ctx: Context):
        self.steps, self.source, self.ctx = steps, source, ctx
        self.cache = ctx.cache if ctx.cache is not None and ctx.cache.enabled else None
        self.keys: list[str] = []
        self.entries: list[Any] = []
        self.status: list[str] = []
        self.done: list[str] = []

    def _key(self, index: int) -> str:
        if index == 0 and not hasattr(self, "_source_key"):
            self._source_key = step_outputs.source_key(self.source)
        previous = self.keys[index - 1] if index else self._source_key
        return step_outputs.step_key(previous, self.steps[index], self.ctx)

    def skip_cached_prefix(self) -> tuple[Artifact, int]:
        """(the output of the longest cached prefix, or the source; the first step to run)."""
        if self.cache is None:
            return self.source, 0
        for index in range(len(self.steps)):
            self.keys.append(self._key(index))
            entry = self.cache.load(step_outputs.KIND, self.keys[index])
            if entry is None:
                self.keys.pop()
                break
            self.entries.append(entry)
            self.status.append("hit")
            if self.ctx.ledger is not None:
                self.ctx.ledger.restore(entry.meta["ledger"])
        if not self.entries:
            return self.source, 0
        restored = self._restore(len(self.entries) - 1)
        for index, entry in enumerate(self.entries):
            name = self.steps[index].pass_.name
            self.ctx.progress(f"pass {name}: cache hit (it ran {entry.meta['seconds']:.1f} s "
                              f"when it was stored)" if self.status[index] == "hit" else
                              f"pass {name}: re-run on the cached input (its output is not "
                              f"stored)")
        return restored, len(self.entries)

    def _restore(self, index: int) -> Artifact:
        """The output of cached step ``index``, restoring (or re-running) its inputs first."""
        if index < 0:
            return self.source
        entry = self.entries[index]
        if entry.meta["payload"] == "none":
            return self._rerun(index)
        base = self._restore(index - 1) if step_outputs.needs_input(entry) else None
        return step_outputs.restored_artifact(entry, base, self.ctx.workdir)

    def _rerun(self, index: int) -> Artifact:
        """Re-run a cached step whose output the cache does not keep (an FX rewrite)."""
        base = self._restore(index - 1)
        step, ledger = self.steps[index], self.ctx.ledger
        if ledger is not None:
            spends = ledger.spends
            ledger.restore(self.entries[index - 1].meta["ledger"] if index else [])
        try:
            artifact = self._apply(step, base)
        finally:
            if ledger is not None:
                ledger.restore(spends)
        self.status[index] = "re-run"
        return artifact

    def run_step(self, index: int, artifact: Artifact, on_step) -> Artifact:
        step, started = self.steps[index], time.perf_counter()
        key = self._key(index) if self.cache is not None else ""
        artifact = self._apply(step, artifact)
        if self.ctx.ledger is not None:
            spend = self.ctx.ledger.charge(step.pass_.name, artifact,
                                           exact=getattr(step.pass_, "exact", False))
            self.ctx.progress(f"pass {step.pass_.name}: spent {spend['points']:+.2f} of the "
                              f"accuracy budget ({self.ctx.ledger.spent:.2f} of "
                              f"{self.ctx.ledger.total} in all)")
        seconds = time.perf_counter() - started
        if self.cache is not None:
            self.keys.append(key)
            step_outputs.store_output(self.cache, key, step.pass_, artifact, seconds,
                                      self.ctx.ledger.spends if self.ctx.ledger else [])
        self.status.append("run")
        on_step(step.pass_.name, seconds)
        return artifact

    def _apply(self, step: Step, artifact: Artifact) -> Artifact:
        try:
            artifact = step.pass_.run(artifact, step.params, self.ctx)
        except EdgecError as exc:
            raise type(exc)(f"{exc} (in pass {step.pass_.name!r}; passes already run: "
                            f"{self.done or 'none'})") from exc
        except Exception as exc:
            raise PassError(f"pass {step.pass_.name!r} failed: {type(exc).__name__}: {exc} "
                            f"(passes already run: {self.done or 'none'})") from exc
        self.done.append(step.pass_.name)
        return artifact

    def marked(self, artifact: Artifact) -> Artifact:
        """``artifact`` with each of this pipeline's lineage steps marked run / hit / re-run
        (only when a cache was in use)."""
        if self.cache is None:
            return artifact
        head = artifact.lineage[:len(artifact.lineage) - len(self.steps)]
        tail = artifact.lineage[len(head):]
        marked = tuple(replace(step, cache=status) for step, status in zip(tail, self.status))
        return replace(artifact, lineage=(*head, *marked))
