"""Every fault injected for real against OpenSSH: each ends as one DeviceError subclass naming
the board and the next step, transient ones are retried, and nothing partial is recorded."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import pytest
from typer.testing import CliRunner

from edgec.devices.inventory import save_device
from edgec.devices.ssh import SSHDevice
from edgec.errors import (
    AuthError,
    ConnectError,
    DeviceTimeout,
    HostKeyError,
    RemoteCommandError,
    RemoteDiskFull,
)
from edgec.measure import MeasureSpec
from tests import sshd

QUICK = sshd.QUICK
board = sshd.board_config


def test_connection_refused_is_retried_then_names_the_board(ssh_server, digits_int8_artifact,
                                                           tmp_path, caplog):
    closed = sshd.free_port()
    config = board(ssh_server, tmp_path, port=closed, retries=2, retry_backoff_s=0.05)
    with pytest.raises(ConnectError, match=r"board loopback .*connection refused.*edgec devices "
                                           r"check loopback.*after 3 attempts"):
        SSHDevice(config).measure(digits_int8_artifact, QUICK)
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 2


def test_wrong_key_is_an_auth_error(ssh_server, digits_int8_artifact, tmp_path, caplog):
    stranger = sshd.keygen(tmp_path / "stranger")
    with pytest.raises(AuthError, match=r"board loopback .*refused key .*ssh-copy-id"):
        SSHDevice(board(ssh_server, tmp_path, key=str(stranger))).measure(digits_int8_artifact,
                                                                          QUICK)
    assert not any("retrying" in r.getMessage() for r in caplog.records)  # not transient


def test_changed_host_key_is_refused_even_with_accept_new(ssh_server, digits_int8_artifact,
                                                          tmp_path):
    impostor = sshd.keygen(tmp_path / "impostor")
    known = tmp_path / "known_hosts"
    kind, body = (tmp_path / "impostor.pub").read_text().split()[:2]
    known.write_text(f"[127.0.0.1]:{ssh_server.port} {kind} {body}\n")
    assert impostor.exists()
    for accept in (False, True):
        device = SSHDevice(board(ssh_server, tmp_path, known_hosts=str(known)),
                           accept_new_host_key=accept)
        with pytest.raises(HostKeyError, match=r"board loopback .*does NOT match.*ssh-keygen -R"):
            device.measure(digits_int8_artifact, QUICK)
    assert known.read_text().count("\n") == 1  # nothing recorded


def test_unknown_host_key_is_refused_unless_accepted_explicitly(ssh_server, tmp_path):
    known = tmp_path / "known_hosts"
    config = board(ssh_server, tmp_path / "board", known_hosts=str(known))
    with pytest.raises(HostKeyError, match=r"not in .*known_hosts.*--accept-new-host-key"):
        SSHDevice(config).facts()
    assert not known.exists()
    assert SSHDevice(config, accept_new_host_key=True).facts()["arch"]
    assert f"[127.0.0.1]:{ssh_server.port} ssh-ed25519 " in known.read_text()
    assert SSHDevice(config).facts()["arch"]  # recorded: now verified without the flag


def test_a_port_that_never_speaks_times_out(ssh_server, digits_int8_artifact, tmp_path):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel accepts connections; nobody ever sends a banner
        config = board(ssh_server, tmp_path, port=silent.getsockname()[1], connect_timeout_s=1.0,
                       retries=1, retry_backoff_s=0.05)
        with pytest.raises(DeviceTimeout, match=r"board loopback .*did not answer as an SSH "
                                                 r"server.*after 2 attempts"):
            SSHDevice(config).measure(digits_int8_artifact, QUICK)


def test_runner_beyond_its_timeout_is_stopped_and_the_board_stays_usable(
        ssh_server, digits_int8_artifact, tmp_path, caplog):
    sleepy = sshd.artifact_variant(digits_int8_artifact, tmp_path / "sleepy",
                                   "import time\ntime.sleep(60)")
    config = board(ssh_server, tmp_path / "board", command_timeout_s=2.0)
    with SSHDevice(config) as device:
        started = time.monotonic()
        with pytest.raises(DeviceTimeout, match=r"runner on board loopback exceeded 2 s"):
            device.measure(sleepy, QUICK)
        assert time.monotonic() - started < 20
        assert not any("retrying" in r.getMessage() for r in caplog.records)
        assert len(device.measure(digits_int8_artifact, QUICK).samples_ms) >= 30  # lock released


def test_runner_crash_is_a_remote_command_error_with_its_stderr(ssh_server, digits_int8_artifact,
                                                                tmp_path):
    crashing = sshd.artifact_variant(
        digits_int8_artifact, tmp_path / "crashing",
        "import sys\nsys.stderr.write('boom: the runtime is missing\\n')\nsys.exit(3)")
    with (SSHDevice(board(ssh_server, tmp_path / "board")) as device,
          pytest.raises(RemoteCommandError,
                        match=r"(?s)runner on board loopback failed \(exit 3\).*boom"
                              r".*devices check")):
        device.measure(crashing, QUICK)
    assert not (tmp_path / "board" / "board.lock").is_symlink()


def _kill_when_running(server: sshd.SSHServer, marker, restart: bool) -> threading.Thread:
    """Kill sshd (and its sessions) as soon as the runner on the board has started."""
    def act():
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        server.kill()
        if restart:
            server.start()

    thread = threading.Thread(target=act)
    thread.start()
    return thread


def _slow_variant(digits_int8_artifact, tmp_path):
    """A runner that announces itself in ``running`` and then takes 4 s longer."""
    marker = tmp_path / "running"
    slow = sshd.artifact_variant(digits_int8_artifact, tmp_path / "slow",
                                 f"import pathlib, time\npathlib.Path({str(marker)!r}).touch()\n"
                                 f"time.sleep(4)")
    return slow, marker


@pytest.fixture
def own_sshd(tmp_path):
    """An sshd of our own, for tests that kill it."""
    reason = sshd.missing_reason()
    if reason:
        pytest.skip(reason)
    server = sshd.SSHServer(tmp_path / "own-sshd").start()
    yield server
    server.stop()


def test_sshd_killed_mid_run_fails_cleanly_and_records_nothing(own_sshd, digits_int8_artifact,
                                                               tmp_path):
    from edgec.cli import app

    slow, marker = _slow_variant(digits_int8_artifact, tmp_path)
    save_device(board(own_sshd, tmp_path / "board", retry_backoff_s=0.05), tmp_path / "devices")
    killer = _kill_when_running(own_sshd, marker, restart=False)
    result = CliRunner().invoke(app, [
        "profile", str(slow), "--device", "loopback", "--repeat", "20", "--min-time", "0.1",
        "--profiles", str(tmp_path / "profiles"), "--devices-dir", str(tmp_path / "devices")])
    killer.join()
    assert result.exit_code == 2, result.output
    assert "ConnectError" in result.output and "loopback" in result.output
    assert not (tmp_path / "profiles").exists()  # no partial profile recorded


def test_sshd_killed_mid_run_and_back_is_retried_and_the_lock_reclaimed(
        own_sshd, digits_int8_artifact, tmp_path, caplog):
    slow, marker = _slow_variant(digits_int8_artifact, tmp_path)
    killer = _kill_when_running(own_sshd, marker, restart=True)
    config = board(own_sshd, tmp_path / "board", retries=2, retry_backoff_s=0.5)
    with SSHDevice(config) as device:
        measurement = device.measure(slow, MeasureSpec(warmup=2, repeat=20, min_time_s=0.1))
    killer.join()
    assert len(measurement.samples_ms) >= 20
    messages = [r.getMessage() for r in caplog.records]
    assert any("was lost" in m and "retrying" in m for m in messages)
    assert any("ours, from a lost connection" in m for m in messages)
    assert device.uploads == 1  # the cache survived the crash


def test_remote_disk_full_is_reported_and_the_cache_stays_consistent(
        ssh_server, digits_int8_artifact, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(full)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tiny tmpfs as the board's workdir: {mounted.stderr.strip()}")
    try:
        with (SSHDevice(board(ssh_server, full)) as device,
              pytest.raises(RemoteDiskFull, match=r"board loopback: no space left .*free space")):
            device.measure(digits_int8_artifact, QUICK)
        manifest = json.loads((digits_int8_artifact / "manifest.json").read_text())
        artifacts = full / "artifacts"
        assert not (artifacts / manifest["hash"]).exists()  # never a half-uploaded entry
        assert not list(artifacts.glob(".tmp-*"))
        assert not (full / "board.lock").is_symlink()
    finally:
        subprocess.run(["umount", str(full)], capture_output=True)
