"""``dist/index.json``: one entry per (target, device) of a CI build, read back by ``edgec ci
diff`` and ``edgec ci report``.

An entry::

    {"target": "rpi4", "device": "pi-lab-1" | null, "artifact": "digits-rpi4-0123456789ab",
     "hash": "<sha256 of the deployable files and their identity>", "recipe": "int8",
     "backend": "onnxruntime", "status": "ok" | "failed" | "over budget", "error": "",
     "note": "board pi-lab-1 not reached: evaluated here, not measured" | "",
     "accuracy": {"top1": 0.9712, "on": "local" | "<device>", "images": 360} | null,
     "latency": {"p50_ms", "mean_ms", "ci95_ms", "n", "source": "measured" | "predicted",
                 "on": "local" | "<device>"} | null,
     "peak_rss_mb": 61.2 | null, "size_bytes": 12345,
     "versions": {"edgec": ..., "onnxruntime": ..., ...}, "budget": {"points", "spent"} | null}

``device`` is null for a target no attached board serves (its latency is then null, or
predicted by a latency model and marked so). Measured values vary from run to run; everything
else is a function of the inputs (the reproducibility test compares ``hash`` and the files).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgec.artifact import atomic_write_text
from edgec.errors import ConfigError

INDEX_FORMAT = 1
INDEX_NAME = "index.json"
STATUSES = ("ok", "failed", "over budget")
ENTRY_KEYS = ("target", "device", "artifact", "hash", "status", "accuracy", "latency",
              "size_bytes", "versions")


def index_path(where: Path) -> Path:
    """``where`` itself when it is a file, else ``where/index.json``."""
    where = Path(where)
    return where / INDEX_NAME if where.is_dir() else where


def load_index(where: Path) -> dict[str, Any]:
    """The index at ``where`` (a dist folder or its index.json), checked; a ConfigError that
    names the file otherwise."""
    path = index_path(where)
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"no CI index at {path}; run `edgec ci build MODEL --out "
                          f"{path.parent}` first") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not JSON ({exc}); rebuild it with `edgec ci build`") from exc
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ConfigError(f"{path} is not an edgec CI index of format {INDEX_FORMAT}; rebuild "
                          f"it with this edgec's `edgec ci build`")
    for number, entry in enumerate(index.get("entries", [])):
        missing = [key for key in ENTRY_KEYS if key not in entry]
        if missing or entry["status"] not in STATUSES:
            raise ConfigError(f"{path}: entry {number} lacks {missing or 'a known status'}; "
                              f"rebuild the index with `edgec ci build`")
    return index


def entry_key(entry: dict[str, Any]) -> tuple[str, str]:
    """(target, device or ''): what an entry is compared by across two indexes."""
    return entry["target"], entry.get("device") or ""


def write_index(where: Path, index: dict[str, Any]) -> Path:
    """Write the index to ``where`` (a .json file, or a folder's index.json) atomically (a
    temporary name, then a rename)."""
    final = Path(where) if Path(where).suffix == ".json" else Path(where) / INDEX_NAME
    return atomic_write_text(final, json.dumps(index, indent=2, sort_keys=True) + "\n")


def merge_indexes(paths: list[Path]) -> dict[str, Any]:
    """One index from the per-target indexes of a CI matrix (one model; a (target, device)
    listed twice is a ConfigError naming both files)."""
    if not paths:
        raise ConfigError("edgec ci merge needs at least one index.json")
    merged, seen = None, {}
    for path in paths:
        index = load_index(path)
        if merged is None:
            merged = {**index, "entries": []}
        elif index["model"] != merged["model"]:
            raise ConfigError(f"{path} indexes model {index['model']!r}, not "
                              f"{merged['model']!r}; merge one model's indexes at a time")
        for entry in index["entries"]:
            key = entry_key(entry)
            if key in seen:
                raise ConfigError(f"{path} and {seen[key]} both hold {key[0]}"
                                  f"{' on ' + key[1] if key[1] else ''}; drop one")
            seen[key] = path
            merged["entries"].append(entry)
    merged["entries"].sort(key=entry_key)
    return merged
