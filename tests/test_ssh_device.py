"""SSHDevice against a real OpenSSH server on 127.0.0.1: profile, cache, lock, CLI, secrets."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgec.devices import LocalDevice
from edgec.devices.inventory import save_device
from edgec.devices.lock import client_host
from edgec.devices.ssh import SSHDevice
from edgec.errors import DeviceBusy
from edgec.measure import MeasureSpec
from edgec.profiles import ProfileDB
from tests import sshd

QUICK = sshd.QUICK
board = sshd.board_config


def test_profile_over_ssh_uploads_once_and_reports_board_state(ssh_server, digits_int8_artifact,
                                                               tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="edgec")
    with SSHDevice(board(ssh_server, tmp_path / "board")) as device:
        first = device.measure(digits_int8_artifact, QUICK)
        second = device.measure(digits_int8_artifact, QUICK)
    assert device.uploads == 1
    assert sum("uploaded artifact" in r.getMessage() for r in caplog.records) == 1
    assert len(first.samples_ms) >= 30 and len(second.samples_ms) >= 30
    assert "onnxruntime" in second.runtime
    assert set(second.extra["board_state"]) == {"before", "after"}
    manifest = json.loads((digits_int8_artifact / "manifest.json").read_text())
    cached = tmp_path / "board" / "artifacts" / manifest["hash"]
    assert sorted(p.name for p in cached.iterdir()) == ["manifest.json", "model.onnx", "runner.py"]
    assert not list((tmp_path / "board" / "artifacts").glob(".tmp-*"))
    assert not (tmp_path / "board" / "board.lock").is_symlink()  # released


@pytest.mark.slow
def test_resnet20_over_ssh_agrees_with_local(ssh_server, resnet20_int8_artifact, cifar_test,
                                             tmp_path):
    spec = MeasureSpec(warmup=20, repeat=200, min_time_s=0.5)
    local = LocalDevice().measure(resnet20_int8_artifact, spec)
    images = tmp_path / "images.npz"
    np.savez(images, images=cifar_test.images[:300], labels=cifar_test.labels[:300])
    with SSHDevice(board(ssh_server, tmp_path / "board")) as device:
        remote = device.measure(resnet20_int8_artifact, spec)
        on_board = device.evaluate(resnet20_int8_artifact, str(images))
    here = LocalDevice().evaluate(resnet20_int8_artifact, str(images))
    print(f"\nResNet-20 int8 p50: local {local.p50:.3f} ms, ssh {remote.p50:.3f} ms "
          f"(n={len(local.samples_ms)}/{len(remote.samples_ms)})")
    assert 0.5 < remote.p50 / local.p50 < 2.0
    assert on_board["predictions_sha256"] == here["predictions_sha256"]
    assert device.uploads == 2  # the artifact and the images, once each


def test_corrupted_cache_entry_is_detected_and_reuploaded(ssh_server, digits_int8_artifact,
                                                          tmp_path):
    workdir = tmp_path / "board"
    manifest = json.loads((digits_int8_artifact / "manifest.json").read_text())
    with SSHDevice(board(ssh_server, workdir)) as device:
        device.measure(digits_int8_artifact, QUICK)
        model = workdir / "artifacts" / manifest["hash"] / "model.onnx"
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # a torn file
        result = device.measure(digits_int8_artifact, QUICK)
    assert device.uploads == 2
    assert len(result.samples_ms) >= 30
    assert (workdir / "artifacts" / manifest["hash"] / "model.onnx").read_bytes() == (
        digits_int8_artifact / "model.onnx").read_bytes()


def test_concurrent_profiles_of_one_board_are_serialised(ssh_server, digits_int8_artifact,
                                                         tmp_path):
    windows = tmp_path / "windows.txt"
    timed = sshd.artifact_variant(digits_int8_artifact, tmp_path / "timed", (
        "import time\n"
        f"with open({str(windows)!r}, 'a') as f: f.write(f'start {{time.time()}}\\n')\n"
        "import atexit\n"
        f"atexit.register(lambda: open({str(windows)!r}, 'a').write(f'end {{time.time()}}\\n'))"))
    spec = MeasureSpec(warmup=5, repeat=30, min_time_s=0.8)
    errors, results = [], []

    def profile():
        try:
            with SSHDevice(board(ssh_server, tmp_path / "board")) as device:
                results.append(device.measure(timed, spec))
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=profile) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 2
    events = [line.split() for line in windows.read_text().splitlines()]
    assert [kind for kind, _ in events] == ["start", "end", "start", "end"], events
    assert float(events[1][1]) <= float(events[2][1])  # the second began after the first ended


def test_stale_lock_of_a_dead_holder_is_broken(ssh_server, digits_int8_artifact, tmp_path,
                                               caplog):
    workdir = tmp_path / "board"
    workdir.mkdir()
    dead = 4_000_000  # above pid_max: no such process
    os.symlink(f"{client_host()}:{dead}:{int(time.time())}:abcdef", workdir /
               "board.lock")
    with SSHDevice(board(ssh_server, workdir)) as device:
        assert len(device.measure(digits_int8_artifact, QUICK).samples_ms) >= 30
    assert any("stale lock" in r.getMessage() for r in caplog.records)


def test_live_lock_of_another_host_makes_us_wait_then_fail(ssh_server, digits_int8_artifact,
                                                           tmp_path):
    workdir = tmp_path / "board"
    workdir.mkdir()
    os.symlink(f"other-host:1234:{int(time.time())}:abcdef", workdir / "board.lock")
    with (SSHDevice(board(ssh_server, workdir, lock_wait_s=1.0)) as device,
          pytest.raises(DeviceBusy, match="board loopback is busy.*other-host")):
        device.measure(digits_int8_artifact, QUICK)
    assert os.readlink(workdir / "board.lock").startswith("other-host:")  # not ours to break


def test_cli_devices_and_profile_record_without_secrets(ssh_server, digits_int8_artifact,
                                                        tmp_path, caplog):
    from edgec.cli import app

    caplog.set_level(logging.DEBUG)  # paramiko's and edgec's logs, all of them
    devices, profiles = tmp_path / "devices", tmp_path / "profiles"
    runner = CliRunner()
    added = runner.invoke(app, [
        "devices", "add", "loopback", "--host", ssh_server.host, "--port", str(ssh_server.port),
        "--target", "local", "--user", "root", "--key", str(ssh_server.client_key),
        "--known-hosts", str(ssh_server.known_hosts), "--workdir", str(tmp_path / "board"),
        "--python", sys.executable, "--devices-dir", str(devices)])
    assert added.exit_code == 0, added.output
    listed = runner.invoke(app, ["devices", "list", "--devices-dir", str(devices)])
    assert "loopback" in listed.output and f"root@127.0.0.1:{ssh_server.port}" in listed.output
    checked = runner.invoke(app, ["devices", "check", "loopback", "--devices-dir", str(devices)])
    assert checked.exit_code == 0, checked.output
    assert "x86_64" in checked.output and "matches target local" in checked.output
    profiled = runner.invoke(app, [
        "profile", str(digits_int8_artifact), "--device", "loopback", "--repeat", "30",
        "--min-time", "0.1", "--profiles", str(profiles), "--devices-dir", str(devices)])
    assert profiled.exit_code == 0, profiled.output
    [record] = ProfileDB(profiles).records("loopback")
    assert record["device"] == "loopback" and record["target"] == "local"
    assert record["runtime"]["onnxruntime"] and record["config_hash"]
    removed = runner.invoke(app, ["devices", "remove", "loopback", "--devices-dir", str(devices)])
    assert removed.exit_code == 0 and not (devices / "loopback.toml").exists()

    secret = _key_body(ssh_server.client_key)
    texts = [added.output, listed.output, checked.output, profiled.output, caplog.text]
    for folder in (digits_int8_artifact, profiles, devices, tmp_path / "board"):
        texts += [p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file()]
    assert not any(secret in text for text in texts)
    assert not any("PRIVATE KEY" in text for text in texts)


def _key_body(key: Path) -> str:
    """A distinctive slice of the private key's base64 body (never printed)."""
    body = "".join(line for line in key.read_text().splitlines() if "PRIVATE KEY" not in line)
    return body[40:80]


def test_build_profiles_on_a_device_and_records_it(ssh_server, tmp_path, monkeypatch):
    from edgec.build import BuildRequest, build

    save_device(board(ssh_server, tmp_path / "board"), tmp_path / "devices")
    monkeypatch.setenv("EDGEC_DEVICES_DIR", str(tmp_path / "devices"))
    result = build(BuildRequest(model=Path(__file__).parent.parent / "examples/digits/model.toml",
                                target="local", out=tmp_path / "out", device="loopback",
                                eval_count=200, measure=QUICK, profiles=tmp_path / "profiles"))
    profile = json.loads((result.directory / "profile.json").read_text())
    assert profile["device"] == "loopback"
    fp32, on_host, on_board = result.rows
    assert fp32.latency is not None and on_host.latency is not None
    assert on_host.latency_on == "loopback" and on_host.top1_on == "host"
    assert on_board.top1_on == "loopback" and "first 200 images" in on_board.name
    manifest = json.loads((result.directory / "manifest.json").read_text())
    device_accuracy = manifest["accuracy_on_device"]
    assert device_accuracy["total"] == 200 and manifest["accuracy"]["total"] == 500
    assert device_accuracy["measured_on"]["device"] == "loopback"
    assert device_accuracy["measured_on"]["cpu"]["int8_path"] == \
        manifest["cpu"]["runs_on"]["int8_path"] == manifest["int8"]["int8_path"]
    assert device_accuracy["same_predictions_as_host"]  # the board is this very machine
    assert device_accuracy["top1"] == device_accuracy["host_top1_same_images"]
    assert manifest["cpu"]["runs_on"]["source"] == "device loopback"
    assert not result.warnings
    [record] = ProfileDB(tmp_path / "profiles").records("loopback")
    assert record["model_hash"] == result.manifest["hash"]
