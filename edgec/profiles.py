"""ProfileDB: every good measurement, appended to ``profiles/<device>/<date>.jsonl``.

One JSON object per line, keyed by model hash (the artifact's manifest hash), config hash (recipe,
target and measurement protocol), target and device, with the runtime versions on the board.
Only complete measurements are recorded: a failed or partial run raises before it gets here.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgec.devices.inventory import NAME_RE
from edgec.errors import ConfigError, MeasureError
from edgec.measure import Measurement, MeasureSpec


def config_hash(manifest: dict[str, Any], spec: MeasureSpec) -> str:
    """What was measured and how, apart from the model itself: recipe, target, protocol."""
    protocol = {k: v for k, v in asdict(spec).items() if k != "data"}
    blob = json.dumps({"recipe": manifest.get("recipe"), "target": manifest["target"]["name"],
                       "protocol": protocol, "data": bool(spec.data)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ProfileDB:
    """Append-only JSONL store of measurements under ``root`` (default ``profiles/``)."""

    def __init__(self, root: str | Path = "profiles"):
        self.root = Path(root)

    def record(self, device: str, manifest: dict[str, Any], spec: MeasureSpec,
               measurement: Measurement, features: dict[str, Any] | None = None,
               tags: dict[str, Any] | None = None) -> Path:
        """Append one measurement; returns the file it went to. ``features``: the artifact's
        (:func:`edgec.latency.features.artifact_features`), what the latency model learns from;
        ``tags``: more fields of the record (e.g. ``sample``: the configuration it measured)."""
        if not NAME_RE.match(device):
            raise ConfigError(f"device name {device!r} is not a safe folder name")
        samples = measurement.samples_ms
        if not samples or not all(math.isfinite(s) and s >= 0 for s in samples):
            raise MeasureError(f"refusing to record a partial or invalid measurement on {device} "
                               f"({len(samples)} samples); measure again")
        now = datetime.now(UTC)
        entry = {
            "time": now.isoformat(timespec="seconds"), "device": device,
            "target": manifest["target"]["name"], "model": manifest["name"],
            "model_hash": manifest["hash"], "config_hash": config_hash(manifest, spec),
            "runtime": measurement.runtime, "build_versions": manifest.get("versions", {}),
            "protocol": asdict(spec), "summary": measurement.summary(),
            "samples_ms": list(samples),
            **({"features": features} if features is not None else {}), **(tags or {}),
        }
        path = self.root / device / f"{now.date().isoformat()}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line)  # one write of one line: readers never see half a record
        finally:
            os.close(fd)
        return path

    def records(self, device: str | None = None, model_hash: str | None = None) -> list[dict]:
        """Every stored record, oldest file first, optionally filtered."""
        pattern = f"{device}/*.jsonl" if device else "*/*.jsonl"
        found = []
        for path in sorted(self.root.glob(pattern)):
            for line in path.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    if model_hash is None or entry["model_hash"] == model_hash:
                        found.append(entry)
        return found

    def latest(self, device: str, manifest: dict[str, Any], spec: MeasureSpec) -> dict | None:
        """The newest record of this model, configuration and device (to avoid re-measuring)."""
        key = config_hash(manifest, spec)
        hits = [r for r in self.records(device, manifest["hash"]) if r["config_hash"] == key]
        return hits[-1] if hits else None
