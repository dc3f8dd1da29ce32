"""SSHDevice against a real OpenSSH server on 127.0.0.1: profile, cache, lock, CLI, secrets.

The loopback board is this machine, so a test sees the board's processes and lock directly.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgec.devices import LocalDevice
from edgec.devices.inventory import save_device
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
    assert not sshd.flock_holders(ssh_server.lock_path)  # released
    assert isinstance(second.extra["disturbed_by"], list)  # the board's processes were read


@pytest.mark.slow
def test_resnet20_over_ssh_agrees_with_local(ssh_server, resnet20_int8_artifact, cifar_test,
                                             tmp_path):
    """The same artifact measured here and over SSH on this host agrees. Measured twice each,
    interleaved, the faster p50 of each compared: other load only ever adds time, and one
    window of a shared VM was seen at twice its usual p50 (1.07 against 0.49 ms)."""
    spec = MeasureSpec(warmup=20, repeat=200, min_time_s=0.5)
    images = tmp_path / "images.npz"
    np.savez(images, images=cifar_test.images[:300], labels=cifar_test.labels[:300])
    local, remote = [], []
    with SSHDevice(board(ssh_server, tmp_path / "board")) as device:
        for _ in range(2):
            local.append(LocalDevice().measure(resnet20_int8_artifact, spec).p50)
            remote.append(device.measure(resnet20_int8_artifact, spec).p50)
        on_board = device.evaluate(resnet20_int8_artifact, str(images))
    here = LocalDevice().evaluate(resnet20_int8_artifact, str(images))
    print(f"\nResNet-20 int8 p50: local {local} ms, ssh {remote} ms")
    assert 0.5 < min(remote) / min(local) < 2.0
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


def _timed_variant(artifact: Path, tmp_path: Path, windows: Path) -> Path:
    """The artifact, with a runner that appends ``start|end TIME PID`` to ``windows``."""
    return sshd.artifact_variant(artifact, tmp_path / f"timed-{windows.stem}", (
        "import os, time\n"
        f"with open({str(windows)!r}, 'a') as f: f.write(f'start {{time.time()}} {{os.getpid()}}\\n')\n"
        "import atexit\n"
        f"atexit.register(lambda: open({str(windows)!r}, 'a').write("
        f"f'end {{time.time()}} {{os.getpid()}}\\n'))"))


def _runs(windows: Path) -> list[tuple[float, float]]:
    """(start, end) of each runner, by pid, in start order."""
    times: dict[str, dict[str, float]] = {}
    for kind, when, pid in (line.split() for line in windows.read_text().splitlines()):
        times.setdefault(pid, {})[kind] = float(when)
    return sorted((t["start"], t["end"]) for t in times.values())


def test_two_entries_of_one_board_never_run_two_runners_at_once(ssh_server, digits_int8_artifact,
                                                                 tmp_path):
    """Two device files for the same host:port with different workdirs (as two users with their
    own ~/.cache/edgec would have), started together: one lock per board serialises them."""
    windows = tmp_path / "windows.txt"
    timed = _timed_variant(digits_int8_artifact, tmp_path, windows)
    spec = MeasureSpec(warmup=5, repeat=30, min_time_s=0.8)
    configs = [board(ssh_server, tmp_path / f"cache-{n}", name=f"entry-{n}") for n in (1, 2)]
    errors, results = [], []

    def profile(config):
        try:
            with SSHDevice(config) as device:
                results.append(device.measure(timed, spec))
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=profile, args=(c,)) for c in configs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 2
    (first_start, first_end), (second_start, second_end) = _runs(windows)
    assert first_end <= second_start, _runs(windows)  # never two runners at once
    assert (tmp_path / "cache-1" / "artifacts").is_dir() and (tmp_path / "cache-2" / "artifacts").is_dir()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_ctrl_c_mid_profile_stops_the_runner_before_the_lock_is_freed(ssh_server,
                                                                       digits_int8_artifact,
                                                                       tmp_path, sig):
    """SIGINT (or SIGKILL: then only the connection's end tells the board) to `edgec profile`
    while the board runs a long measurement: the runner is gone from the board's process list
    before the board lock is free (watched all along). The runner takes 1 s to stop, as one busy
    in native code would, so a lock freed too early shows."""
    marker = tmp_path / "runner.pid"
    slow = sshd.artifact_variant(digits_int8_artifact, tmp_path / "slow", (
        "import os, pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1), sys.exit(143)))\n"
        f"pathlib.Path({str(marker)!r}).write_text(str(os.getpid()))\n"
        "time.sleep(60)"))
    save_device(board(ssh_server, tmp_path / "board"), tmp_path / "devices")
    client = subprocess.Popen(
        [sys.executable, "-m", "edgec.cli", "profile", str(slow), "--device", "loopback",
         "--profiles", str(tmp_path / "profiles"), "--devices-dir", str(tmp_path / "devices")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=sshd.REPO)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline and client.poll() is None:
        time.sleep(0.05)
    runner = int(marker.read_text())
    assert sshd.pid_alive(runner) and sshd.flock_holders(ssh_server.lock_path)
    overlaps = []

    def watch():  # the lock free while the runner still runs would be the defect
        deadline = time.monotonic() + 30
        while sshd.flock_holders(ssh_server.lock_path) and time.monotonic() < deadline:
            time.sleep(0.005)
        if sshd.pid_alive(runner):
            overlaps.append(time.monotonic())

    watcher = threading.Thread(target=watch)
    watcher.start()
    client.send_signal(sig)
    _, err = client.communicate(timeout=30)
    watcher.join(timeout=30)
    assert client.returncode != 0
    assert not overlaps
    assert not sshd.pid_alive(runner)
    assert not _processes_running(slow.name), "a runner of the interrupted profile is left"
    assert not sshd.flock_holders(ssh_server.lock_path)
    assert "Traceback" not in err and not (tmp_path / "profiles").exists()


def _processes_running(text: str) -> list[int]:
    """Pids of this machine's (the loopback board's) processes whose command line has ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_lock_of_a_dead_client_is_freed_by_its_holder_and_we_say_what_we_wait_for(
        ssh_server, digits_int8_artifact, tmp_path, caplog):
    """A client host died while its runner ran on the board: the holder there hears no
    heartbeat, stops that runner and frees the lock; meanwhile we say what we wait for and how
    long."""
    holder = sshd.lock_holder(ssh_server.lock_path, idle_s=2.0,
                              runner=sshd.fake_runner(tmp_path / "left-behind"))
    left = sshd.wait_for_pid(tmp_path / "left-behind")
    try:
        with SSHDevice(board(ssh_server, tmp_path / "board", lock_wait_s=20)) as device:
            measurement = device.measure(digits_int8_artifact, QUICK)
        assert holder.wait(timeout=5) == 0
    finally:
        holder.kill()
    assert not sshd.pid_alive(left)  # the runner it left was stopped
    assert len(measurement.samples_ms) >= 30
    [waiting] = [r.getMessage() for r in caplog.records if "waiting for its lock" in r.getMessage()]
    # (other edgec runners of this shared machine may be listed too)
    assert re.search(rf"held by pid {holder.pid} \(user root\) for \d+ s; .*edgec runner pid "
                     rf"{left} running for \d+ s.*; waited \d+ s of 20 s", waiting), waiting


def test_busy_board_makes_us_wait_then_fail_saying_who_holds_it(ssh_server, digits_int8_artifact,
                                                               tmp_path):
    holder = sshd.lock_holder(ssh_server.lock_path, idle_s=120)
    try:
        with (SSHDevice(board(ssh_server, tmp_path / "board", lock_wait_s=1.0)) as device,
              pytest.raises(DeviceBusy, match=rf"board loopback is busy: its lock .* is held by pid "
                                              rf"{holder.pid} \(user root\) for \d+ s; .*waited "
                                              rf"1 s \(lock_wait_s\)")):
            device.measure(digits_int8_artifact, QUICK)
        assert sshd.flock_holders(ssh_server.lock_path) == {holder.pid}  # not ours to break
    finally:
        holder.stdin.close()  # its client goes: it frees the lock
        holder.wait(timeout=10)
    assert not sshd.flock_holders(ssh_server.lock_path)


def test_other_work_on_the_board_marks_the_measurement_disturbed(ssh_server, digits_int8_artifact,
                                                                 tmp_path):
    hog, other_runner = sshd.cpu_hog(), subprocess.Popen(sshd.fake_runner(tmp_path / "other"))
    try:
        with SSHDevice(board(ssh_server, tmp_path / "board")) as device:
            measurement = device.measure(digits_int8_artifact, QUICK)
    finally:
        hog.kill()
        other_runner.kill()
    [warning] = [w for w in measurement.warnings if w.startswith("measurement disturbed")]
    assert f"pid {hog.pid} (python" in warning and "% CPU" in warning
    assert f"edgec runner pid {other_runner.pid}" in warning
    assert any(f"pid {hog.pid} " in d for d in measurement.extra["disturbed_by"])
    assert "while True" not in warning  # names and pids only, never command lines


def test_artifact_for_another_target_than_the_boards_is_flagged(ssh_server, digits_int8_artifact,
                                                                tmp_path):
    with SSHDevice(board(ssh_server, tmp_path / "board", target="rpi4")) as device:
        measurement = device.measure(digits_int8_artifact, QUICK)
    assert any("artifact built for target 'local', but board loopback is target 'rpi4'" in w
               for w in measurement.warnings)


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
