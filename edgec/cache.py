"""A content-keyed cache on disk for pass outputs, evaluations and measurements.

Olive's engine keys a pass's output by (input model id, pass, config, accelerator) and looks it
up before running the pass; tinygrad keeps its search cache on disk keyed by content. Here a key
is the SHA-256 of a JSON document of everything the value depends on (see :func:`digest`); the
caller builds that document, so what is keyed is visible where the value is made.

Layout: ``<root>/<kind>/<key[:2]>/<key>/`` holding ``entry.json`` (the value's metadata and the
SHA-256 of every file beside it) and the files. An entry is written into a temporary directory
and renamed into place, so a reader sees a whole entry or none; an entry that fails to parse or
whose files do not match their digests is a miss (and is removed), never a crash.

The root is ``$EDGEC_CACHE``, else ``$XDG_CACHE_HOME/edgec``, else ``~/.cache/edgec``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from edgec.artifact import sha256_file
from edgec.errors import ConfigError

ENV = "EDGEC_CACHE"
KINDS = ("steps", "evaluations", "measurements")
FORMAT = 1
VERSIONED = ("edgec", "torch", "onnx", "onnxruntime", "torch-pruning", "numpy")


def cache_root() -> Path:
    """``$EDGEC_CACHE``, else the user cache directory's ``edgec``."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgec"


def digest(document: Any) -> str:
    """SHA-256 of a JSON document (keys sorted; tuples as lists; other objects by ``str``)."""
    blob = json.dumps(document, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


_ARRAY_DIGESTS: dict[int, tuple[np.ndarray, str]] = {}


def array_digest(array: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes (memoised per array object)."""
    known = _ARRAY_DIGESTS.get(id(array))
    if known is not None and known[0] is array:
        return known[1]
    h = hashlib.sha256(f"{array.dtype}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).data)
    if len(_ARRAY_DIGESTS) > 16:
        _ARRAY_DIGESTS.clear()
    _ARRAY_DIGESTS[id(array)] = (array, h.hexdigest())
    return h.hexdigest()


def dataset_identity(dataset) -> str | None:
    """A dataset's content (images, labels, augmentation); None for no data."""
    if dataset is None:
        return None
    return digest([array_digest(dataset.images), array_digest(dataset.labels), dataset.augment])


def module_identity(module) -> str:
    """A torch module's structure (its class name and repr; not the class's module, which a
    factory file loads under a fresh name each time) and every tensor of its state."""
    h = hashlib.sha256(f"{type(module).__qualname__}\n{module!r}".encode())
    for name, tensor in module.state_dict().items():
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def library_versions() -> dict[str, str | None]:
    """The versions of the libraries whose output a cached value depends on."""
    found = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


@dataclass(frozen=True)
class Entry:
    """A cache hit: its metadata and the directory holding its files."""

    meta: dict[str, Any]
    directory: Path

    def file(self, name: str) -> Path:
        return self.directory / name


class Cache:
    """Entries of ``KINDS`` under ``root``; ``enabled=False`` makes every lookup a miss and
    every store a no-op (``--no-cache``)."""

    def __init__(self, root: Path | None = None, enabled: bool = True):
        self.root = Path(root) if root is not None else cache_root()
        self.enabled = enabled

    def _path(self, kind: str, key: str) -> Path:
        if kind not in KINDS:
            raise ConfigError(f"unknown cache kind {kind!r}; known: {', '.join(KINDS)}")
        return self.root / kind / key[:2] / key

    def load(self, kind: str, key: str) -> Entry | None:
        """The entry, or None when missing or damaged (a damaged one is removed)."""
        if not self.enabled:
            return None
        path = self._path(kind, key)
        try:
            meta = json.loads((path / "entry.json").read_text())
            files = meta.pop("_files")
            if meta.pop("_format") != FORMAT or meta.pop("_key") != key:
                raise ValueError("format or key mismatch")
            for name, sha in files.items():
                if sha256_file(path / name) != sha:
                    raise ValueError(f"{name} does not match its digest")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            shutil.rmtree(path, ignore_errors=True)
            return None
        return Entry(meta, path)

    def store(self, kind: str, key: str, meta: dict[str, Any],
              files: dict[str, Path] | None = None) -> None:
        """Write an entry atomically: ``files`` (name → source path) are copied beside
        ``entry.json``; an entry that appeared meanwhile (another process) is kept."""
        if not self.enabled:
            return
        final = self._path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}.", dir=final.parent))
        try:
            digests = {}
            for name, source in (files or {}).items():
                shutil.copyfile(source, tmp / name)
                digests[name] = sha256_file(tmp / name)
            record = {**meta, "_files": digests, "_format": FORMAT, "_key": key}
            (tmp / "entry.json").write_text(json.dumps(record, sort_keys=True, default=str))
            if not final.exists():
                os.replace(tmp, final)
        except OSError:
            pass  # a full disk or a lost race costs a future miss, not the build
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def load_json(self, kind: str, key: str) -> dict[str, Any] | None:
        entry = self.load(kind, key)
        return entry.meta.get("value") if entry else None

    def store_json(self, kind: str, key: str, value: dict[str, Any]) -> None:
        self.store(kind, key, {"value": value})

    def remember(self, kind: str, document: Any, compute):
        """The JSON value keyed by ``digest(document)``: from the cache, else ``compute()``d
        and stored."""
        key = digest(document)
        value = self.load_json(kind, key)
        if value is None:
            value = compute()
            self.store_json(kind, key, value)
        return value

    def info(self) -> dict[str, dict[str, int]]:
        """Per kind: entries and bytes on disk."""
        summary = {}
        for kind in KINDS:
            entries = [p for p in (self.root / kind).glob("??/*") if not p.name.startswith(".")]
            size = sum(f.stat().st_size for p in entries for f in p.iterdir() if f.is_file())
            summary[kind] = {"entries": len(entries), "bytes": size}
        return summary

    def clear(self, kinds: tuple[str, ...] = KINDS) -> int:
        """Remove every entry of ``kinds``; returns how many there were."""
        removed = 0
        for kind in kinds:
            self._path(kind, "00")  # validates the kind
            folder = self.root / kind
            removed += sum(1 for p in folder.glob("??/*") if not p.name.startswith("."))
            shutil.rmtree(folder, ignore_errors=True)
        return removed
