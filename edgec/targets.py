"""Targets: what the compiled code must run on, read from targets/*.toml."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgec.config import check_keys, from_dict, load_toml
from edgec.errors import ConfigError
from edgec.resources import builtin_dir

PRECISIONS = ("fp32", "fp16", "int8", "int4")
MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def version_satisfies(version: str, spec: str) -> bool:
    """Whether ``version`` (``3.11.2``) meets the PEP 440 ``spec`` (``>=3.9,<3.13``)."""
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(spec).contains(version, prereleases=True)


def _is_specifier(text: str) -> bool:
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    try:
        SpecifierSet(text)
    except InvalidSpecifier:
        return False
    return True


@dataclass(frozen=True)
class Requirements:
    """What a board needs to run this target's artifacts, checked by `edgec devices check`."""

    python: str = ""  # version specifier of the board's Python (">=3.9"); empty: no Python runner
    modules: tuple[str, ...] = ()  # importable by that Python; "onnxruntime|tvm": either one
    commands: tuple[str, ...] = ()  # executables that must exist (absolute path or on PATH)

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Requirements:
        """From the ``runtime_requires`` table; ValueError names the bad entry."""
        unknown = sorted(set(raw) - {"python", "modules", "commands"})
        if unknown:
            raise ValueError(f"key 'runtime_requires': unknown entries {unknown}; use python, "
                             f"modules, commands")
        python = raw.get("python", "")
        if not isinstance(python, str) or python and not _is_specifier(python):
            raise ValueError(f"key 'runtime_requires': python {python!r} is not a version "
                             f"specifier like '>=3.9' or '>=3.9,<3.13'")
        lists = {key: raw.get(key, []) for key in ("modules", "commands")}
        for key, items in lists.items():
            if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
                raise ValueError(f"key 'runtime_requires': {key} must be a list of names, got "
                                 f"{items!r}")
        bad = [m for m in lists["modules"] for alt in m.split("|") if not MODULE_RE.fullmatch(alt)]
        if bad:
            raise ValueError(f"key 'runtime_requires': modules {bad} are not module names "
                             f"(alternatives are separated by '|')")
        return cls(python, tuple(lists["modules"]), tuple(lists["commands"]))


@dataclass(frozen=True)
class Target:
    """A deployment target: ISA, CPU, SIMD, memory, precisions, peak rates and backends."""

    name: str
    description: str
    isa: str
    triple: str
    cpu: str  # "native": this host, probed at build time
    simd_width_bits: int
    channel_multiple: int
    cores: int
    memory_mb: int
    precisions: tuple[str, ...]
    peak_gmacs: dict[str, float]
    backends: tuple[str, ...]
    # {python = ">=3.9", modules = ["numpy", "onnxruntime|tvm"], commands = [...]}: see Requirements
    runtime_requires: dict[str, Any] = field(default_factory=dict)
    # /proc/cpuinfo flags that pick the int8 kernels (edgec.cpu); ignored for cpu = "native"
    cpu_features: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()  # other names: what people say, TVM's target tags
    tvm_target: dict[str, Any] = field(default_factory=dict)
    cross_compiler: str = ""  # C++ compiler that links TVM's shared objects for this ISA
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad:
            raise ValueError(f"key 'precisions': {bad} unknown; use {PRECISIONS}")
        if self.channel_multiple < 1:
            raise ValueError(f"key 'channel_multiple': {self.channel_multiple} must be >= 1")
        if not self.backends:
            raise ValueError("key 'backends': list at least one backend")
        for key in ("cores", "memory_mb", "simd_width_bits"):
            if getattr(self, key) < 1:
                raise ValueError(f"key {key!r}: {getattr(self, key)} must be >= 1")
        unrated = [p for p in self.precisions if p not in self.peak_gmacs]
        extra = [p for p in self.peak_gmacs if p not in self.precisions]
        if unrated or extra:
            raise ValueError(f"key 'peak_gmacs': give one rate per precision {self.precisions} "
                             f"(missing {unrated}, not in precisions {extra})")
        if any(not isinstance(v, int | float) or v <= 0 for v in self.peak_gmacs.values()):
            raise ValueError(f"key 'peak_gmacs': rates must be positive numbers, got "
                             f"{self.peak_gmacs}")
        if self.tvm_target and "kind" not in self.tvm_target:
            raise ValueError("key 'tvm_target': needs a 'kind' (e.g. llvm, cuda)")
        Requirements.parse(self.runtime_requires)

    @property
    def requirements(self) -> Requirements:
        """``runtime_requires`` as data: the board's Python version, modules and commands."""
        return Requirements.parse(self.runtime_requires)

    @property
    def runs_on_host(self) -> bool:
        """Whether code compiled for this target executes on the machine edgec runs on."""
        import platform

        return self.isa == platform.machine()

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def target_paths() -> dict[str, Path]:
    return {p.stem: p for p in sorted(builtin_dir("targets").glob("*.toml"))}


def target_aliases() -> dict[str, str]:
    """Every other name of a built-in target (``aliases`` in its TOML: the names people say,
    TVM's tags) → the target's name."""
    found: dict[str, str] = {}
    for name, path in target_paths().items():
        for alias in load_toml(path).get("aliases", []):
            if found.setdefault(alias, name) != name or alias in target_paths():
                raise ConfigError(f"{path}: alias {alias!r} already names target "
                                  f"{found[alias] if found[alias] != name else alias!r}; "
                                  f"aliases must be unique")
    return found


def load_target(name_or_path: str) -> Target:
    """A target by built-in name, alias (``jetson``, ``raspberry-pi/4b-aarch64``) or TOML path;
    an unknown name gets the closest known one."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        known, aliases = target_paths(), target_aliases()
        name = aliases.get(name_or_path, name_or_path)
        if name not in known:
            close = (difflib.get_close_matches(name_or_path, known, n=1)
                     or difflib.get_close_matches(name_or_path, aliases, n=1))
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"unknown target {name_or_path!r}; {hint}known targets: "
                              f"{', '.join(known)} (see `edgec targets`)")
        path = known[name]
    raw = _with_parent(path, load_toml(path))
    return from_dict(Target, {"name": path.stem, **raw}, str(path))


def _with_parent(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """Merge one level of ``extends = "other"`` (tables merged shallowly)."""
    parent_name = raw.pop("extends", None)
    if parent_name is None:
        return raw
    parent_path = path.with_name(f"{parent_name}.toml")
    if not parent_path.is_file():
        raise ConfigError(f"{path}: key 'extends' names {parent_name!r}, which does not exist")
    parent = load_toml(parent_path)
    if "extends" in parent:
        raise ConfigError(f"{path}: extends {parent_name!r}, which extends again; one level only")
    check_keys(raw, [*Target.__dataclass_fields__, "extends"], str(path))
    merged = {**parent}
    for key, value in raw.items():
        both_tables = isinstance(value, dict) and isinstance(parent.get(key), dict)
        merged[key] = {**parent[key], **value} if both_tables else value
    return merged
