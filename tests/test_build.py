"""edgec build end to end: artifact layout, reproducible hash, runner reproduces accuracy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgec.build import BuildRequest, build
from edgec.errors import EdgecError
from edgec.measure import MeasureSpec

from .conftest import EXAMPLES, ROOT

FAST = MeasureSpec(warmup=2, repeat=5, min_time_s=0.05)
DIGITS = EXAMPLES / "digits" / "model.toml"


@pytest.fixture(scope="module")
def digits_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    return build(BuildRequest(DIGITS, "local", ROOT / "passes" / "int8.toml", out=out, measure=FAST))


def test_artifact_layout(digits_build):
    directory = digits_build.directory
    assert directory.parent.name == "local" and directory.name.startswith("digits-cnn-")
    assert {p.name for p in directory.iterdir()} == {
        "manifest.json", "model.onnx", "runner.py", "report.md", "report.html", "layers.png",
        "profile.json"}
    manifest = json.loads((directory / "manifest.json").read_text())
    assert [s["pass"] for s in manifest["lineage"]] == ["fuse", "export", "quantize"]
    assert set(manifest["files"]) == {"model.onnx", "runner.py"}
    assert manifest["accuracy"]["total"] == 500 and manifest["accuracy"]["top1"] > 0.9
    report = (directory / "report.md").read_text()
    scheme = manifest["int8"]["scheme"]
    assert f"| built (int8, {scheme}) | " in report and scheme in ("u8s8", "u8s8-reduce-range")
    assert manifest["int8"]["int8_path"] == manifest["cpu"]["runs_on"]["int8_path"] \
        == manifest["accuracy"]["measured_on"]["cpu"]["int8_path"]
    assert f"measured on host: {manifest['cpu']['build_host']['model']}" in report


def test_report_html_is_self_contained(digits_build):
    from html.parser import HTMLParser

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.cells, self.images = [], [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            if tag == "img":
                self.images.append(dict(attrs)["src"])

        def handle_data(self, data):
            self.cells.append(data.strip())

    page = Collect()
    page.feed((digits_build.directory / "report.html").read_text())
    assert page.images and page.images[0].startswith("data:image/png;base64,iVBOR")
    assert {"fuse", "export", "quantize", "conv1", "conv2", "fc"} <= set(page.cells)
    assert page.tags.count("table") == 3  # results, per layer, lineage
    assert (digits_build.directory / "layers.png").read_bytes()[:4] == b"\x89PNG"


def test_artifact_directory_follows_the_umask(digits_build):
    from edgec.artifact import current_umask

    mode = digits_build.directory.stat().st_mode & 0o777
    assert mode == 0o777 & ~current_umask()
    profile = json.loads((digits_build.directory / "profile.json").read_text())
    assert "samples_ms" not in profile and profile["p50_ms"] > 0 and profile["n"] >= 1


def test_same_inputs_same_hash(digits_build, tmp_path):
    again = build(BuildRequest(DIGITS, "local", ROOT / "passes" / "int8.toml", out=tmp_path,
                               profile=False))
    assert again.manifest["hash"] == digits_build.manifest["hash"]
    assert again.manifest["files"] == digits_build.manifest["files"]


def test_fp32_and_int8_rows(digits_build):
    fp32, built = digits_build.rows
    assert fp32.name == "fp32" and built.name.startswith("built (int8, u8s8")
    assert built.size_bytes < fp32.size_bytes
    assert abs(fp32.top1 - built.top1) < 0.02
    assert built.latency.p50 > 0 and built.latency.p90 >= built.latency.p50


def test_failed_build_leaves_no_directory(tmp_path):
    import numpy as np

    wrong = tmp_path / "wrong.npz"  # 4x4 images for an 8x8 model: quantize's calibration fails
    np.savez(wrong, images=np.zeros((16, 4, 4, 1), np.uint8), labels=np.zeros(16, np.int64))
    data = tmp_path / "data.toml"
    data.write_text(f'[calibration]\npath = "{wrong}"\n'
                    f'[evaluation]\ngenerator = "{EXAMPLES}/digits/digits.py:test"\n')
    out = tmp_path / "out"
    request = BuildRequest(DIGITS, "local", ROOT / "passes" / "int8.toml", data, out,
                           profile=False)
    with pytest.raises(EdgecError, match=r"\(4, 4, 1\).*passes already run: \['fuse', 'export'\]"):
        build(request)
    assert not out.exists() or not any(out.rglob("*"))


@pytest.mark.slow
def test_resnet20_int8_runner_reproduces_build_accuracy(tmp_path, resnet20_config):
    from .conftest import shared_file

    result = build(BuildRequest(EXAMPLES / "resnet20_cifar10" / "model.toml", "local",
                                ROOT / "passes" / "int8.toml", out=tmp_path, profile=False))
    fp32, built = result.rows
    assert round(fp32.top1 * 100, 2) == 91.73
    assert abs(built.top1 - fp32.top1) <= 0.005
    runner = subprocess.run([sys.executable, str(result.directory / "runner.py"), "eval",
                             "--data", str(shared_file("cifar10_test.npz"))],
                            capture_output=True, text=True, check=True)
    standalone = json.loads(runner.stdout)
    assert standalone["correct"] == result.manifest["accuracy"]["correct"]
    assert standalone["predictions_sha256"] == result.manifest["accuracy"]["predictions_sha256"]


def test_cli_build_digits(tmp_path):
    done = subprocess.run([sys.executable, "-m", "edgec.cli", "build", str(DIGITS), "--out",
                           str(tmp_path), "--repeat", "5", "--min-time", "0.05"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "built" in done.stdout and "artifact:" in done.stdout
    assert "int8 scheme `u8s8" in done.stdout and "measured on host:" in done.stdout
    assert list(Path(tmp_path, "local").glob("digits-cnn-*/manifest.json"))
