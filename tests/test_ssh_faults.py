"""Every fault injected for real against OpenSSH: each ends as one DeviceError subclass naming
the board and the next step, transient ones are retried, and nothing partial is recorded."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
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
    (tmp_path / "my keys").mkdir()
    stranger = sshd.keygen(tmp_path / "my keys" / "stranger")
    with pytest.raises(AuthError, match=r"board loopback .*refused key .*ssh-copy-id") as info:
        SSHDevice(board(ssh_server, tmp_path, key=str(stranger))).measure(digits_int8_artifact,
                                                                          QUICK)
    assert not any("retrying" in r.getMessage() for r in caplog.records)  # not transient
    # the suggested command is shell-quoted (a key path with a space stays one argument)
    assert (f"`ssh-copy-id -i '{stranger}.pub' -p {ssh_server.port} root@127.0.0.1`"
            in str(info.value))


@pytest.mark.parametrize("kind", ["public key", "other file"])
def test_a_key_that_is_not_a_private_key_is_an_auth_error_at_once(ssh_server, tmp_path, caplog,
                                                                  kind):
    if kind == "public key":
        key, message = f"{ssh_server.client_key}.pub", (rf"key {ssh_server.client_key}\.pub .*is a "
                                                        rf"public key; `key` must name its private "
                                                        rf"key \({ssh_server.client_key}\)")
    else:
        key, message = str(tmp_path / "notes.txt"), r"notes\.txt .*is not a private key file"
        (tmp_path / "notes.txt").write_text("remember the milk\n")
    started = time.monotonic()
    with pytest.raises(AuthError, match=message):
        SSHDevice(board(ssh_server, tmp_path / "board", key=key, retries=3)).facts()
    assert time.monotonic() - started < 2
    assert not any("retrying" in r.getMessage() for r in caplog.records)


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


def _key_line(pattern: str, public_key) -> str:
    kind, body = public_key.read_text().split()[:2]
    return f"{pattern} {kind} {body}\n"


def test_known_hosts_markers_and_junk_never_crash(ssh_server, tmp_path):
    """@cert-authority and @revoked lines for other hosts and unreadable lines are no reason to
    fail; the board's own plain entry is used."""
    other = sshd.keygen(tmp_path / "other")
    known = tmp_path / "known_hosts"
    known.write_text(ssh_server.known_hosts.read_text()
                     + _key_line("@cert-authority *.example.org", other.with_suffix(".pub"))
                     + _key_line("@revoked [other.example.org]:22", other.with_suffix(".pub"))
                     + "not a known_hosts line\n[127.0.0.1]:1 ssh-ed25519 !!notbase64!!\n")
    config = board(ssh_server, tmp_path / "board", known_hosts=str(known))
    assert SSHDevice(config).facts()["arch"]


def test_a_board_trusted_only_through_a_cert_authority_is_a_clear_error(ssh_server, tmp_path):
    authority = sshd.keygen(tmp_path / "ca")
    known = tmp_path / "known_hosts"
    known.write_text(_key_line("@cert-authority [127.0.0.1]:*", authority.with_suffix(".pub")))
    config = board(ssh_server, tmp_path / "board", known_hosts=str(known))
    with pytest.raises(HostKeyError, match=r"board loopback .*trusted only through a "
                                           r"@cert-authority line \(.*known_hosts line 1\).*"
                                           r"--accept-new-host-key"):
        SSHDevice(config).facts()


def test_a_revoked_host_key_is_refused_even_when_recorded_or_accepting_new(ssh_server, tmp_path):
    known = tmp_path / "known_hosts"
    host_key = ssh_server.host_key.with_suffix(".pub")
    known.write_text(ssh_server.known_hosts.read_text() + _key_line("@revoked *", host_key))
    before = known.read_text()
    for accept in (False, True):
        device = SSHDevice(board(ssh_server, tmp_path / "board", known_hosts=str(known)),
                           accept_new_host_key=accept)
        with pytest.raises(HostKeyError, match=r"board loopback .*marks @revoked; edgec never "
                                               r"accepts a revoked key"):
            device.facts()
    assert known.read_text() == before  # nothing recorded


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
    assert not sshd.flock_holders(ssh_server.lock_path)


def test_a_server_that_is_not_ssh_leaves_no_paramiko_traceback_on_stderr(ssh_server, tmp_path):
    """paramiko's transport thread logs 'Exception (client): Error reading SSH protocol banner'
    with a traceback; edgec routes that to its debug log: stderr has only edgec's error."""
    with socket.socket() as liar:
        liar.bind(("127.0.0.1", 0))
        liar.listen(8)

        def answer():
            for _ in range(2):
                connection, _ = liar.accept()
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                connection.close()

        threading.Thread(target=answer, daemon=True).start()
        save_device(board(ssh_server, tmp_path / "board", port=liar.getsockname()[1],
                          connect_timeout_s=2.0, retries=1, retry_backoff_s=0.05),
                    tmp_path / "devices")
        done = subprocess.run([sys.executable, "-m", "edgec.cli", "devices", "check", "loopback",
                               "--devices-dir", str(tmp_path / "devices")],
                              capture_output=True, text=True, timeout=60, cwd=sshd.REPO)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "Exception (client)" not in done.stderr
    assert "error: DeviceTimeout: board loopback" in done.stderr and not done.stdout.strip()


def test_a_wrong_python_path_is_named_as_such(ssh_server, digits_int8_artifact, tmp_path):
    from edgec.cli import app

    config = board(ssh_server, tmp_path / "board", python="/usr/bin/python9")
    with pytest.raises(RemoteCommandError, match=r"board loopback: python '/usr/bin/python9' \(the "
                                                 r"`python` of its device file\) was not found on "
                                                 r"the board; set `python`"):
        SSHDevice(config).measure(digits_int8_artifact, QUICK)
    save_device(config, tmp_path / "devices")
    checked = CliRunner().invoke(app, ["devices", "check", "loopback", "--devices-dir",
                                       str(tmp_path / "devices")])
    assert checked.exit_code == 1
    assert ("does not match target local: python '/usr/bin/python9' (the `python` of the device "
            "file) was not found on the board") in checked.stderr
    assert "pip install" not in checked.output


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
    assert re.search(r"ConnectError: connection to board loopback .* was lost mid-run after "
                     r"\d+\.\d s", result.stderr), result.stderr
    assert "connection refused" in result.stderr  # what the retry then found
    assert not (tmp_path / "profiles").exists()  # no partial profile recorded


def test_sshd_killed_mid_run_and_back_is_retried_and_the_board_measured_again(
        own_sshd, digits_int8_artifact, tmp_path, caplog):
    slow, marker = _slow_variant(digits_int8_artifact, tmp_path)
    killer = _kill_when_running(own_sshd, marker, restart=True)
    config = board(own_sshd, tmp_path / "board", retries=2, retry_backoff_s=0.5)
    with SSHDevice(config) as device:
        measurement = device.measure(slow, MeasureSpec(warmup=2, repeat=20, min_time_s=0.1))
    killer.join()
    assert len(measurement.samples_ms) >= 20
    messages = [r.getMessage() for r in caplog.records]
    assert any("was lost mid-run after" in m and "retrying" in m for m in messages)
    assert not sshd.flock_holders(own_sshd.lock_path)  # the killed session's lock died with it
    assert device.uploads == 1  # the cache survived the crash


def test_remote_disk_full_is_reported_and_the_cache_stays_consistent(
        ssh_server, digits_int8_artifact, tmp_path):
    from edgec.cli import app

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
        assert not sshd.flock_holders(ssh_server.lock_path)
        save_device(board(ssh_server, full), tmp_path / "devices")
        checked = CliRunner().invoke(app, ["devices", "check", "loopback", "--devices-dir",
                                           str(tmp_path / "devices")])
        assert checked.exit_code == 1 and "matches target" not in checked.stdout
        assert re.search(r"not ready: only 0\.\d MiB free in .*full on the board", checked.stderr)
    finally:
        subprocess.run(["umount", str(full)], capture_output=True)
