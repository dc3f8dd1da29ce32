"""ProfileDB (append-only JSONL per device and day) and the board-condition warnings."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime

import pytest

from edgec.errors import ConfigError, MeasureError
from edgec.measure import Measurement, MeasureSpec, condition_warnings
from edgec.profiles import ProfileDB, config_hash

MANIFEST = {"name": "digits-cnn", "hash": "ab" * 32, "target": {"name": "local"},
            "recipe": [{"pass": "fuse"}], "versions": {"edgec": "0.1.0", "onnxruntime": "1.31.1"}}


def measurement(samples=(1.0, 1.2, 0.9, 1.1)) -> Measurement:
    return Measurement(tuple(samples), 55.0, {"onnxruntime": "1.31.1"}, ("governor note",))


def test_record_appends_one_line_per_measurement_under_device_and_date(tmp_path):
    db = ProfileDB(tmp_path)
    spec = MeasureSpec(repeat=4, min_time_s=0.0)
    first = db.record("pi-1", MANIFEST, spec, measurement())
    second = db.record("pi-1", MANIFEST, spec, measurement((2.0, 2.1)))
    assert first == second == tmp_path / "pi-1" / f"{datetime.now(UTC).date().isoformat()}.jsonl"
    lines = first.read_text().splitlines()
    assert len(lines) == 2
    entry = json.loads(lines[0])
    assert entry["model_hash"] == MANIFEST["hash"] and entry["target"] == "local"
    assert entry["config_hash"] == config_hash(MANIFEST, spec)
    assert entry["runtime"] == {"onnxruntime": "1.31.1"}
    assert entry["build_versions"]["edgec"] == "0.1.0"
    assert entry["summary"]["p50_ms"] == pytest.approx(1.05)
    assert entry["summary"]["warnings"] == ["governor note"]
    assert [r["samples_ms"] for r in db.records("pi-1")] == [[1.0, 1.2, 0.9, 1.1], [2.0, 2.1]]
    assert db.latest("pi-1", MANIFEST, spec)["samples_ms"] == [2.0, 2.1]
    assert db.latest("pi-1", MANIFEST, MeasureSpec(repeat=5)) is None  # another protocol
    assert db.records(model_hash="cd" * 32) == []


def test_partial_or_invalid_measurements_are_never_recorded(tmp_path):
    db = ProfileDB(tmp_path)
    with pytest.raises(MeasureError):
        db.record("pi-1", MANIFEST, MeasureSpec(), measurement((1.0, float("nan"))))
    with pytest.raises(MeasureError):
        measurement(())
    with pytest.raises(ConfigError, match="not a safe folder name"):
        db.record("../escape", MANIFEST, MeasureSpec(), measurement())
    assert not list(tmp_path.rglob("*.jsonl"))


def test_concurrent_appends_stay_whole_lines(tmp_path):
    db = ProfileDB(tmp_path)
    big = measurement(tuple(float(i) for i in range(2000)))
    threads = [threading.Thread(target=db.record, args=("pi-1", MANIFEST, MeasureSpec(), big))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(db.records("pi-1")) == 8


def test_condition_warnings_cover_governor_heat_and_throttling():
    calm = {"governor": "performance", "temp_c": 45.0, "throttled": "0x0"}
    assert condition_warnings(calm, calm) == ()
    assert condition_warnings({}, {}) == ()  # a VM with no cpufreq or thermal zones
    [governor] = condition_warnings({**calm, "governor": "ondemand"}, calm)
    assert "'ondemand', not 'performance'" in governor and "scaling_governor" in governor
    [hot] = condition_warnings(calm, {**calm, "temp_c": 83.5})
    assert "83.5 °C" in hot and "throttled" in hot
    [warmed] = condition_warnings(calm, {**calm, "temp_c": 61.0})
    assert "warmed from 45.0 to 61.0" in warmed
    [capped] = condition_warnings(calm, {**calm, "throttled": "0x20002"})
    assert "get_throttled=0x20002" in capped
