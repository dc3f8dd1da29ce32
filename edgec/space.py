"""Search spaces declared beside the defaults, and the space of one pipeline for one target.

A pass declares which values of a parameter are worth searching in the field metadata of its
Params dataclass, next to the default (Olive's ``Categorical`` / ``Boolean`` / ``Conditional``
search parameters are the model)::

    ratio: float = field(default=0.2, metadata=choices(0.0, 0.1, 0.2, when={"budget_points": None}))
    per_channel: bool = field(default=True, metadata=boolean(when={"mode": "int8"}))
    accuracy_budget: float = field(default=1.0, metadata=float_range(0.25, 3.0))

A dimension is named ``pass.param``. ``when`` makes it active only while other parameters of the
same pass have the given value (a list: any of its values), read from the point being built or
else from the recipe. :func:`pipeline_space` gathers the dimensions of a pipeline's passes for a
target (a pass the target rejects contributes nothing; choices the target cannot take are
dropped, :data:`TARGET_FITS`) and narrows them by a recipe's ``[search]`` table. A point of the
space is an overrides dict (``{"prune.ratio": 0.2, "quantize.mode": "mixed"}``, active dimensions
only) for :meth:`edgec.pipeline.Pipeline.with_overrides`.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from edgec import int8
from edgec.config import check_keys, suggest
from edgec.cpu import target_cpu
from edgec.errors import ConfigError

METADATA_KEY = "edgec.search"  # where a Params field's metadata keeps its dimension
Condition = tuple[tuple[str, tuple[Any, ...]], ...]  # ((param, (allowed values, ...)), ...)


def show(value: Any) -> str:
    """A value as a recipe writes it: ``none``, ``true``, ``0.2``, ``int8``, ``[4, 8]``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return f"[{', '.join(show(v) for v in value)}]"
    return str(value)


def same(a: Any, b: Any) -> bool:
    """Equal and of one kind: ``True`` is not ``1`` and ``None`` only itself; ``1`` is ``1.0``."""
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return type(a) is type(b) and a == b
    return a == b


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _Named:
    """What every dimension shares: its name ``pass.param`` and its condition ``when``."""

    name: str
    when: Condition

    @property
    def pass_name(self) -> str:
        return self.name.partition(".")[0]

    @property
    def param(self) -> str:
        return self.name.partition(".")[2]

    def active(self, values: Mapping[str, Any]) -> bool:
        """Whether ``when`` holds for ``values`` (``pass.param`` → value)."""
        return all(any(same(values[f"{self.pass_name}.{param}"], v) for v in allowed)
                   for param, allowed in self.when)

    def condition_text(self) -> str:
        """``budget_points = none``; alternatives joined by ``|``, conditions by ``and``."""
        return " and ".join(f"{param} = {' | '.join(show(v) for v in allowed)}"
                            for param, allowed in self.when)

    def named(self, name: str):
        """This dimension under the name ``pass.param``."""
        return dataclasses.replace(self, name=name)


@dataclass(frozen=True)
class Categorical(_Named):
    """One of ``choices`` (numbers, strings, booleans, None)."""

    choices: tuple[Any, ...]
    when: Condition = ()
    name: str = ""

    def __post_init__(self):
        if not self.choices:
            raise ValueError("a categorical dimension needs at least one choice")

    @property
    def kind(self) -> str:
        return "bool" if all(isinstance(c, bool) for c in self.choices) else "choice"

    def describe(self) -> str:
        return ", ".join(show(c) for c in self.choices)

    def contains(self, value: Any) -> bool:
        return any(same(value, c) for c in self.choices)

    def values(self, points: int = 3) -> tuple[Any, ...]:
        """The values a grid visits: every choice."""
        return self.choices

    def sample(self, rng) -> Any:
        return rng.choice(self.choices)

    def suggest(self, trial) -> Any:
        return trial.suggest_categorical(self.name, list(self.choices))


@dataclass(frozen=True)
class IntRange(_Named):
    """An integer from ``low`` to ``high`` inclusive, every ``step``-th (or log-uniform)."""

    low: int
    high: int
    step: int = 1
    log: bool = False
    when: Condition = ()
    name: str = ""
    kind: ClassVar[str] = "int"

    def __post_init__(self):
        if not (_number(self.low) and _number(self.high) and self.low <= self.high):
            raise ValueError(f"int range {self.low}..{self.high}: low must be <= high")
        if self.step < 1 or self.log and (self.low < 1 or self.step != 1):
            raise ValueError("int range: step >= 1; log needs low >= 1 and step 1")

    def describe(self) -> str:
        step = f" step {self.step}" if self.step != 1 else ""
        return f"{self.low} … {self.high}{step}{' log' if self.log else ''}"

    def contains(self, value: Any) -> bool:
        return (isinstance(value, int) and not isinstance(value, bool)
                and self.low <= value <= self.high and (value - self.low) % self.step == 0)

    def values(self, points: int = 3) -> tuple[int, ...]:
        """Every value, or ``points`` of them spread from low to high."""
        every = range(self.low, self.high + 1, self.step)
        if len(every) <= points:
            return tuple(every)
        return tuple(dict.fromkeys(every[round(i * (len(every) - 1) / (points - 1))]
                                   for i in range(points)))

    def sample(self, rng) -> int:
        if self.log:
            return min(self.high, round(math.exp(rng.uniform(math.log(self.low),
                                                             math.log(self.high)))))
        return rng.randrange(self.low, self.high + 1, self.step)

    def suggest(self, trial) -> int:
        return trial.suggest_int(self.name, self.low, self.high, step=self.step, log=self.log)


@dataclass(frozen=True)
class FloatRange(_Named):
    """A float from ``low`` to ``high`` inclusive, uniform or log-uniform."""

    low: float
    high: float
    log: bool = False
    when: Condition = ()
    name: str = ""
    kind: ClassVar[str] = "float"

    def __post_init__(self):
        if not (_number(self.low) and _number(self.high) and self.low <= self.high):
            raise ValueError(f"float range {self.low}..{self.high}: low must be <= high")
        if self.log and self.low <= 0:
            raise ValueError(f"float range {self.low}..{self.high}: log needs low > 0")

    def describe(self) -> str:
        return f"{self.low} … {self.high}{' log' if self.log else ''}"

    def contains(self, value: Any) -> bool:
        return _number(value) and self.low <= value <= self.high

    def values(self, points: int = 3) -> tuple[float, ...]:
        """``points`` values from low to high, evenly (geometrically with ``log``) spaced."""
        if points < 2 or self.low == self.high:
            return (self.low,)
        if self.log:
            ratio = (self.high / self.low) ** (1 / (points - 1))
            return tuple(round(self.low * ratio ** i, 6) for i in range(points))
        gap = (self.high - self.low) / (points - 1)
        return tuple(round(self.low + gap * i, 6) for i in range(points))

    def sample(self, rng) -> float:
        if self.log:
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return rng.uniform(self.low, self.high)

    def suggest(self, trial) -> float:
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


Dimension = Categorical | IntRange | FloatRange


def _condition(when: Mapping[str, Any] | None) -> Condition:
    """``{"mode": "int8"}`` → ``(("mode", ("int8",)),)``; a list value allows any of its items."""
    return tuple((param, tuple(value) if isinstance(value, list) else (value,))
                 for param, value in (when or {}).items())


def choices(*values: Any, when: Mapping[str, Any] | None = None) -> dict[str, Categorical]:
    """Field metadata: the parameter is searched over ``values``."""
    return {METADATA_KEY: Categorical(tuple(values), _condition(when))}


def boolean(when: Mapping[str, Any] | None = None) -> dict[str, Categorical]:
    """Field metadata: the parameter is searched over true and false."""
    return choices(True, False, when=when)


def int_range(low: int, high: int, step: int = 1, log: bool = False,
              when: Mapping[str, Any] | None = None) -> dict[str, IntRange]:
    """Field metadata: the parameter is searched over the integers ``low`` to ``high``."""
    return {METADATA_KEY: IntRange(low, high, step, log, _condition(when))}


def float_range(low: float, high: float, log: bool = False,
                when: Mapping[str, Any] | None = None) -> dict[str, FloatRange]:
    """Field metadata: the parameter is searched over the floats ``low`` to ``high``."""
    return {METADATA_KEY: FloatRange(float(low), float(high), log, _condition(when))}


@dataclass(frozen=True)
class Space:
    """The dimensions of one pipeline for one target, parents before the dimensions whose
    condition reads them; ``recipe``: the recipe's value of every ``pass.param`` of the passes
    that take part; ``skipped``: (pass, why it contributes nothing)."""

    dimensions: tuple[Dimension, ...]
    recipe: Mapping[str, Any] = field(default_factory=dict)
    skipped: tuple[tuple[str, str], ...] = ()

    def fixing(self, values: Mapping[str, Any]) -> Space:
        """This space with the dimensions named in ``values`` (``pass.param``) fixed there:
        they are no longer asked, and conditions read the fixed values."""
        fixed = {name: value for name, value in values.items() if name in self.recipe}
        return replace(self, dimensions=tuple(d for d in self.dimensions if d.name not in fixed),
                       recipe={**self.recipe, **fixed})

    def default(self) -> dict[str, Any]:
        """The recipe's own value of every dimension: the point the recipe builds."""
        return {dim.name: self.recipe[dim.name] for dim in self.dimensions}

    def sample(self, rng) -> dict[str, Any]:
        """A random point drawn with ``rng`` (a ``random.Random``); active dimensions only."""
        return self._walk(lambda dim: dim.sample(rng))

    def suggest(self, trial) -> dict[str, Any]:
        """A point asked of an Optuna trial (define-by-run: inactive dimensions are not asked)."""
        return self._walk(lambda dim: dim.suggest(trial))

    def grid(self, points: int = 3) -> Iterator[dict[str, Any]]:
        """Every point over the choices; a range contributes ``points`` values, low to high."""
        yield from self._grid({}, 0, points)

    def to_table(self) -> list[dict[str, str]]:
        """One row per dimension for printing: pass.param, kind, range, condition, recipe."""
        return [{"pass.param": dim.name, "kind": dim.kind, "range": dim.describe(),
                 "condition": dim.condition_text(), "recipe": show(self.recipe[dim.name])}
                for dim in self.dimensions]

    def _walk(self, pick: Callable[[Dimension], Any]) -> dict[str, Any]:
        point: dict[str, Any] = {}
        for dim in self.dimensions:
            if dim.active({**self.recipe, **point}):
                point[dim.name] = pick(dim)
        return point

    def _grid(self, point: dict[str, Any], index: int, points: int) -> Iterator[dict[str, Any]]:
        if index == len(self.dimensions):
            yield dict(point)
            return
        dim = self.dimensions[index]
        if not dim.active({**self.recipe, **point}):
            yield from self._grid(point, index + 1, points)
            return
        for value in dim.values(points):
            yield from self._grid({**point, dim.name: value}, index + 1, points)


# Which forced int8 schemes (the quantize step's ``scheme``) each backend's int8 kernels run, by
# the first of a target's backends that has an int8 policy (edgec.int8.POLICIES, as int8.choose).
BACKEND_SCHEMES: dict[str, tuple[str, ...]] = {
    "onnxruntime": tuple(int8.SCHEMES),
    "cascade": tuple(int8.SCHEMES),
    "ort-mobile": tuple(int8.SCHEMES),
    "tensorrt": (int8.S8S8_SYMMETRIC.name,),  # explicit quantization: symmetric s8 only
}


def scheme_fits(target, scheme: str) -> bool:
    """Whether ``target``'s int8 backend runs ``scheme`` exactly: a scheme its kernels take and
    whose int16 pair sums do not saturate on the target's CPU; ``auto`` (its policy) always."""
    if scheme == "auto":
        return True
    backend = next((name for name in target.backends if name in int8.POLICIES), None)
    if scheme not in BACKEND_SCHEMES.get(backend, ()):
        return False
    return not int8.saturates(int8.SCHEMES[scheme], target_cpu(target).int8_path)


def multiple_fits(target, multiple: int) -> bool:
    """0 (the target's own channel multiple) or a multiple of the target's channel multiple."""
    return multiple == 0 or multiple % target.channel_multiple == 0


# pass.param → whether a target can take a choice of it; choices that do not fit are dropped
TARGET_FITS: dict[str, Callable[[Any, Any], bool]] = {
    "quantize.scheme": scheme_fits,
    "prune.channel_multiple": multiple_fits,
}


def declared_dimensions(pass_) -> tuple[Dimension, ...]:
    """The dimensions ``pass_``'s Params fields declare, named ``pass.param``, parents first."""
    fields = {f.name: f for f in dataclasses.fields(pass_.Params)}
    dims = []
    for param, spec in fields.items():
        dim = spec.metadata.get(METADATA_KEY)
        if dim is None:
            continue
        unknown = [name for name, _ in dim.when if name not in fields]
        if unknown:
            raise ConfigError(f"{pass_.name}.{param}: its condition reads {unknown}, which "
                              f"{pass_.Params.__name__} lacks; fix the field's `when`")
        dims.append(dim.named(f"{pass_.name}.{param}"))
    return _parents_first(dims)


def _parents_first(dims: list[Dimension]) -> tuple[Dimension, ...]:
    """``dims`` in declaration order, except that each comes after the dimensions it reads."""
    params, ordered, left = {d.param for d in dims}, [], list(dims)
    while left:
        placed = {d.param for d in ordered}
        ready = next((d for d in left if all(p in placed or p not in params for p, _ in d.when)),
                     None)
        if ready is None:
            raise ConfigError(f"the conditions of {[d.name for d in left]} read each other in a "
                              f"cycle; fix their `when`")
        ordered.append(ready)
        left.remove(ready)
    return tuple(ordered)


def _fit(dim: Dimension, target) -> Dimension | None:
    """``dim`` without the choices ``target`` cannot take; None when no choice is left."""
    fits = TARGET_FITS.get(dim.name)
    if fits is None or not isinstance(dim, Categorical):
        return dim
    kept = tuple(c for c in dim.choices if fits(target, c))
    return dataclasses.replace(dim, choices=kept) if kept else None


def pipeline_space(pipeline, target, narrow: Mapping[str, Any] | None = None) -> Space:
    """The search space of ``pipeline`` (:class:`edgec.pipeline.Pipeline`) for ``target``.

    Every dimension the passes declare, without the choices the target cannot take; a pass
    whose ``supports(target)`` gives a reason, or that the pipeline runs more than once (an
    override could not name one of them), contributes nothing (``skipped`` says why; its
    entries in ``narrow`` are checked by name only). ``narrow`` (a recipe's
    ``[search]``, :func:`edgec.recipes.recipe_search`) maps ``pass.param`` to a list of values
    or a ``{low, high}`` table inside the declared range; anything else is a ConfigError.
    """
    runs = Counter(step.pass_.name for step in pipeline.steps)
    dims: list[Dimension] = []
    recipe: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for step in pipeline.steps:
        name = step.pass_.name
        reason = step.pass_.supports(target) or (
            f"runs {runs[name]} times in the recipe" if runs[name] > 1 else None)
        if reason:
            skipped[name] = reason
            continue
        recipe.update({f"{name}.{k}": v for k, v in dataclasses.asdict(step.params).items()})
        dims += [fitted for dim in declared_dimensions(step.pass_)
                 if (fitted := _fit(dim, target)) is not None]
    dims = _narrow_all(dims, pipeline, dict(narrow or {}), skipped, target.name)
    return Space(tuple(dims), recipe, tuple(skipped.items()))


def _narrow_all(dims: list[Dimension], pipeline, narrow: dict[str, Any],
                skipped: dict[str, str], target_name: str) -> list[Dimension]:
    by_name = {dim.name: dim for dim in dims}
    for key, spec in narrow.items():
        step = _step_of(pipeline, key)
        if step.pass_.name in skipped:
            continue  # the pass takes no part for this target: nothing to narrow
        if key not in by_name:
            raise ConfigError(_not_searchable(key, step, dims, target_name))
        by_name[key] = narrowed(by_name[key], spec, f"{key} (target {target_name})")
    return [by_name[dim.name] for dim in dims]


def _step_of(pipeline, key: str):
    """The step that ``key`` (``pass.param``) names; ConfigError with a suggestion otherwise."""
    name, dot, param = key.partition(".")
    if not dot or not param:
        raise ConfigError(f"[search] key {key!r} is not 'pass.param'; write e.g. "
                          f'"prune.ratio" = [0.1, 0.2]')
    steps = {step.pass_.name: step for step in pipeline.steps}
    if name not in steps:
        raise ConfigError(f"[search] {key}: recipe {pipeline.name!r} has no pass {name!r}; "
                          f"{suggest(name, steps, 'its passes')}")
    fields = [f.name for f in dataclasses.fields(steps[name].pass_.Params)]
    if param not in fields:
        raise ConfigError(f"[search] {key}: pass {name!r} has no parameter {param!r}; "
                          f"{suggest(param, fields, 'its parameters')}")
    return steps[name]


def _not_searchable(key: str, step, dims: list[Dimension], target_name: str) -> str:
    searchable = [d.param for d in dims if d.pass_name == step.pass_.name]
    return (f"[search] {key}: pass {step.pass_.name!r} declares no search range for "
            f"{key.partition('.')[2]!r} on target {target_name!r}; searchable: "
            f"{', '.join(searchable) or 'none'} (set a fixed value in its [[step]] instead)")


def narrowed(dim: Dimension, spec: Any, where: str) -> Dimension:
    """``dim`` narrowed by a ``[search]`` entry: a list of values (``"none"`` for None) or a
    ``{low, high}`` table, inside the declared range (else a ConfigError naming both)."""
    if isinstance(spec, list):
        return _narrow_to_values(dim, spec, where)
    if isinstance(spec, dict):
        return _narrow_to_band(dim, spec, where)
    raise ConfigError(f"[search] {where}: {spec!r} is neither a list of values ([0.1, 0.2]) "
                      f"nor a table ({{low = 0.1, high = 0.3}}); declared: {dim.describe()}")


def _narrow_to_values(dim: Dimension, values: list[Any], where: str) -> Categorical:
    if not values:
        raise ConfigError(f"[search] {where}: the list is empty; pick values of {dim.describe()}")
    picked: list[Any] = []
    for value in values:
        value = None if value == "none" and dim.contains(None) else value
        if not dim.contains(value):
            raise ConfigError(f"[search] {where}: {show(value)} is outside the declared "
                              f"{dim.kind} range {dim.describe()}; pick values inside it")
        if not any(same(value, p) for p in picked):
            picked.append(_as_declared(dim, value))
    return Categorical(tuple(picked), dim.when, dim.name)


def _as_declared(dim: Dimension, value: Any) -> Any:
    """``value`` as the dimension holds it (the declared choice; a float for a float range)."""
    if isinstance(dim, Categorical):
        return next(c for c in dim.choices if same(value, c))
    return float(value) if isinstance(dim, FloatRange) else value


def _narrow_to_band(dim: Dimension, table: dict[str, Any], where: str) -> Dimension:
    check_keys(table, ["low", "high"], f"[search] {where}")
    bounds = [table[k] for k in ("low", "high") if k in table]
    if not bounds or not all(_number(v) for v in bounds):
        raise ConfigError(f"[search] {where}: {table} needs numbers low and/or high; "
                          f"declared: {dim.describe()}")
    if isinstance(dim, Categorical):
        if not any(_number(c) for c in dim.choices):
            raise ConfigError(f"[search] {where}: the choices {dim.describe()} are not numbers; "
                              f"narrow them with a list, e.g. [{show(dim.choices[0])}]")
        low, high = table.get("low", -math.inf), table.get("high", math.inf)
        kept = tuple(c for c in dim.choices if _number(c) and low <= c <= high)
        if not kept:
            band = ", ".join(f"{key} = {show(value)}" for key, value in table.items())
            raise ConfigError(f"[search] {where}: {{{band}}} keeps none of the declared choices "
                              f"{dim.describe()}; widen it")
        return dataclasses.replace(dim, choices=kept)
    low, high = table.get("low", dim.low), table.get("high", dim.high)
    for value in (low, high):
        if not dim.contains(value):
            raise ConfigError(f"[search] {where}: {show(value)} is outside the declared "
                              f"{dim.kind} range {dim.describe()}; narrow inside it")
    if low > high:
        raise ConfigError(f"[search] {where}: low {show(low)} is above high {show(high)}")
    return dataclasses.replace(dim, low=_as_declared(dim, low), high=_as_declared(dim, high))
