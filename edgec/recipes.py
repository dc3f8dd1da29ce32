"""Recipes: ordered ``[[step]]`` tables (``pass`` plus its params) → a Pipeline; the built-in
ones (passes/*.toml, shipped as package data) by bare name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgec.budget import BudgetSpec
from edgec.config import check_keys, from_dict, load_toml, suggest
from edgec.errors import ConfigError
from edgec.passes import PASSES
from edgec.pipeline import Pipeline, Step
from edgec.resources import builtin_dir


def recipe_paths() -> dict[str, Path]:
    """The built-in recipes by name (passes/*.toml, shipped as package data)."""
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
    registry = registry or PASSES
    path = resolve_recipe(path)
    raw = load_toml(path)
    check_keys(raw, ["name", "description", "step", "search", "budget"], str(path))
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
    budget = recipe_budget(raw, path)
    names = [step.pass_.name for step in steps]
    for name in budget.reserve if budget else ():
        if name not in names:
            raise ConfigError(f"{path} [budget] reserve names {name!r}, which the recipe does "
                              f"not run; {suggest(name, names, 'its passes')}")
    return Pipeline(steps, name=raw.get("name", path.stem), budget=budget)


def recipe_budget(raw: dict[str, Any], path: Path) -> BudgetSpec | None:
    """A recipe's ``budget = POINTS`` or ``[budget]`` table (points, view, holdout, reserve)."""
    value = raw.get("budget")
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return BudgetSpec(float(value))
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: budget must be a number of top-1 points or a [budget] "
                          f"table, got {value!r}")
    return from_dict(BudgetSpec, value, f"{path} [budget]")


def recipe_search(path: str | Path) -> dict[str, Any]:
    """A recipe's ``[search]`` table, flat: ``{"pass.param": [values] | {low = …, high = …}}``.

    Keys may be quoted (``"prune.ratio" = [0.1, 0.2]``) or dotted (``prune.ratio = …``, which TOML
    reads as one table per pass); :func:`edgec.space.pipeline_space` checks the names and
    the ranges against what the passes declare.
    """
    path = resolve_recipe(path)
    table = load_toml(path).get("search", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: search must be a [search] table of \"pass.param\" = [values] "
                          f"or {{low = …, high = …}}, got {table!r}")
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if "." not in key and isinstance(value, dict):
            flat.update({f"{key}.{param}": spec for param, spec in value.items()})
        else:
            flat[key] = value
    return flat
