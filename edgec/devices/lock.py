"""The board lock: one measurement at a time per board, held *on the board*.

The lock is a symlink whose target names its holder (``host:pid:since:token``): creating a
symlink is atomic on every POSIX file system, needs no free data blocks for such a short target,
and the holder can be read back in the same step. A lock is stale when its holder process is gone
(same client host, pid not alive), when it is older than the longest a runner may run, or when it
is one of ours from a connection that was lost; a stale lock is broken and the runner it left
behind (its pid is in ``run.pid``) is stopped.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shlex
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from edgec.errors import DeviceBusy, DeviceError, RemoteDiskFull

log = logging.getLogger(__name__)

# execute(shell_script, timeout_s) -> (exit_status, stdout, stderr)
Execute = Callable[[str, float], tuple[int, str, str]]


@dataclass(frozen=True)
class Holder:
    """Who holds a board lock: client host, client pid, board time acquired, random token."""

    host: str
    pid: int
    since: int
    token: str

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        match = re.fullmatch(r"([A-Za-z0-9.-]+):(\d+):(\d+):([0-9a-f]+)", text.strip())
        if not match:
            return None
        host, pid, since, token = match.groups()
        return cls(host, int(pid), int(since), token)

    def text(self) -> str:
        return f"{self.host}:{self.pid}:{self.since}:{self.token}"


def client_host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:64] or "unknown"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BoardLock:
    """Acquire/release the lock file ``lock_path`` on a board through ``execute``."""

    def __init__(self, execute: Execute, workdir: str, board: str, stale_after_s: float,
                 wait_s: float, reclaim: set[str] | None = None, poll_s: float = 0.1):
        self.execute, self.board = execute, board
        self.workdir = workdir
        self.path = f"{workdir}/board.lock"
        self.pidfile = f"{workdir}/run.pid"
        self.stale_after_s, self.wait_s, self.poll_s = stale_after_s, wait_s, poll_s
        self.reclaim = reclaim if reclaim is not None else set()
        self.token = secrets.token_hex(8)
        self.holder_text = ""

    def acquire(self) -> BoardLock:
        """Wait until the lock is ours; DeviceBusy after ``wait_s``."""
        deadline = time.monotonic() + self.wait_s
        delay = self.poll_s
        while True:
            state, holder, now = self._try()
            if state == "acquired":
                self.holder_text = holder
                return self
            parsed = Holder.parse(holder)
            reason = self._stale_reason(parsed, now)
            if reason:
                log.warning("board %s: breaking stale lock %s (%s)", self.board, holder, reason)
                self._break(holder, parsed)
                continue
            if time.monotonic() > deadline:
                age = now - parsed.since if parsed else -1
                raise DeviceBusy(
                    f"board {self.board} is busy: another measurement ({holder}) has held its "
                    f"lock for {age} s; wait for it, or if that process is gone remove "
                    f"{self.path} on the board")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    def _try(self) -> tuple[str, str, int]:
        q = shlex.quote
        prefix, suffix = f"{client_host()}:{os.getpid()}:", f":{self.token}"
        script = (
            f"mkdir -p {q(self.workdir)} || exit 3\n"
            f"H={q(prefix)}$(date +%s){q(suffix)}\n"
            f"if err=$(ln -s \"$H\" {q(self.path)} 2>&1); then echo \"acquired $H\"\n"
            f"elif [ -L {q(self.path)} ]; then echo \"held $(readlink {q(self.path)}) "
            f"$(date +%s)\"\nelse echo \"failed $err\"; exit 4; fi\n")
        status, out, err = self.execute(script, 30)
        words = out.split()
        if status == 0 and words[:1] == ["acquired"]:
            return "acquired", words[1], 0
        if status == 0 and words[:1] == ["held"] and len(words) == 3:
            return "held", words[1], int(words[2])
        detail = (out + err).strip()
        if "No space left" in detail:
            raise RemoteDiskFull(f"board {self.board}: no space left in {self.workdir} even for "
                                 f"the lock; free disk space on the board or set another workdir")
        raise DeviceError(f"board {self.board}: cannot create the lock {self.path} ({detail}); "
                          f"check that the workdir is writable")

    def _stale_reason(self, holder: Holder | None, now: int) -> str:
        if holder is None:
            return "unreadable holder"
        if holder.token in self.reclaim:
            return "ours, from a lost connection"
        if now - holder.since > self.stale_after_s:
            return f"held for {now - holder.since} s, longer than any run may take"
        if holder.host == client_host() and not pid_alive(holder.pid):
            return f"holder pid {holder.pid} on {holder.host} is gone"
        return ""

    def _break(self, holder_text: str, holder: Holder | None) -> None:
        """Remove the lock only if it is still the one we judged stale; stop its runner."""
        q = shlex.quote
        token = holder.token if holder else "-"
        script = (
            f"if [ \"$(readlink {q(self.path)})\" = {q(holder_text)} ]; then\n"
            f"  if [ -f {q(self.pidfile)} ] && read t p < {q(self.pidfile)} && "
            f"[ \"$t\" = {q(token)} ]; then kill \"$p\" 2>/dev/null; fi\n"
            f"  rm -f {q(self.pidfile)} {q(self.path)}\nfi\n")
        self.execute(script, 30)
        self.reclaim.discard(token)

    def record_pid(self, shell_var: str) -> str:
        """Shell that records the runner's pid (in ``$shell_var``) for stale-lock recovery."""
        q = shlex.quote
        return f"{{ echo {q(self.token)} ${shell_var} > {q(self.pidfile)}; }} 2>/dev/null"

    def release(self) -> None:
        q = shlex.quote
        script = (f"if [ \"$(readlink {q(self.path)})\" = {q(self.holder_text)} ]; then "
                  f"rm -f {q(self.pidfile)} {q(self.path)}; fi")
        self.execute(script, 30)
