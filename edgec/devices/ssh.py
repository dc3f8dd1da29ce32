"""SSHDevice: run an artifact's runner on a board over SSH (paramiko), like LocalDevice does here.

- Host keys are verified against the device's known_hosts; an unknown key is refused unless the
  caller explicitly asks to accept and record a new one (a *changed* key is always refused).
- Key authentication only; connect and command timeouts; keepalive.
- Artifacts are uploaded once into ``<workdir>/artifacts/<manifest hash>/`` on the board: to a
  temporary name, then renamed, so a half-uploaded artifact is never used; the cached files are
  checked against the manifest's digests before every run and re-uploaded when they differ.
- Every remote command is built with shlex.quote; file names are checked against traversal.
- Transient faults (connection refused, connection lost, no SSH banner) are retried with
  backoff; everything ends as one DeviceError subclass naming the board and the next step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import select
import shlex
import socket
import time
from pathlib import Path, PurePosixPath
from typing import Any

import paramiko

from edgec.artifact import read_manifest, sha256_file
from edgec.devices import probe
from edgec.devices.base import eval_args, parse_runner_output
from edgec.devices.inventory import DeviceConfig
from edgec.devices.lock import BoardLock
from edgec.errors import (
    AuthError,
    ConnectError,
    DeviceError,
    DeviceTimeout,
    HostKeyError,
    RemoteCommandError,
    RemoteDiskFull,
)
from edgec.measure import Measurement, MeasureSpec, condition_warnings

log = logging.getLogger(__name__)
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
TIMEOUT_STATUSES = (124, 137)
RUN_MARK = "@@edgec-runner@@"  # coreutils/busybox `timeout`: timed out / killed after -k

_DIGESTS = """
import hashlib, json, os, sys
root, names = sys.argv[1], sys.argv[2:]
def digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
if not os.path.isdir(root):
    print("null")
else:
    print(json.dumps({n: digest(os.path.join(root, n)) if os.path.isfile(os.path.join(root, n))
                      else None for n in names}))
"""


class _Transient(Exception):
    """A fault worth retrying on a new connection; carries the error to raise at the end."""

    def __init__(self, error: DeviceError):
        super().__init__(str(error))
        self.error = error


def check_relative_name(name: str) -> str:
    """An artifact file name: relative, no '..', only safe characters per component."""
    parts = PurePosixPath(name).parts
    if (not parts or name.startswith("/") or "\\" in name
            or any(p in (".", "..") or not SAFE_NAME.match(p) or p.startswith("-") for p in parts)):
        raise DeviceError(f"artifact file name {name!r} is unsafe (absolute, '..' or odd "
                          f"characters); rebuild the artifact with edgec")
    return name


def artifact_files(artifact_dir: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """name → sha256 of everything the board needs: the manifest's files plus manifest.json."""
    if not re.fullmatch(r"[0-9a-f]{16,64}", str(manifest.get("hash", ""))):
        raise DeviceError(f"{artifact_dir}: manifest hash {manifest.get('hash')!r} is not a hex "
                          f"digest; rebuild the artifact with edgec")
    files = {check_relative_name(n): d for n, d in manifest.get("files", {}).items()}
    for name in files:
        if not (Path(artifact_dir) / name).is_file():
            raise DeviceError(f"{artifact_dir}: file {name!r} named by the manifest is missing; "
                              f"rebuild the artifact")
    files["manifest.json"] = sha256_file(Path(artifact_dir) / "manifest.json")
    return files


def _remote_path(path: str) -> str:
    """Board paths relative to the login's home stay relative (SFTP and the shell agree)."""
    if path in ("~", "~/"):
        return "."
    return path[2:] if path.startswith("~/") else path.rstrip("/")


class SSHDevice:
    """A board reached over SSH. Same interface as LocalDevice; ``uploads`` counts uploads."""

    def __init__(self, config: DeviceConfig, accept_new_host_key: bool = False):
        self.paramiko = paramiko
        self.config = config
        self.name = config.name
        self.accept_new_host_key = accept_new_host_key
        self.workdir = _remote_path(config.workdir)
        self.uploads = 0
        self._client = None
        self._lost_tokens: set[str] = set()

    # ----- public interface (the Device protocol) -------------------------------------------
    def run_runner(self, artifact_dir: Path, args: list[str],
                   timeout_s: float | None = None) -> dict[str, Any]:
        return self._retrying(lambda: self._session(Path(artifact_dir), args, timeout_s))[0]

    def measure(self, artifact_dir: Path, spec: MeasureSpec) -> Measurement:
        result, before, after = self._retrying(
            lambda: self._session(Path(artifact_dir), spec.runner_args(), None))
        result["board_state"] = {"before": before, "after": after}
        return Measurement.from_runner(result, condition_warnings(before, after))

    def evaluate(self, artifact_dir: Path, data: str, start: int = 0, count: int = 0) -> dict:
        return self.run_runner(artifact_dir, eval_args(data, start, count))

    def facts(self) -> dict[str, Any]:
        """Arch, OS, Python, runtimes, governor, temperature, free disk and memory."""
        script = probe.facts_script(self.config.python, self.workdir)
        return self._retrying(lambda: probe.parse(self._exec_ok(script, 60, "probe")))

    def cpu(self) -> dict[str, Any]:
        """The board's CPU as its runner sees it (``runner.py cpu``: arch, model, int8 path)."""
        command = probe.cpu_command(self.config.python)
        found = self._retrying(lambda: probe.parse_cpu(self._exec_ok(command, 120, "cpu probe")))
        if found is None:
            raise RemoteCommandError(
                f"board {self.name}: {self.config.python} could not read its CPU (the runner "
                f"needs numpy there: `{self.config.python} -m pip install numpy`, or set python "
                f"in the device file)")
        return found

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> SSHDevice:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- one locked session: upload if needed, run, read the board state ------------------
    def _session(self, artifact_dir: Path, args: list[str], timeout_s: float | None):
        manifest = read_manifest(artifact_dir)
        files = artifact_files(artifact_dir, manifest)
        timeout_s = timeout_s or self.config.command_timeout_s
        lock = BoardLock(self._exec, self.workdir, self.name,
                         stale_after_s=self.config.command_timeout_s + 120,
                         wait_s=self.config.lock_wait_s, reclaim=self._lost_tokens)
        lock.acquire()
        try:
            remote = self._ensure_artifact(artifact_dir, manifest["hash"], files)
            result, before, after = self._run(remote, self._remote_args(args), timeout_s, lock)
        except _Transient:
            self._lost_tokens.add(lock.token)
            raise
        except BaseException:
            self._release_quietly(lock)
            raise
        self._release_quietly(lock)
        return result, before, after

    def _release_quietly(self, lock: BoardLock) -> None:
        try:
            lock.release()
        except (_Transient, DeviceError) as exc:
            self._lost_tokens.add(lock.token)
            log.warning("board %s: could not release the lock (%s); it is reclaimed next time",
                        self.name, exc)

    def _run(self, remote: str, args: list[str], timeout_s: float, lock: BoardLock):
        """One round trip: board state, the runner (bounded by `timeout` on the board), state."""
        q = shlex.quote
        runner = (f"env OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 timeout -k 5 "
                  f"{max(1, round(timeout_s))} {q(self.config.python)} {q(remote + '/runner.py')} "
                  + " ".join(q(a) for a in args))
        command = (f"{probe.STATE_SCRIPT}\necho {RUN_MARK}\n{runner} </dev/null & p=$!\n"
                   f"{lock.record_pid('p')}\nwait $p; s=$?\necho {RUN_MARK}\n"
                   f"{probe.STATE_SCRIPT}\nexit $s\n")
        status, out, err = self._exec(command, timeout_s + 30)
        parts = out.split(f"{RUN_MARK}\n")
        if len(parts) != 3:
            raise RemoteCommandError(f"board {self.name}: the run ended early (exit {status}): "
                                     f"{err.strip()[-500:]}; run `edgec devices check "
                                     f"{self.name}`")
        before, out, after = probe.parse(parts[0]), parts[1], probe.parse(parts[2])
        if status in TIMEOUT_STATUSES:
            raise DeviceTimeout(f"runner on board {self.name} exceeded {timeout_s:.0f} s and was "
                                f"stopped; raise command_timeout_s in its device file or lower "
                                f"--repeat/--min-time")
        if status != 0:
            self._raise_if_disk_full(err)
            tail = "\n".join(err.strip().splitlines()[-5:])
            raise RemoteCommandError(
                f"runner on board {self.name} failed (exit {status}); its last errors:\n{tail}\n"
                f"run `edgec devices check {self.name}` to compare the board's runtimes with the "
                f"artifact's target")
        return parse_runner_output(out, err, f"board {self.name}"), before, after

    # ----- the artifact cache on the board ---------------------------------------------------
    def _ensure_artifact(self, artifact_dir: Path, key: str, files: dict[str, str]) -> str:
        q = shlex.quote
        remote = f"{self.workdir}/artifacts/{key}"
        found = self._remote_digests(remote, list(files))
        if found == files:
            return remote
        if found is not None:
            bad = sorted(n for n in files if found.get(n) != files[n])
            log.warning("board %s: cached artifact %s differs in %s; re-uploading",
                        self.name, key[:12], ", ".join(bad))
            self._exec_ok(f"rm -rf -- {q(remote)}", 60, "cache cleanup")
        self._upload(artifact_dir, remote, list(files))
        return remote

    def _remote_digests(self, remote: str, names: list[str]) -> dict[str, str | None] | None:
        q = shlex.quote
        command = f"{q(self.config.python)} -c {q(_DIGESTS)} {q(remote)} " + " ".join(map(q, names))
        return json.loads(self._exec_ok(command, 120, "cache check").strip().splitlines()[-1])

    def _upload(self, artifact_dir: Path, remote: str, names: list[str]) -> None:
        """Upload into a temporary directory, then rename it into place (atomic on the board)."""
        q = shlex.quote
        parent = f"{self.workdir}/artifacts"
        tmp = f"{parent}/.tmp-{PurePosixPath(remote).name[:16]}-{int(time.time() * 1e6)}"
        # We hold the board lock: any .tmp-* left is from a dead upload.
        self._exec_ok(f"rm -rf -- {q(parent)}/.tmp-* && mkdir -p -- {q(tmp)}", 60, "upload setup")
        size = sum((artifact_dir / n).stat().st_size for n in names)
        sftp = self._sftp()
        try:
            for name in names:
                for sub in reversed(PurePosixPath(name).parents[:-1]):
                    self._sftp_mkdir(sftp, f"{tmp}/{sub}")
                sftp.put(str(artifact_dir / name), f"{tmp}/{name}", confirm=True)
            sftp.posix_rename(tmp, remote)
        except (OSError, EOFError, self.paramiko.SSHException) as exc:
            self._upload_failed(exc, tmp, size)
        finally:
            sftp.close()
        self.uploads += 1
        log.info("board %s: uploaded artifact %s (%d files, %.1f KiB)", self.name,
                 PurePosixPath(remote).name[:12], len(names), size / 1024)

    def _upload_data(self, local: Path) -> str:
        """A dataset file (e.g. --data images.npz), uploaded once under its content hash."""
        digest = sha256_file(local)
        remote = f"{self.workdir}/data/{digest}.npz"
        sftp = self._sftp()
        try:
            try:
                if sftp.stat(remote).st_size == local.stat().st_size:
                    return remote
            except FileNotFoundError:
                pass
            self._exec_ok(f"mkdir -p -- {shlex.quote(self.workdir + '/data')}", 30, "data setup")
            tmp = f"{remote}.tmp-{int(time.time() * 1e6)}"
            try:
                sftp.put(str(local), tmp, confirm=True)
                sftp.posix_rename(tmp, remote)
            except (OSError, EOFError, self.paramiko.SSHException) as exc:
                self._upload_failed(exc, tmp, local.stat().st_size)
            self.uploads += 1
            return remote
        finally:
            sftp.close()

    def _remote_args(self, args: list[str]) -> list[str]:
        """Replace a local ``--data FILE`` by its uploaded copy on the board."""
        args = list(args)
        if "--data" in args:
            i = args.index("--data") + 1
            local = Path(args[i])
            if not local.is_file():
                raise DeviceError(f"data file {str(local)!r} does not exist; check the path")
            args[i] = self._upload_data(local)
        return args

    def _upload_failed(self, exc: Exception, tmp: str, size: int) -> None:
        if not self._transport_alive():
            raise _Transient(self._lost(exc)) from exc
        try:
            self._exec(f"rm -rf -- {shlex.quote(tmp)}", 60)
            free = probe.parse(self._exec_ok(probe.facts_script(self.config.python, self.workdir),
                                             60, "probe")).get("disk_free_mb")
        except (_Transient, DeviceError):
            free = None
        if free is not None and free * 1024 * 1024 < size + (1 << 20):
            raise RemoteDiskFull(
                f"board {self.name}: no space left in {self.workdir} ({free:.1f} MiB free, the "
                f"artifact needs {size / 1024:.1f} KiB); free space on the board (its cache is "
                f"{self.workdir}/artifacts) or set another workdir in its device file") from exc
        raise RemoteCommandError(f"board {self.name}: upload to {tmp} failed ({exc}); check that "
                                 f"{self.workdir} is writable for {self.config.user}") from exc

    def _raise_if_disk_full(self, err: str) -> None:
        if "No space left on device" in err:
            raise RemoteDiskFull(f"board {self.name}: no space left on device in "
                                 f"{self.workdir}; free disk space on the board")

    # ----- transport ---------------------------------------------------------------------
    def _retrying(self, operation):
        attempts = self.config.retries + 1
        for attempt in range(attempts):
            try:
                return operation()
            except _Transient as fault:
                self.close()
                if attempt + 1 == attempts:
                    error = fault.error
                    raise type(error)(f"{error} (after {attempts} attempts)") from fault
                delay = self.config.retry_backoff_s * 2 ** attempt
                log.warning("board %s: %s; retrying in %.1f s (%d/%d)", self.name, fault.error,
                            delay, attempt + 1, attempts - 1)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _connected(self):
        if self._client is not None and self._transport_alive():
            return self._client
        self.close()
        self._client = self._connect()
        return self._client

    def _transport_alive(self) -> bool:
        transport = self._client.get_transport() if self._client else None
        return bool(transport and transport.is_active())

    def _connect(self):
        paramiko, cfg = self.paramiko, self.config
        if cfg.key and not Path(cfg.key).is_file():
            raise AuthError(f"key file {cfg.key} for board {self.name} does not exist; fix `key` "
                            f"in its device file or create one with ssh-keygen")
        client = paramiko.SSHClient()
        known = Path(cfg.known_hosts)
        if known.is_file():
            client.load_host_keys(str(known))
        client.set_missing_host_key_policy(
            _AcceptNewKey(known, self.name) if self.accept_new_host_key else _RejectUnknownKey())
        t = cfg.connect_timeout_s
        started = time.monotonic()
        try:
            client.connect(cfg.host, cfg.port, username=cfg.user or None,
                           key_filename=cfg.key or None, timeout=t, banner_timeout=t,
                           auth_timeout=t, channel_timeout=t, allow_agent=not cfg.key,
                           look_for_keys=False)
        except Exception as exc:
            client.close()
            raise self._connect_error(exc, time.monotonic() - started) from exc
        client.get_transport().set_keepalive(cfg.keepalive_s)
        return client

    def _connect_error(self, exc: BaseException, elapsed_s: float) -> BaseException:
        p, cfg, where = self.paramiko, self.config, f"{self.config.host}:{self.config.port}"
        check = f"`edgec devices check {self.name}`"
        if isinstance(exc, p.BadHostKeyException):
            return HostKeyError(
                f"board {self.name} ({where}) presented a host key that does NOT match "
                f"{cfg.known_hosts} (got {_fingerprint(exc.key)}); this may be an attack. If the "
                f"board was reinstalled, remove the old entry with `ssh-keygen -R "
                f"'{_known_hosts_name(cfg)}' -f {cfg.known_hosts}` and run {check} "
                f"--accept-new-host-key")
        if isinstance(exc, _UnknownHostKey):
            return HostKeyError(
                f"board {self.name} ({where}) is not in {cfg.known_hosts} (its key is "
                f"{exc.fingerprint}); verify that fingerprint on the board, then record it with "
                f"{check} --accept-new-host-key")
        if isinstance(exc, p.PasswordRequiredException):
            return AuthError(f"key {cfg.key} for board {self.name} is passphrase-protected; load "
                             f"it into ssh-agent and leave `key` empty in the device file")
        if isinstance(exc, p.AuthenticationException):
            return AuthError(
                f"board {self.name} ({where}) refused key {cfg.key or '(agent)'} for user "
                f"{cfg.user or '(local user)'}; install the public key on the board with "
                f"`ssh-copy-id -i {cfg.key or '~/.ssh/id_ed25519'}.pub -p {cfg.port} "
                f"{cfg.user or '$USER'}@{cfg.host}` or fix `user`/`key` in its device file")
        if isinstance(exc, p.ssh_exception.NoValidConnectionsError):
            return _Transient(ConnectError(
                f"cannot reach board {self.name} at {where} (connection refused); check that it "
                f"is powered on and sshd runs, then {check}"))
        # paramiko reports a silent server as a timeout, a banner error or a dead session,
        # depending on which of its threads notices first; the clock tells them apart.
        if isinstance(exc, socket.timeout | TimeoutError) or (
                isinstance(exc, p.SSHException | EOFError)
                and ("banner" in str(exc) or elapsed_s >= 0.9 * cfg.connect_timeout_s)):
            return _Transient(DeviceTimeout(
                f"board {self.name} at {where} did not answer as an SSH server within "
                f"{cfg.connect_timeout_s:.0f} s; check host/port in its device file and the "
                f"network, or raise connect_timeout_s"))
        if isinstance(exc, OSError | EOFError | p.SSHException):
            return _Transient(ConnectError(
                f"cannot connect to board {self.name} at {where} ({exc}); check the network "
                f"and sshd on the board, then {check}"))
        return exc

    def _lost(self, exc: BaseException) -> ConnectError:
        return ConnectError(f"connection to board {self.name} ({self.config.host}:"
                            f"{self.config.port}) was lost ({type(exc).__name__}: {exc}); check "
                            f"that the board is up and sshd runs, then "
                            f"`edgec devices check {self.name}`")

    def _sftp(self):
        try:
            return self._connected().open_sftp()
        except (OSError, EOFError, self.paramiko.SSHException) as exc:
            raise _Transient(self._lost(exc)) from exc

    @staticmethod
    def _sftp_mkdir(sftp, path: str) -> None:
        try:
            sftp.mkdir(path)
        except OSError:
            sftp.stat(path)  # it already exists; anything else raises again

    def _exec_ok(self, command: str, timeout_s: float, what: str) -> str:
        status, out, err = self._exec(command, timeout_s)
        if status in TIMEOUT_STATUSES or status != 0:
            self._raise_if_disk_full(err)
            raise RemoteCommandError(f"{what} on board {self.name} failed (exit {status}): "
                                     f"{err.strip()[-500:]}; run `edgec devices check "
                                     f"{self.name}`")
        return out

    def _exec(self, command: str, timeout_s: float) -> tuple[int, str, str]:
        """Run ``command`` on the board; (exit status, stdout, stderr). Deadline enforced here."""
        try:
            channel = self._connected().get_transport().open_session(
                timeout=self.config.connect_timeout_s)
            channel.exec_command(command)
        except _Transient:
            raise
        except (OSError, EOFError, self.paramiko.SSHException) as exc:
            raise _Transient(self._lost(exc)) from exc
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                select.select([channel], [], [], 0.02)
                while channel.recv_ready():
                    out += channel.recv(1 << 16)
                while channel.recv_stderr_ready():
                    err += channel.recv_stderr(1 << 16)
                if channel.exit_status_ready() and not (channel.recv_ready()
                                                        or channel.recv_stderr_ready()):
                    break
                if time.monotonic() > deadline:
                    raise DeviceTimeout(f"command on board {self.name} exceeded {timeout_s:.0f} s;"
                                        f" raise command_timeout_s in its device file")
            status = channel.recv_exit_status()
        finally:
            channel.close()
        if status == -1:  # killed by a signal, or the connection died: tell them apart
            for _ in range(10):
                if not self._transport_alive():
                    raise _Transient(self._lost(EOFError("the session ended without a status")))
                time.sleep(0.05)
        return status, out.decode(errors="replace"), err.decode(errors="replace")


class _UnknownHostKey(Exception):
    def __init__(self, fingerprint: str):
        super().__init__(fingerprint)
        self.fingerprint = fingerprint


def _fingerprint(key) -> str:
    import base64

    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _known_hosts_name(config: DeviceConfig) -> str:
    return config.host if config.port == 22 else f"[{config.host}]:{config.port}"


class _RejectUnknownKey(paramiko.MissingHostKeyPolicy):
    """Refuse a host missing from known_hosts (paramiko's RejectPolicy, plus a fingerprint)."""

    def missing_host_key(self, client, hostname, key):
        raise _UnknownHostKey(f"{key.get_name()} {_fingerprint(key)}")


class _AcceptNewKey(paramiko.MissingHostKeyPolicy):
    """Record an unknown host's key in known_hosts (only when the user asked for it)."""

    def __init__(self, known_hosts: Path, board: str):
        self.known_hosts, self.board = known_hosts, board

    def missing_host_key(self, client, hostname, key):
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        with open(self.known_hosts, "a") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.warning("board %s: recorded new host key %s %s for %s in %s", self.board,
                    key.get_name(), _fingerprint(key), hostname, self.known_hosts)

