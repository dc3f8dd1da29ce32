"""The Pass protocol and the Pipeline that chains passes from a recipe."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

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
    progress: Callable[[str], None] = field(default=lambda message: None)


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

    def __init__(self, steps: list[Step], name: str = "custom"):
        self.steps = list(steps)
        self.name = name
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
        steps = list(self.steps)
        for key, value in overrides.items():
            name, dot, param = key.partition(".")
            if not dot or not param:
                raise ConfigError(f"override {key!r} is not 'pass.param' (e.g. quantize.mode)")
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
        return Pipeline(steps, self.name)

    def check_target(self, target) -> None:
        for step in self.steps:
            reason = step.pass_.supports(target)
            if reason:
                raise ConfigError(f"pass {step.pass_.name!r} cannot run for target "
                                  f"{target.name!r}: {reason}")

    def run(self, artifact: Artifact, ctx: Context,
            on_step: Callable[[str, float], None] = lambda name, seconds: None) -> Artifact:
        """Apply every step; a failure is a PassError naming the failing and the finished passes."""
        if artifact.stage != self.consumes:
            raise ConfigError(f"pipeline {self.name!r} starts from a {self.consumes!r} model, "
                              f"got a {artifact.stage!r} model; use a recipe that fits it")
        done: list[str] = []
        for step in self.steps:
            started = time.perf_counter()
            try:
                artifact = step.pass_.run(artifact, step.params, ctx)
            except EdgecError as exc:
                raise type(exc)(f"{exc} (in pass {step.pass_.name!r}; passes already run: "
                                f"{done or 'none'})") from exc
            except Exception as exc:
                raise PassError(f"pass {step.pass_.name!r} failed: {type(exc).__name__}: {exc} "
                                f"(passes already run: {done or 'none'})") from exc
            done.append(step.pass_.name)
            on_step(step.pass_.name, time.perf_counter() - started)
        return artifact
