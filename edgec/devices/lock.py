"""The board lock: one measurement at a time per board, whoever and wherever the client is.

The lock is ``flock`` on one well-known file of the board (``lock_path``, default
``/tmp/edgec-board.lock``, readable by every user), so every device entry, workdir and user of
that board shares it. It is held by one process on the board (``onboard.py hold``) that lives as
long as our session talks to it and that also runs the runner, which inherits the lock: the
kernel frees the board only when both are gone, so a lock is never stale and never free while
our runner runs. The holder stops the runner before it quits: on release, when the connection
closes or dies, or when heartbeats stop because the client's host died.
"""

from __future__ import annotations

import json
import logging
import select
import shlex
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgec.errors import DeviceBusy, DeviceError, DeviceTimeout

log = logging.getLogger(__name__)

ONBOARD_SOURCE = (Path(__file__).parent / "onboard.py").read_text()
HEARTBEAT_S = 2.0  # how often the client tells the holder it is alive
HOLDER_IDLE_S = 30.0  # without a heartbeat for this long, the holder stops our runner and quits
STATUS_EVERY_S = 30.0  # how often a waiting client says what it waits for


class LockChannelClosed(DeviceError):
    """The holder on the board ended before it answered (its stderr and exit status follow)."""

    def __init__(self, message: str, status: int, stderr: str):
        super().__init__(message)
        self.status, self.stderr = status, stderr


def onboard_command(python: str, *args: str) -> str:
    """Shell command that runs ``onboard.py ARGS`` with the board's Python."""
    q = shlex.quote
    return f"{q(python)} -c {q(ONBOARD_SOURCE)} " + " ".join(q(a) for a in args)


def describe_holder(status: dict[str, Any]) -> str:
    """``held by pid 12 (user pi) for 40 s; edgec runner pid 13 running for 38 s``."""
    if not status.get("holder"):
        text = "held by a process edgec cannot see (another PID namespace?)"
    else:
        text = f"held by pid {status['holder']} (user {status.get('user', '?')})"
        if status.get("held_s") is not None:
            text += f" for {status['held_s']} s"
    runners = status.get("runners") or []
    text += "; " + (", ".join(f"edgec runner pid {pid} running for {age} s" for pid, age in runners)
                    if runners else "no edgec runner is running")
    return text


class BoardLock:
    """The board lock, held through a holder session on the board that also runs the runner.

    ``open_channel(command)`` starts ``command`` on the board and returns its channel (paramiko's
    Channel API: send, recv, recv_stderr, exit_status_ready, recv_exit_status, close, fileno).
    """

    def __init__(self, open_channel: Callable[[str], Any], python: str, path: str, board: str,
                 wait_s: float, idle_s: float = HOLDER_IDLE_S, heartbeat_s: float = HEARTBEAT_S):
        self.open_channel, self.python, self.path, self.board = open_channel, python, path, board
        self.wait_s, self.idle_s, self.heartbeat_s = wait_s, idle_s, heartbeat_s
        self.holder_pid = 0
        self._channel = None
        self._buffer = bytearray()
        self._stop = threading.Event()
        self._send_lock = threading.Lock()

    # ----- acquire ----------------------------------------------------------------------------
    def acquire(self) -> BoardLock:
        """Wait until the lock is ours, saying what we wait for; DeviceBusy after ``wait_s``."""
        self._channel = self.open_channel(onboard_command(self.python, "hold", self.path,
                                                          f"{self.idle_s:g}"))
        try:
            return self._wait()
        except BaseException:  # Ctrl-C too: our holder on the board gives up when we close
            self.abandon()
            raise

    def _wait(self) -> BoardLock:
        started = time.monotonic()
        deadline, said, last = started + self.wait_s, 0.0, {}
        while True:
            line = self._line(min(deadline, said + STATUS_EVERY_S) if said else deadline)
            if line is None and time.monotonic() >= deadline:
                raise DeviceBusy(
                    f"board {self.board} is busy: its lock {self.path} is {describe_holder(last)}; "
                    f"waited {self.wait_s:.0f} s (lock_wait_s). Try again later, raise lock_wait_s "
                    f"in the device file, or if that process is stuck stop it on the board")
            if line is None:  # time to say again what we are waiting for
                self._send("?")
                said = time.monotonic()
                continue
            kind, _, rest = line.partition(" ")
            if kind == "acquired":
                self.holder_pid = int(rest)
                self._start_heartbeats()
                return self
            if kind == "busy":
                last, said = json.loads(rest), time.monotonic()
                log.warning("board %s: waiting for its lock (%s), %s; waited %.0f s of %.0f s",
                            self.board, self.path, describe_holder(last), said - started,
                            self.wait_s)
            elif kind == "error":
                raise DeviceError(
                    f"board {self.board}: {json.loads(rest)}; the lock file must be readable by "
                    f"every user of the board (`chmod 644 {self.path}` as its owner), or set "
                    f"another lock_path for every device entry of this board")

    # ----- requests while held ------------------------------------------------------------------
    def digests(self, root: str, names: list[str], timeout_s: float) -> dict[str, Any] | None:
        """sha256 of ``names`` under ``root`` on the board (None: no such directory)."""
        return self._request("digests", {"root": root, "names": names}, timeout_s)

    def run(self, argv: list[str], env: dict[str, str], state_script: str,
            timeout_s: float) -> dict[str, Any]:
        """Run ``argv`` under the lock; its status, stdout and stderr, the board state (output
        of ``state_script``) and a process snapshot before and after it."""
        return self._request("run", {"argv": argv, "env": env, "state": state_script}, timeout_s)

    def _request(self, verb: str, payload: dict[str, Any], timeout_s: float):
        self._send(f"{verb} {json.dumps(payload)}")
        deadline = time.monotonic() + timeout_s
        while True:
            line = self._line(deadline)
            if line is None:
                raise DeviceTimeout(f"{verb} on board {self.board} took longer than "
                                    f"{timeout_s:.0f} s; raise command_timeout_s in its device "
                                    f"file")
            answer, _, rest = line.partition(" ")
            if answer == {"run": "ran"}.get(verb, verb):
                return json.loads(rest)

    def _send(self, line: str) -> None:
        with self._send_lock:
            self._channel.sendall((line + "\n").encode())

    def _line(self, until: float) -> str | None:
        """The holder's next stdout line; None at ``until``; LockChannelClosed at its end."""
        while b"\n" not in self._buffer:
            left = until - time.monotonic()
            if left <= 0:
                return None
            select.select([self._channel], [], [], min(left, 1.0))
            if self._channel.recv_ready():
                while self._channel.recv_ready():
                    self._buffer += self._channel.recv(1 << 16)
            elif self._channel.exit_status_ready() or self._channel.closed:
                self._closed()
        end = self._buffer.index(b"\n")
        line = bytes(self._buffer[:end]).decode(errors="replace").strip()
        del self._buffer[:end + 1]
        return line

    def _closed(self) -> None:
        status = self._channel.recv_exit_status()
        err = b""
        while self._channel.recv_stderr_ready():
            err += self._channel.recv_stderr(1 << 16)
        self._channel.close()
        raise LockChannelClosed(f"the lock holder on board {self.board} ended (exit {status})",
                                status, err.decode(errors="replace"))

    def _start_heartbeats(self) -> None:
        self._stop.clear()
        threading.Thread(target=self._beat, name=f"edgec-lock-{self.board}", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._send(".")
            except Exception:  # noqa: BLE001  (the connection is gone; the session will see it)
                return

    # ----- release ----------------------------------------------------------------------------
    def release(self, timeout_s: float = 30.0) -> None:
        """Ask the holder to stop the runner (if it still runs) and free the lock; wait for it."""
        self._stop.set()
        if self._channel is None:
            return
        try:
            self._send("r")
            deadline = time.monotonic() + timeout_s
            while (line := self._line(deadline)) not in ("released", None):
                pass
            if line is None:
                log.warning("board %s: the lock holder did not confirm its release within %.0f s",
                            self.board, timeout_s)
        except LockChannelClosed:
            pass  # it ended on its own (idle, or the connection closed): same outcome
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Close our end. The holder sees it, stops the runner and frees the lock by itself."""
        self._stop.set()
        if self._channel is not None:
            self._channel.close()
            self._channel = None
