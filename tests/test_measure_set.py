"""Measurement sets (edgec.measure_set): several artifacts measured in one runner process,
interleaved, here and over SSH on a real OpenSSH server on loopback; the drift taken out."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgec.devices import LocalDevice
from edgec.devices.ssh import SSHDevice
from edgec.errors import MeasureError
from edgec.measure import MeasureSpec
from edgec.measure_set import interleaved_levels, measure_set
from tests import sshd

WINDOW = MeasureSpec(warmup=1, repeat=3, min_time_s=0.0)


@pytest.fixture(scope="module")
def digits_fp32_artifact(tmp_path_factory):
    from tests.conftest import digits_artifact

    return digits_artifact(tmp_path_factory.mktemp("digits-fp32"), "fp32.toml")


def test_levels_take_out_a_drift_common_to_each_round_and_ignore_one_wild_window():
    levels = np.array([0.5, 1.0, 2.0])
    drift = np.array([0.7, 1.0, 1.0, 1.3, 0.9])  # median 1: levels come back as they are
    windows = levels[:, None] * drift[None, :]
    windows[1, 3] *= 3.0  # one window of one artifact disturbed
    assert interleaved_levels(windows.tolist()) == pytest.approx(levels.tolist(), rel=1e-12)
    plain_means = windows.mean(axis=1)
    assert abs(plain_means[1] / levels[1] - 1) > 0.3  # what a plain mean would have said
    with pytest.raises(MeasureError, match="one positive window mean per round"):
        interleaved_levels([[1.0, 0.0], [1.0, 2.0]])


def _check(measurements, rounds: int, size: int) -> None:
    assert len(measurements) == size
    for measurement in measurements:
        assert len(measurement.samples_ms) == rounds  # one mean per window
        assert measurement.extra["windows"] == rounds and measurement.extra["set_size"] == size
        assert measurement.extra["runs"] >= rounds * WINDOW.repeat
        assert measurement.summary()["level_ms"] > 0 and "onnxruntime" in measurement.runtime
        p50, p90 = measurement.extra["window_p50_ms"], measurement.extra["window_p90_ms"]
        assert len(p50) == len(p90) == rounds and all(0 < a <= b for a, b in zip(p50, p90))


def test_a_set_is_measured_in_one_runner_here(digits_int8_artifact, digits_fp32_artifact):
    measurements = measure_set(LocalDevice(), [digits_int8_artifact, digits_fp32_artifact],
                               WINDOW, rounds=4)
    _check(measurements, 4, 2)
    with pytest.raises(MeasureError, match="at least one artifact and one round"):
        measure_set(LocalDevice(), [digits_int8_artifact], WINDOW, rounds=0)


def test_a_set_is_uploaded_once_and_measured_on_the_board(ssh_server, digits_int8_artifact,
                                                          digits_fp32_artifact, tmp_path):
    workdir = tmp_path / "board"
    members = [digits_int8_artifact, digits_fp32_artifact]
    with SSHDevice(sshd.board_config(ssh_server, workdir)) as board:
        _check(measure_set(board, members, WINDOW, rounds=3), 3, 2)
        _check(measure_set(board, members, WINDOW, rounds=3), 3, 2)
    assert board.uploads == 1  # the same set: content-hashed on the board
    (cached,) = (workdir / "artifacts").iterdir()
    manifest = json.loads((cached / "manifest.json").read_text())
    assert manifest["kind"] == "measure-set" and manifest["members"] == ["m0", "m1"]
    for member, source in zip(manifest["members"], members):
        assert (cached / member / "manifest.json").read_bytes() == \
            (source / "manifest.json").read_bytes()
        assert (cached / member / "model.onnx").is_file()
    assert not sshd.flock_holders(ssh_server.lock_path)  # measured under the lock, released
