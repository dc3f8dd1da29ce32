"""The Pass protocol and the Pipeline that chains passes from a recipe."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from edgec.artifact import Artifact, LineageStep
from edgec.config import check_keys, from_dict, load_toml, suggest
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


def recipe_paths() -> dict[str, Path]:
    """The built-in recipes by name (passes/*.toml, shipped as package data)."""
    from edgec.resources import builtin_dir

    return {p.stem: p for p in sorted(builtin_dir("passes").glob("*.toml"))}


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A recipe TOML path, or a built-in recipe by bare name (``int8``, ``prune-int8``)."""
    path, known = Path(name_or_path), recipe_paths()
    if path.is_file():
        return path
    if path.suffix == ".toml":  # passes/int8.toml from outside the clone: the built-in one
        return known[path.stem] if path.parent.name == "passes" and path.stem in known else path
    if str(name_or_path) not in known:
        raise ConfigError(f"unknown recipe {str(name_or_path)!r}: neither a file nor a built-in "
                          f"recipe; {suggest(str(name_or_path), known, 'built-in recipes')}")
    return known[str(name_or_path)]


def load_recipe(path: str | Path, registry: dict[str, Any] | None = None) -> Pipeline:
    """Build a Pipeline from a recipe TOML (a path or a built-in name): ``[[step]]`` tables with
    ``pass`` plus its params."""
    from edgec.passes import PASSES

    registry = registry or PASSES
    path = resolve_recipe(path)
    raw = load_toml(path)
    check_keys(raw, ["name", "description", "step", "search"], str(path))
    steps = []
    for i, table in enumerate(raw.get("step", [])):
        where = f"{path} step {i + 1}"
        table = dict(table)
        name = table.pop("pass", None)
        if name not in registry:
            raise ConfigError(f"{where}: unknown pass {name!r}; "
                              f"{suggest(str(name), registry, 'known passes')}")
        pass_ = registry[name]()
        steps.append(Step(pass_, from_dict(pass_.Params, table, f"{where} ({name})")))
    if not steps:
        raise ConfigError(f"{path}: recipe has no [[step]]; add at least one pass")
    return Pipeline(steps, name=raw.get("name", path.stem))
