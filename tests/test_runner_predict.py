"""``runner.py predict``: images in, labels and probabilities out, the same labels as ``eval``."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from edgec.runner import runner
from tests.conftest import shared_file


def write_png(path: Path, image: np.ndarray) -> None:
    """An 8-bit PNG of ``image`` (H x W x C); row y uses filter y % 5, so every filter is read."""
    height, width, channels = image.shape
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows, previous = [], np.zeros(width * channels, np.int32)
    for y in range(height):
        line = image[y].reshape(-1).astype(np.int32)
        kind = y % 5
        left = np.concatenate([np.zeros(channels, np.int32), line[:-channels]])
        corner = np.concatenate([np.zeros(channels, np.int32), previous[:-channels]])
        if kind == 4:
            p = left + previous - corner
            choices = np.stack([left, previous, corner])
            distances = np.abs(np.stack([p - left, p - previous, p - corner]))
            guess = choices[np.argmin(distances, axis=0), np.arange(len(line))]
        else:
            guess = [0, left, previous, (left + previous) // 2][kind]
        rows.append(bytes([kind]) + ((line - guess) & 0xFF).astype(np.uint8).tobytes())
        previous = line

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_reader_undoes_every_filter(channels, tmp_path):
    image = np.random.default_rng(channels).integers(0, 256, (11, 7, channels), dtype=np.uint8)
    write_png(tmp_path / "x.png", image)
    assert np.array_equal(runner.read_png(tmp_path / "x.png"), image)


def _runner(artifact: Path, *args: str) -> dict:
    done = subprocess.run([sys.executable, str(artifact / "runner.py"), *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _labels_sha(labels) -> str:
    return hashlib.sha256(np.asarray(labels, np.int64).tobytes()).hexdigest()


def test_predict_on_pngs_matches_eval(resnet20_int8_artifact, cifar_test, tmp_path):
    shared_file("cifar10_test.npz")
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(20):
        write_png(folder / f"{i:03d}.png", cifar_test.images[i])
    np.savez(tmp_path / "eval.npz", images=cifar_test.images[:20], labels=cifar_test.labels[:20])
    evaluated = _runner(resnet20_int8_artifact, "eval", "--data", str(tmp_path / "eval.npz"))
    predicted = _runner(resnet20_int8_artifact, "predict", str(folder))["predictions"]
    assert [Path(p["input"]).name for p in predicted] == [f"{i:03d}.png" for i in range(20)]
    assert _labels_sha([p["label"] for p in predicted]) == evaluated["predictions_sha256"]
    one = _runner(resnet20_int8_artifact, "predict", str(folder / "007.png"), "--top", "2")
    [only] = one["predictions"]
    assert only["label"] == predicted[7]["label"] == only["top"][0]["label"]
    assert len(only["top"]) == 2 and 0 < only["top"][1]["probability"] <= only["top"][0]["probability"]


def test_predict_reads_npy_and_measure_prints_its_statistics(digits_int8_artifact, tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    predicted = _runner(digits_int8_artifact, "predict", str(tmp_path / "x.npy"))["predictions"]
    assert len(predicted) == 5 and all(0 <= p["label"] < 10 for p in predicted)
    measured = _runner(digits_int8_artifact, "measure", "--repeat", "20", "--min-time", "0")
    summary = measured["summary"]
    assert summary["n"] == len(measured["samples_ms"]) >= 20
    assert 0 < summary["p50_ms"] <= summary["p90_ms"] <= summary["p99_ms"]
    assert summary["ci95_ms"] > 0


def test_predict_names_what_it_cannot_read(digits_int8_artifact, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    done = subprocess.run([sys.executable, str(digits_int8_artifact / "runner.py"), "predict",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no images" in done.stderr
