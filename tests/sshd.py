"""A real OpenSSH server for tests: loopback (or a network namespace), its own keys and config.

Never targets anything but 127.0.0.1 or an address inside a namespace this module created.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from edgec.measure import MeasureSpec

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
REPO = Path(__file__).resolve().parent.parent  # `python -m edgec.cli` from here runs this tree
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"


def missing_reason() -> str:
    """Why no test sshd can run here ('' when it can)."""
    if not Path(SSHD).is_file():
        return "OpenSSH server (sshd) is not installed; apt-get install openssh-server"
    if not Path(SSH_KEYGEN).is_file():
        return "ssh-keygen is not installed; apt-get install openssh-client"
    return ""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def keygen(path: Path) -> Path:
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "edgec-test", "-f",
                    str(path)], check=True)
    path.chmod(0o600)
    return path


def _descendants(pid: int) -> list[int]:
    """Processes started (transitively) by ``pid``: the sessions of our sshd."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


class SSHServer:
    """``sshd -D`` on ``host:port`` with a fresh host key, client key and known_hosts."""

    def __init__(self, root: Path, host: str = "127.0.0.1", netns: str = ""):
        self.root, self.host, self.netns = Path(root), host, netns
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port() if not netns else 2222
        self.host_key = keygen(self.root / "ssh_host_ed25519_key")
        self.client_key = keygen(self.root / "id_ed25519")
        (self.root / "authorized_keys").write_text(Path(f"{self.client_key}.pub").read_text())
        self.known_hosts = self.root / "known_hosts"
        self.write_known_hosts(Path(f"{self.host_key}.pub"))
        # this board's lock file as the board sees it (its own, so tests never wait for other
        # work on this machine; the CLI test uses the default /tmp/edgec-board.lock)
        self.lock_path = str(self.root / "board.lock")
        self.config = self.root / "sshd_config"
        self.config.write_text("\n".join([
            f"Port {self.port}", f"ListenAddress {host}", f"HostKey {self.host_key}",
            f"PidFile {self.root / 'sshd.pid'}", f"AuthorizedKeysFile {self.root}/authorized_keys",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes", "PermitRootLogin prohibit-password", "StrictModes no",
            "UsePAM no", "Subsystem sftp internal-sftp", "MaxStartups 50", "MaxSessions 50",
            "LogLevel ERROR", ""]))
        self.log = self.root / "sshd.log"
        self.process: subprocess.Popen | None = None

    def write_known_hosts(self, public_key: Path) -> None:
        name = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        kind, body = public_key.read_text().split()[:2]
        self.known_hosts.write_text(f"{name} {kind} {body}\n")

    def start(self) -> SSHServer:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation directory
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([*prefix, SSHD, "-D", "-e", "-f", str(self.config)],
                                            stdout=log, stderr=log)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.log.read_text()[-2000:]}")
            if self._speaks():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"sshd did not start on {self.host}:{self.port}")

    def _speaks(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                return s.recv(4).startswith(b"SSH-")
        except OSError:
            return False

    def kill(self) -> None:
        """Kill sshd and every session it started (as a crash or power loss would)."""
        if self.process is None:
            return
        for pid in [self.process.pid, *_descendants(self.process.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        self.kill()


class Namespace:
    """A network namespace joined to this host by a veth pair: a board on 10.77.N.2."""

    def __init__(self):
        n = 100 + os.getpid() % 150
        self.name = f"edgec-ssh-{os.getpid()}"
        self.outer = f"veg{os.getpid() % 100000}a"
        self.inner = f"veg{os.getpid() % 100000}b"
        self.host_ip, self.board_ip = f"10.77.{n}.1", f"10.77.{n}.2"

    def create(self) -> Namespace:
        steps = [
            ["ip", "netns", "add", self.name],
            ["ip", "link", "add", self.outer, "type", "veth", "peer", "name", self.inner],
            ["ip", "link", "set", self.inner, "netns", self.name],
            ["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.outer],
            ["ip", "link", "set", self.outer, "up"],
            ["ip", "netns", "exec", self.name, "ip", "addr", "add", f"{self.board_ip}/30", "dev",
             self.inner],
            ["ip", "netns", "exec", self.name, "ip", "link", "set", self.inner, "up"],
            ["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"],
        ]
        for step in steps:
            subprocess.run(step, check=True, capture_output=True)
        return self

    def delete(self) -> None:
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    @staticmethod
    def missing_reason() -> str:
        if os.geteuid() != 0 or not shutil.which("ip"):
            return "network namespaces need root and iproute2 (apt-get install iproute2)"
        probe = f"edgec-probe-{os.getpid()}"
        done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if done.returncode != 0:
            return f"this machine does not allow network namespaces: {done.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return ""


def artifact_variant(source: Path, dest: Path, prelude: str) -> Path:
    """A copy of an artifact whose runner first runs ``prelude`` (Python), with a new hash.

    The manifest's digests and hash are updated, so the board sees a genuine, different artifact.
    """
    import hashlib
    import json
    import textwrap

    shutil.copytree(source, dest)
    runner = dest / "runner.py"
    text = runner.read_text().replace("def main(argv=None):\n",
                                      "def main(argv=None):\n" + textwrap.indent(prelude, "    ") + "\n", 1)
    if text == runner.read_text():
        raise RuntimeError("runner.py has no `def main(argv=None):` to hook; update this helper")
    runner.write_text(text)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["files"]["runner.py"] = hashlib.sha256(runner.read_bytes()).hexdigest()
    manifest["hash"] = hashlib.sha256((manifest["hash"] + prelude).encode()).hexdigest()
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dest


QUICK = MeasureSpec(warmup=5, repeat=30, min_time_s=0.1)  # a short protocol for tests


def flock_holders(path: str | Path) -> set[int]:
    """Pids holding a flock on ``path`` (read from /proc/locks; observing never takes it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return set()
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = set()
    for line in Path("/proc/locks").read_text().splitlines():
        parts = line.split()
        if len(parts) > 5 and parts[1] == "FLOCK" and parts[5] == where:
            holders.add(int(parts[4]))
    return holders


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False


def lock_holder(lock_path: str, idle_s: float, runner: list[str] | None = None) -> subprocess.Popen:
    """The board-side lock holder of a client that is not there (on the loopback board, a
    process of this machine), running ``runner`` if given. Its stdin stays open and silent, as
    when the client's host died. Returns once it holds the lock."""
    from edgec.devices.lock import ONBOARD_SOURCE

    holder = subprocess.Popen([sys.executable, "-c", ONBOARD_SOURCE, "hold", lock_path,
                               str(idle_s)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    line = holder.stdout.readline()
    if not line.startswith("acquired"):
        holder.kill()
        raise RuntimeError(f"the test's lock holder did not get the lock: {line!r}")
    if runner:
        holder.stdin.write(f"run {json.dumps({'argv': runner, 'env': {}, 'state': 'true'})}\n")
        holder.stdin.flush()
    return holder


def fake_runner(folder: Path, seconds: float = 60) -> list[str]:
    """The command line of a process that looks like an edgec runner (``python .../runner.py
    measure``): it writes its pid to ``folder/pid`` and sleeps."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "runner.py").write_text(
        f"import os, pathlib, time\npathlib.Path({str(folder / 'pid')!r}).write_text("
        f"str(os.getpid()))\ntime.sleep({seconds})\n")
    return [sys.executable, str(folder / "runner.py"), "measure"]


def wait_for_pid(folder: Path, timeout_s: float = 30) -> int:
    """The pid a fake runner wrote to ``folder/pid``."""
    deadline = time.monotonic() + timeout_s
    while not (folder / "pid").exists() or not (folder / "pid").read_text():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no fake runner started in {folder}")
        time.sleep(0.05)
    return int((folder / "pid").read_text())


def cpu_hog() -> subprocess.Popen:
    """A process that keeps one CPU busy."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def board_config(server: SSHServer, workdir: Path, name: str = "loopback", **overrides):
    """A device file's worth of settings for a test sshd; the board's Python is ours."""
    from edgec.devices.inventory import DeviceConfig

    values = dict(name=name, target="local", host=server.host, port=server.port, user="root",
                  key=str(server.client_key), known_hosts=str(server.known_hosts),
                  workdir=str(workdir), lock_path=server.lock_path, python=sys.executable,
                  connect_timeout_s=5.0, command_timeout_s=120.0, retries=1, retry_backoff_s=0.1)
    return DeviceConfig(**{**values, **overrides})
