"""`edgec ci report`: dist/index.html from a real index.json, self-contained, escaped, charted."""

from __future__ import annotations

import copy
import re

import pytest

from edgec.ci.index import write_index
from edgec.ci.report import write_report
from edgec.errors import ConfigError

VERSIONS = {"edgec": "0.1.0", "onnxruntime": "1.23.0"}
INDEX = {
    "format": 1, "model": "digits", "model_file": "examples/digits/model.toml", "recipe": None,
    "from_study": None, "budget": 1.0, "commit": "",
    "entries": [
        {"target": "local", "device": "local", "artifact": "digits-local-0123456789ab",
         "hash": "0123456789abcdef", "recipe": "int8", "backend": "onnxruntime", "status": "ok",
         "error": "", "accuracy": {"top1": 0.9712, "on": "local", "images": 360},
         "latency": {"p50_ms": 0.021, "mean_ms": 0.022, "ci95_ms": 0.001, "n": 500,
                     "source": "measured", "on": "local"},
         "peak_rss_mb": 61.2, "size_bytes": 12345, "versions": VERSIONS,
         "budget": {"points": 1.0, "spent": 0.2}},
        {"target": "rpi4", "device": None, "artifact": "digits-rpi4-abcdef012345",
         "hash": "abcdef012345ffff", "recipe": "int8", "backend": "onnxruntime", "status": "ok",
         "error": "", "accuracy": {"top1": 0.9705, "on": "local", "images": 360},
         "latency": {"p50_ms": 1.9, "mean_ms": 2.05, "ci95_ms": 0.3, "n": 0,
                     "source": "predicted", "on": "rpi4"},
         "peak_rss_mb": None, "size_bytes": 12345, "versions": {"edgec": "0.1.0"},
         "budget": {"points": 1.0, "spent": 0.2}},
        {"target": "android-arm64", "device": None, "artifact": "digits-android-arm64-0a0b0c0d0e0f",
         "hash": "0a0b0c0d0e0f1111", "recipe": "int8", "backend": "ort-mobile", "status": "ok",
         "error": "", "accuracy": {"top1": 0.9712, "on": "local", "images": 360}, "latency": None,
         "peak_rss_mb": None, "size_bytes": 11000, "versions": {"edgec": "0.1.0"}, "budget": None},
        {"target": "pynq-z2", "device": None, "artifact": "", "hash": "", "recipe": "fpga",
         "backend": "hls4ml", "status": "failed", "error": "CompileError: <b>no</b> g++ & no vivado",
         "accuracy": None, "latency": None, "peak_rss_mb": None, "size_bytes": 0, "versions": {},
         "budget": None},
    ],
}


def _row(page: str, target: str) -> str:
    """The table row whose first cell is ``target``."""
    match = re.search(rf"<tr><td>{re.escape(target)}</td>.*?</tr>", page)
    assert match, f"no row for {target}"
    return match.group(0)


def test_report_table_chart_and_escaping(tmp_path):
    write_index(tmp_path, copy.deepcopy(INDEX))
    path = write_report(tmp_path)
    assert path == tmp_path / "index.html"
    page = path.read_text()
    assert "<title>digits" in page
    for entry in INDEX["entries"]:
        assert entry["target"] in _row(page, entry["target"])
    failed = _row(page, "pynq-z2")
    assert "failed: CompileError: &lt;b&gt;no&lt;/b&gt; g++ &amp; no vivado" in failed
    assert "<b>no</b>" not in page
    assert "(predicted)" in _row(page, "rpi4") and "(predicted)" not in _row(page, "local")
    assert "97.12 %" in _row(page, "local") and "0123456789ab" in _row(page, "local")
    assert "onnxruntime 1.23.0" in _row(page, "local")
    assert re.search(r"src='data:image/png;base64,[A-Za-z0-9+/=]{1000,}'", page)
    assert "2 of 4 entries left off the chart" in page
    assert "http://" not in page and "https://" not in page
    assert not list(tmp_path.glob(".index-*"))  # the temporary file was renamed


def test_report_without_chartable_entry_still_writes_a_page(tmp_path):
    index = copy.deepcopy(INDEX)
    index["entries"] = index["entries"][2:]  # no latency on either
    write_index(tmp_path, index)
    page = write_report(tmp_path / "index.json").read_text()
    assert "no chart: none of the 2 entries" in page
    assert "data:image/png" not in page
    assert "android-arm64" in page and "pynq-z2" in page


def test_missing_index_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no CI index"):
        write_report(tmp_path)
    assert not (tmp_path / "index.html").exists()
