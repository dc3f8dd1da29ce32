"""TOML files to frozen dataclasses, with unknown keys reported as "did you mean" errors."""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from edgec.errors import ConfigError

T = TypeVar("T")


SHARED_DATA = "$EDGEC_DATA_DIR"


def shared_data_dir() -> Path | None:
    """The folder of shared real data (``$EDGEC_DATA_DIR`` or ``../shared/data``), if present."""
    env = os.environ.get("EDGEC_DATA_DIR")
    candidates = [Path(env)] if env else []
    repo = Path(__file__).resolve().parent.parent
    candidates += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return next((p.resolve() for p in candidates if p.is_dir()), None)


def resolve_path(root: Path, text: str) -> Path:
    """A path from a config file: relative to ``root``, or, when it starts with
    ``$EDGEC_DATA_DIR/``, inside the shared data folder (``$EDGEC_DATA_DIR``, else
    ``../shared/data`` beside the project)."""
    if not text.startswith(SHARED_DATA + "/"):
        return (root / text).resolve()
    folder = shared_data_dir()
    if folder is None:
        raise ConfigError(f"{text!r} is in the shared data folder, but $EDGEC_DATA_DIR is not "
                          f"set and ../shared/data does not exist; export EDGEC_DATA_DIR=/path/to/"
                          f"the/folder")
    return folder / text[len(SHARED_DATA) + 1:]


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; a missing or malformed file is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; check the path")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: malformed TOML ({exc}); fix the syntax") from exc


def suggest(word: str, known: typing.Iterable[str], what: str = "known") -> str:
    """'did you mean 'x'?' for the closest of ``known``, else the list of them."""
    known = list(known)
    close = difflib.get_close_matches(word, known, n=1)
    return f"did you mean {close[0]!r}?" if close else f"{what}: {', '.join(known)}"


def check_keys(data: dict[str, Any], allowed: typing.Iterable[str], where: str) -> None:
    """Raise ConfigError for the first key of ``data`` not in ``allowed``, with a suggestion."""
    allowed = list(allowed)
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r}; {suggest(key, allowed, 'known keys')}")


def check_choice(name: str, value: str, allowed: typing.Iterable[str]) -> None:
    """Raise ValueError (a ConfigError once in :func:`from_dict`) unless ``value`` is allowed."""
    allowed = list(allowed)
    if value not in allowed:
        close = difflib.get_close_matches(value, allowed, n=1) if isinstance(value, str) else []
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"{name} {value!r} unknown; {hint}use one of {allowed}")


def from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Build the frozen dataclass ``cls`` from ``data``, checking keys and simple types.

    Missing fields without defaults, unknown keys and values of the wrong type are
    ConfigErrors that name ``where`` (file and table) and the key.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(data, fields, where)
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        if name not in data:
            no_default = field.default is dataclasses.MISSING
            if no_default and field.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing required key {name!r}")
            continue
        values[name] = _coerce(data[name], hints[name], f"{where}: key {name!r}")
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a valid {hint}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected nothing, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, where) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and not isinstance(value, hint) or (
        hint in (int, float) and isinstance(value, bool)
    ):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def parse_overrides(items: list[str]) -> dict:
    """``["prune.ratio=0.2", "quantize.mode=mixed"]`` → values read as TOML (bare words stay
    strings; ``none`` is None, e.g. ``prune.budget_points=none``)."""
    overrides = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {item!r}: write PASS.PARAM=VALUE, e.g. quantize.mode=mixed")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = None if text.strip() == "none" else text  # TOML has no null
        overrides[key.strip()] = value
    return overrides
