"""SSHDevice: run an artifact's runner on a board over SSH (paramiko), like LocalDevice does here.

- Host keys are verified against the device's known_hosts (``@revoked`` honoured, see
  known_hosts.py); an unknown key is refused unless the caller explicitly asks to accept and
  record a new one (a *changed* or revoked key is always refused).
- Key authentication only (the key path must name a private key); connect and command timeouts;
  keepalive. paramiko's own log lines (its transport thread's tracebacks too) go to edgec's
  logger at debug level, never straight to stderr.
- One measurement at a time per board (lock.py), and each one says whether anything else ran on
  the board meanwhile (contention.py) and whether the artifact was built for the board's target.
- Artifacts are uploaded once into ``<workdir>/artifacts/<manifest hash>/`` on the board: to a
  temporary name, then renamed, so a half-uploaded artifact is never used; the cached files are
  checked against the manifest's digests before every run and re-uploaded when they differ.
- Every remote command is built with shlex.quote; file names are checked against traversal.
- Transient faults (connection refused, connection lost, no SSH banner) are retried with
  backoff; everything ends as one DeviceError subclass naming the board, what was happening
  (e.g. "lost mid-run after 3.2 s") and the next step.
"""

from __future__ import annotations

import hashlib
import logging
import re
import select
import shlex
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import paramiko

from edgec.artifact import read_manifest, sha256_file
from edgec.devices import contention, known_hosts, probe
from edgec.devices.base import eval_args, parse_runner_output
from edgec.devices.inventory import DeviceConfig
from edgec.devices.lock import BoardLock, LockChannelClosed
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
from edgec.stage_timing import StageTimes, StageTimingPlan, time_on
from edgec.targets import Requirements

log = logging.getLogger(__name__)
RUNNER = "the runner"  # what is happening on the board: a connection lost then is lost "mid-run"
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
TIMEOUT_STATUSES = (124, 137)  # coreutils/busybox `timeout`: timed out / killed after -k


class _ToEdgecLog(logging.Handler):
    """paramiko's log records (its transport thread's tracebacks too) become edgec debug lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            log.debug("paramiko (%s): %s", record.name, record.getMessage())
        except Exception:  # noqa: BLE001  (a logging handler must never raise)
            self.handleError(record)


def _route_paramiko_logging() -> None:
    logger = logging.getLogger("paramiko")
    if not any(isinstance(h, _ToEdgecLog) for h in logger.handlers):
        logger.addHandler(_ToEdgecLog())
    logger.propagate = False


_route_paramiko_logging()


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


def check_private_key(path: str, board: str) -> None:
    """``key`` must name a readable private key file: a public key (``.pub``) or anything else
    is an AuthError now, before any connection (it would never authenticate)."""
    fix = f"fix `key` in the device file of {board}"
    try:
        with open(path, "rb") as f:
            first = f.readline(200).strip()
    except FileNotFoundError:
        raise AuthError(f"key file {path} for board {board} does not exist; {fix} or create one "
                        f"with ssh-keygen") from None
    except OSError as exc:
        raise AuthError(f"key file {path} for board {board} cannot be read ({exc.strerror}); "
                        f"{fix} or its permissions") from None
    if first.startswith(b"-----BEGIN ") and first.endswith(b"PRIVATE KEY-----"):
        return
    if first.startswith((b"ssh-", b"ecdsa-", b"sk-")) or b"PUBLIC KEY" in first:
        private = path[:-4] if path.endswith(".pub") else "the file without .pub"
        raise AuthError(f"key {path} for board {board} is a public key; `key` must name its "
                        f"private key ({private}): {fix}")
    raise AuthError(f"key {path} for board {board} is not a private key file (it does not begin "
                    f"with '-----BEGIN ... PRIVATE KEY-----'); {fix}")


@dataclass
class _Run:
    """One locked run on the board: the runner's result, the board state around it, and what
    else ran on the board meanwhile."""

    result: dict[str, Any]
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    disturbed_by: list[str] = field(default_factory=list)
    disturbance: str = ""


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
        self._known = known_hosts.KnownHosts(known_hosts.host_name(config.host, config.port))

    # ----- public interface (the Device protocol) -------------------------------------------
    def run_runner(self, artifact_dir: Path, args: list[str],
                   timeout_s: float | None = None) -> dict[str, Any]:
        return self._retrying(lambda: self._session(Path(artifact_dir), args, timeout_s)).result

    def measure(self, artifact_dir: Path, spec: MeasureSpec) -> Measurement:
        """Measure under the board lock; the warnings say when the board was not in a state to
        be measured (governor, heat, other work) or is not the artifact's target."""
        run = self._retrying(lambda: self._session(Path(artifact_dir), spec.runner_args(), None))
        result = {**run.result, "board_state": {"before": run.before, "after": run.after},
                  "disturbed_by": run.disturbed_by}
        warnings = (*condition_warnings(run.before, run.after),
                    *([run.disturbance] if run.disturbance else []),
                    *self._target_warnings(Path(artifact_dir)))
        return Measurement.from_runner(result, tuple(warnings))

    def evaluate(self, artifact_dir: Path, data: str, start: int = 0, count: int = 0) -> dict:
        return self.run_runner(artifact_dir, eval_args(data, start, count))

    def time_stages(self, plan: StageTimingPlan) -> StageTimes:
        """Time ``plan``'s models on the board under its lock; the timing bundle and the images
        are uploaded once each, cached by content hash like artifacts and eval data."""
        return time_on(self, plan)

    def facts(self, requires: Requirements | None = None) -> dict[str, Any]:
        """Arch, OS, Python, runtimes, governor, temperature, free disk and memory; with
        ``requires`` (a target's requirements) also the modules and commands it names."""
        requires = requires or Requirements()
        modules = [m for alt in requires.modules for m in alt.split("|")]
        script = probe.facts_script(self.config.python, self.workdir, modules, requires.commands)
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

    def _target_warnings(self, artifact_dir: Path) -> list[str]:
        built_for = read_manifest(artifact_dir).get("target", {})
        built_for = built_for.get("name") if isinstance(built_for, dict) else built_for
        if not built_for or built_for == self.config.target:
            return []
        return [f"artifact built for target {built_for!r}, but board {self.name} is target "
                f"{self.config.target!r} (its device file): these latencies are not those of "
                f"{built_for!r}; build with --target {self.config.target} or profile on a "
                f"{built_for} board"]

    # ----- one locked session: upload if needed, run, read the board state ------------------
    def _session(self, artifact_dir: Path, args: list[str], timeout_s: float | None) -> _Run:
        manifest = read_manifest(artifact_dir)
        files = artifact_files(artifact_dir, manifest)
        lock = BoardLock(self._open_channel, self.config.python, self.config.lock_path, self.name,
                         wait_s=self.config.lock_wait_s)
        self._on_board("waiting for the board lock", lock.acquire)
        try:
            remote = self._ensure_artifact(artifact_dir, manifest["hash"], files, lock)
            run = self._run(remote, self._remote_args(args),
                            timeout_s or self.config.command_timeout_s, lock)
        except _Transient:
            lock.abandon()  # the holder sees the connection end: it stops the runner, then frees
            raise
        except BaseException:  # Ctrl-C too: the runner is stopped before the lock is free
            self._release_quietly(lock)
            raise
        self._release_quietly(lock)
        return run

    def _on_board(self, what: str, call):
        """``call()``, a request to the lock holder; a dead connection is transient (and says
        what it interrupted, after how long), a holder that could not start is named."""
        started = time.monotonic()
        try:
            return call()
        except LockChannelClosed as exc:
            if self._transport_gone():
                raise _Transient(self._lost(EOFError("the session ended"), what,
                                            time.monotonic() - started)) from exc
            raise self._python_failed(exc.status, exc.stderr, what) from exc
        except (OSError, EOFError, self.paramiko.SSHException) as exc:
            raise _Transient(self._lost(exc, what, time.monotonic() - started)) from exc

    def _transport_gone(self, wait_s: float = 0.5) -> bool:
        """A session may end a moment before paramiko notices the whole connection went."""
        deadline = time.monotonic() + wait_s
        while self._transport_alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _python_failed(self, status: int, stderr: str, what: str) -> RemoteCommandError:
        python, tail = self.config.python, stderr.strip()[-500:]
        if status == 127 or "not found" in tail or "No such file" in tail:
            return RemoteCommandError(
                f"board {self.name}: python {python!r} (the `python` of its device file) was not "
                f"found on the board; set `python` to the board's interpreter that has numpy and "
                f"the runtime (`command -v python3` on the board), then `edgec devices check "
                f"{self.name}`")
        return RemoteCommandError(f"board {self.name}: {what} failed (exit {status}): {tail}; run "
                                  f"`edgec devices check {self.name}`")

    def _release_quietly(self, lock: BoardLock) -> None:
        try:
            lock.release()
        except (OSError, EOFError, self.paramiko.SSHException, DeviceError) as exc:
            lock.abandon()
            log.warning("board %s: could not release the lock (%s); its holder on the board "
                        "frees it once the connection ends", self.name, exc)

    def _run(self, remote: str, args: list[str], timeout_s: float, lock: BoardLock) -> _Run:
        """The runner, run by the lock holder (bounded by `timeout` on the board), with the
        board's state and processes read just before and just after it."""
        argv = ["timeout", "-k", "5", str(max(1, round(timeout_s))), self.config.python,
                f"{remote}/runner.py", *args]
        env = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
        ran = self._on_board(RUNNER, lambda: lock.run(argv, env, probe.STATE_SCRIPT,
                                                      timeout_s + 30))
        status, out, err = ran["status"], ran["stdout"], ran["stderr"]
        self._check_run_status(status, err, timeout_s)
        found = contention.others(ran["before"], ran["after"])
        window = ran["after"]["uptime"] - ran["before"]["uptime"]
        return _Run(parse_runner_output(out, err, f"board {self.name}"),
                    probe.parse(ran["before_state"]), probe.parse(ran["after_state"]), found,
                    contention.disturbance_warning(found, window) if found else "")

    def _check_run_status(self, status: int, err: str, timeout_s: float) -> None:
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

    # ----- the artifact cache on the board ---------------------------------------------------
    def _ensure_artifact(self, artifact_dir: Path, key: str, files: dict[str, str],
                         lock: BoardLock) -> str:
        q = shlex.quote
        remote = f"{self.workdir}/artifacts/{key}"
        found = self._on_board("the cache check", lambda: lock.digests(remote, list(files), 120))
        if found == files:
            return remote
        if found is not None:
            bad = sorted(n for n in files if found.get(n) != files[n])
            log.warning("board %s: cached artifact %s differs in %s; re-uploading",
                        self.name, key[:12], ", ".join(bad))
            self._exec_ok(f"rm -rf -- {q(remote)}", 60, "cache cleanup")
        self._upload(artifact_dir, remote, list(files))
        return remote

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
            raise _Transient(self._lost(exc, "the upload")) from exc
        try:
            self._exec(f"rm -rf -- {shlex.quote(tmp)}", 60, "upload cleanup")
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
        first = None
        for attempt in range(attempts):
            try:
                return operation()
            except _Transient as fault:
                self.close()
                first = first or fault.error
                if attempt + 1 == attempts:
                    raise _final_error(fault.error, first, attempts) from fault
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
        if cfg.key:
            check_private_key(cfg.key, self.name)
        known_path = Path(cfg.known_hosts)
        self._known = known_hosts.load(known_path, cfg.host, cfg.port)
        client = paramiko.SSHClient()
        known_hosts.install(client, self._known, known_path, self.name, self.accept_new_host_key)
        client.set_missing_host_key_policy(
            _AcceptNewKey(known_path, self.name, self._known) if self.accept_new_host_key
            else _RejectUnknownKey(self._known))
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
        host_key = self._host_key_error(exc, where, check)
        if host_key is not None:
            return host_key
        if isinstance(exc, p.PasswordRequiredException):
            return AuthError(f"key {cfg.key} for board {self.name} is passphrase-protected; load "
                             f"it into ssh-agent and leave `key` empty in the device file")
        if isinstance(exc, p.AuthenticationException):
            return AuthError(
                f"board {self.name} ({where}) refused key {cfg.key or '(agent)'} for user "
                f"{cfg.user or '(local user)'}; install the public key on the board with "
                f"`{_copy_id_command(cfg)}` or fix `user`/`key` in its device file")
        if isinstance(exc, p.SSHException) and "private key" in str(exc):
            return AuthError(f"key {cfg.key} for board {self.name} cannot be used ({exc}); fix "
                             f"`key` in its device file")
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
                f"cannot connect to board {self.name} at {where} ({_detail(exc)}); check the "
                f"network and sshd on the board, then {check}"))
        return exc

    def _host_key_error(self, exc: BaseException, where: str, check: str) -> HostKeyError | None:
        known = self.config.known_hosts
        key = getattr(exc, "key", None)
        if isinstance(exc, _RevokedHostKey) or (
                isinstance(exc, self.paramiko.BadHostKeyException) and self._known.is_revoked(key)):
            return HostKeyError(
                f"board {self.name} ({where}) presented host key {_fingerprint(key)}, which "
                f"{known} marks @revoked; edgec never accepts a revoked key. Give the board a new "
                f"host key, check its fingerprint on the board and record it with {check} "
                f"--accept-new-host-key")
        if isinstance(exc, self.paramiko.BadHostKeyException):
            return HostKeyError(
                f"board {self.name} ({where}) presented a host key that does NOT match "
                f"{known} (got {_fingerprint(key)}); this may be an attack. If the board was "
                f"reinstalled, remove the old entry with `ssh-keygen -R "
                f"{shlex.quote(self._known.name)} -f {shlex.quote(known)}` and run {check} "
                f"--accept-new-host-key")
        if isinstance(exc, _UnknownHostKey):
            return HostKeyError(
                f"board {self.name} ({where}) is not in {known} (its key is {exc.fingerprint}); "
                f"verify that fingerprint on the board, then record it with {check} "
                f"--accept-new-host-key")
        return None

    def _lost(self, exc: BaseException, what: str = "", elapsed_s: float | None = None):
        """The connection died: say what was happening and for how long."""
        during = "" if not what else " mid-run" if what == RUNNER else f" during {what}"
        if what and elapsed_s is not None:
            during += f" after {elapsed_s:.1f} s"
        return ConnectError(f"connection to board {self.name} ({self.config.host}:"
                            f"{self.config.port}) was lost{during} ({_detail(exc)}); check that "
                            f"the board is up and sshd runs, then `edgec devices check "
                            f"{self.name}`")

    def _sftp(self):
        try:
            return self._connected().open_sftp()
        except (OSError, EOFError, self.paramiko.SSHException) as exc:
            raise _Transient(self._lost(exc, "opening SFTP")) from exc

    @staticmethod
    def _sftp_mkdir(sftp, path: str) -> None:
        try:
            sftp.mkdir(path)
        except OSError:
            sftp.stat(path)  # it already exists; anything else raises again

    def _exec_ok(self, command: str, timeout_s: float, what: str) -> str:
        status, out, err = self._exec(command, timeout_s, what)
        if status in TIMEOUT_STATUSES or status != 0:
            self._raise_if_disk_full(err)
            raise RemoteCommandError(f"{what} on board {self.name} failed (exit {status}): "
                                     f"{err.strip()[-500:]}; run `edgec devices check "
                                     f"{self.name}`")
        return out

    def _open_channel(self, command: str):
        """A new session on the board running ``command`` (a lost connection is transient)."""
        try:
            channel = self._connected().get_transport().open_session(
                timeout=self.config.connect_timeout_s)
            channel.exec_command(command)
        except _Transient:
            raise
        except (OSError, EOFError, self.paramiko.SSHException) as exc:
            raise _Transient(self._lost(exc, "opening a session")) from exc
        return channel

    def _exec(self, command: str, timeout_s: float, what: str = "a command") -> tuple[int, str, str]:
        """Run ``command`` on the board; (exit status, stdout, stderr). Deadline enforced here."""
        channel = self._open_channel(command)
        out, err = bytearray(), bytearray()
        started = time.monotonic()
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
                if time.monotonic() - started > timeout_s:
                    raise DeviceTimeout(f"{what} on board {self.name} exceeded {timeout_s:.0f} s;"
                                        f" raise command_timeout_s in its device file")
            status = channel.recv_exit_status()
        finally:
            channel.close()
        if status == -1:  # killed by a signal, or the connection died: tell them apart
            for _ in range(10):
                if not self._transport_alive():
                    raise _Transient(self._lost(EOFError("the session ended without a status"),
                                                what, time.monotonic() - started))
                time.sleep(0.05)
        return status, out.decode(errors="replace"), err.decode(errors="replace")


def _detail(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _final_error(last: DeviceError, first: DeviceError, attempts: int) -> DeviceError:
    """The error after the last retry; it names the first fault too when that differs."""
    if str(first) == str(last):
        return type(last)(f"{last} (after {attempts} attempts)")
    return type(last)(f"{first}; then {attempts - 1} more attempt(s) failed, the last: {last}")


def _copy_id_command(config: DeviceConfig) -> str:
    """The ssh-copy-id line that installs the public key, every part shell-quoted."""
    q = shlex.quote
    public = q(f"{config.key}.pub") if config.key else "~/.ssh/id_ed25519.pub"
    login = f"{config.user}@{config.host}" if config.user else config.host
    return f"ssh-copy-id -i {public} -p {config.port} {q(login)}"


class _UnknownHostKey(Exception):
    def __init__(self, fingerprint: str):
        super().__init__(fingerprint)
        self.fingerprint = fingerprint


class _RevokedHostKey(Exception):
    def __init__(self, key):
        super().__init__(_fingerprint(key))
        self.key = key


def _fingerprint(key) -> str:
    import base64

    if key is None:
        return "(unknown)"
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class _RejectUnknownKey(paramiko.MissingHostKeyPolicy):
    """Refuse a host missing from known_hosts (paramiko's RejectPolicy, plus a fingerprint)."""

    def __init__(self, known: known_hosts.KnownHosts):
        self.known = known

    def missing_host_key(self, client, hostname, key):
        if self.known.is_revoked(key):
            raise _RevokedHostKey(key)
        raise _UnknownHostKey(f"{key.get_name()} {_fingerprint(key)}")


class _AcceptNewKey(paramiko.MissingHostKeyPolicy):
    """Record an unknown host's key in known_hosts (only when the user asked for it)."""

    def __init__(self, known_hosts_path: Path, board: str, known: known_hosts.KnownHosts):
        self.known_hosts, self.board, self.known = known_hosts_path, board, known

    def missing_host_key(self, client, hostname, key):
        if self.known.is_revoked(key):
            raise _RevokedHostKey(key)
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        with open(self.known_hosts, "a") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.warning("board %s: recorded new host key %s %s for %s in %s", self.board,
                    key.get_name(), _fingerprint(key), hostname, self.known_hosts)
