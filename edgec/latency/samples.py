"""Training samples from the profile database: records of ``profiles/<device>/*.jsonl`` that
carry the configuration's ``features``, grouped by the key they were measured under."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgec.errors import DataError
from edgec.latency.features import FEATURES_FORMAT, check_features
from edgec.latency.model import LatencyKey, LatencySample, runtime_label


def record_key(record: dict[str, Any], device: str) -> LatencyKey:
    """The key a profile record was measured under: device, the features' backend, the
    runtime versions on the board, the protocol's threads and the governor (if recorded)."""
    summary = record.get("summary", {})
    governor = record.get("governor") or summary.get("governor") or "unknown"
    return LatencyKey(device, str(record["features"]["backend"]),
                      runtime_label(record.get("runtime") or summary.get("runtime") or {}),
                      int(record.get("protocol", {}).get("threads", 1)), str(governor))


def record_sample(record: dict[str, Any], origin: str) -> LatencySample:
    """A sample from one record: its features and its latency (ms): the summary's
    ``level_ms`` when it was measured in a set (:mod:`edgec.measure_set`: the drift of the
    machine taken out), else its ``mean_ms``."""
    check_features(record["features"], origin)
    summary = record.get("summary", {})
    field = "level_ms" if "level_ms" in summary else "mean_ms"
    latency = summary.get(field)
    if not isinstance(latency, int | float) or not latency > 0:
        raise DataError(f"{origin}: the record has no positive summary {field} ({latency!r}); "
                        f"remove the line or measure the configuration again")
    return LatencySample(record["features"], float(latency), origin)


def samples_from_profiles(root: str | Path, device: str, stale: list[str] | None = None
                          ) -> dict[LatencyKey, list[LatencySample]]:
    """Samples of every record of ``device`` under ``root`` that carries ``features``, oldest
    file first, by key. Records without features (measured before they were recorded) are
    skipped, and so are those of an older features format (their origins appended to
    ``stale``: ``edgec latency sample`` measures them again); a damaged line is a DataError
    naming the file and line."""
    grouped: dict[LatencyKey, list[LatencySample]] = {}
    for path in sorted((Path(root) / device).glob("*.jsonl")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            origin = f"{path}:{number}"
            record = _parse(line, origin)
            if record is None or "features" not in record:
                continue
            if _older(record["features"]):
                (stale if stale is not None else []).append(origin)
                continue
            sample = record_sample(record, origin)
            grouped.setdefault(record_key(record, device), []).append(sample)
    return grouped


def _older(features: Any) -> bool:
    found = features.get("format") if isinstance(features, dict) else None
    return isinstance(found, int) and 1 <= found < FEATURES_FORMAT


def _parse(line: str, origin: str) -> dict[str, Any] | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{origin} is not a JSON record ({exc}); remove the line") from None
    if not isinstance(record, dict):
        raise DataError(f"{origin} is not a JSON object; remove the line")
    return record
