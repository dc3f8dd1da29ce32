"""Runs ON THE BOARD: sent as source, started as ``PYTHON -c SOURCE hold LOCK IDLE_S``.

Standard library only, Python 3.6+, Linux ``/proc``.

``hold LOCK IDLE_S``
    The board lock, and the one process that runs the runner under it. Takes ``flock(LOCK_EX)``
    on LOCK, one file per board that every user can open (the kernel drops the lock when this
    process ends, so it is never stale), then serves its client on stdin, one command a line:
    ``.`` heartbeat, ``?`` status (while waiting), ``digests JSON`` (sha256 of cached files),
    ``run JSON`` (board state and process snapshot, the runner, snapshot and state again; the
    runner inherits the lock, so even if this process is killed the board stays locked until the
    runner is gone), ``r`` release. It answers on stdout, one line each: ``busy JSON`` (who holds
    the lock, for how long, which edgec runners run), ``acquired PID``, ``digests JSON``,
    ``ran JSON``, ``released``, ``error JSON``. On release, at stdin's end (the connection closed
    or died) or after IDLE_S without a line (the client's host died), it stops the runner and
    waits until it is gone, and only then exits and frees the board.

Process snapshots hold pids, names, CPU ticks, start times and whether each is an edgec runner,
never a command line, which may hold another user's secrets.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import resource
import select
import signal
import subprocess
import sys
import threading
import time

HZ = os.sysconf("SC_CLK_TCK")
RUNNER_MODES = ("measure", "eval", "cpu", "time-stages", "measure-set")
OUTPUT = threading.Lock()
RUNNING = []  # the runner's Popen while one runs


def say(text):
    with OUTPUT:
        try:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        except OSError:  # the client is gone; what we do next does not depend on it
            pass


def read(path, mode="r"):
    with open(path, mode) as f:
        return f.read()


def stat_fields(pid):
    """(name, fields after the name) of /proc/PID/stat; fields[0] is the state."""
    text = read(f"/proc/{pid}/stat")
    return text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()


def uptime():
    return float(read("/proc/uptime").split()[0])


def pids():
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def is_runner(pid):
    """An edgec runner: ``... runner.py MODE ...``, MODE one of RUNNER_MODES (argv only, never
    printed)."""
    try:
        argv = read(f"/proc/{pid}/cmdline", "rb").split(b"\0")
    except OSError:
        return False
    return any(os.path.basename(a) == b"runner.py" and argv[i + 1].decode(errors="replace")
               in RUNNER_MODES for i, a in enumerate(argv[:-1]))


def alive(pid):
    try:
        return stat_fields(pid)[1][0] not in ("Z", "X")
    except (OSError, ValueError, IndexError):
        return False


def age_s(pid, now):
    try:
        return round(now - int(stat_fields(pid)[1][19]) / HZ)
    except (OSError, ValueError, IndexError):
        return None


def user_of(pid):
    try:
        uid = int(next(line.split()[1] for line in read(f"/proc/{pid}/status").splitlines()
                       if line.startswith("Uid:")))
    except (OSError, StopIteration, ValueError, IndexError):
        return "?"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def snapshot():
    """Every process's CPU ticks, the whole board's busy ticks (/proc/stat) and our children's
    (the runner's, once it is reaped)."""
    procs = []
    for pid in pids():
        try:
            name, fields = stat_fields(pid)
            procs.append([pid, name, int(fields[11]) + int(fields[12]), int(fields[19]),
                          is_runner(pid)])
        except (OSError, ValueError, IndexError):
            continue
    cpu = [int(v) for v in read("/proc/stat").split("\n", 1)[0].split()[1:8]]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"hz": HZ, "uptime": uptime(), "self": [os.getpid(), os.getppid()], "procs": procs,
            "busy": sum(cpu) - cpu[3] - cpu[4],  # user nice system [idle iowait] irq softirq
            "children": round((children.ru_utime + children.ru_stime) * HZ)}


# ----- the lock ---------------------------------------------------------------------------------
def open_lock(path):
    """Open LOCK read-only (enough for flock); create it readable by every user if missing."""
    flags = os.O_RDONLY | os.O_NOFOLLOW
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        pass
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return os.open(path, flags)
    os.fchmod(fd, 0o644)  # whatever our umask: every user of the board must be able to open it
    return fd


def lock_holder(fd):
    """The pid holding the flock on FD's file, from /proc/locks (None if unknown)."""
    st = os.fstat(fd)
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in read("/proc/locks").splitlines():
        parts = line.split()
        if len(parts) > 5 and parts[1] == "FLOCK" and parts[5] == where:
            return int(parts[4])
    return None


def status(fd):
    now = uptime()
    holder = lock_holder(fd)
    runners = [[pid, age_s(pid, now)] for pid in pids() if pid != os.getpid() and is_runner(pid)]
    return {"holder": holder, "user": user_of(holder) if holder else "?",
            "held_s": age_s(holder, now) if holder else None, "runners": runners}


def wait_for_lock(fd):
    """Block in flock (no polling on a board that is measuring); answer ``?`` meanwhile."""
    got_r, got_w = os.pipe()

    def take():
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(got_w, b"x")

    threading.Thread(target=take, daemon=True).start()
    if not select.select([got_r], [], [], 0.05)[0]:
        say("busy " + json.dumps(status(fd)))
    while True:
        ready = select.select([0, got_r], [], [])[0]
        if got_r in ready:
            return
        data = os.read(0, 4096)
        if not data:
            os._exit(0)  # the client gave up waiting
        if b"?" in data:
            say("busy " + json.dumps(status(fd)))


# ----- the runner ---------------------------------------------------------------------------
def descendants(root):
    children = {}
    for pid in pids():
        try:
            children.setdefault(int(stat_fields(pid)[1][1]), []).append(pid)
        except (OSError, ValueError, IndexError):
            continue
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def signal_all(tree, sig):
    for pid in tree:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def wait_gone(tree, seconds):
    deadline = time.time() + seconds
    while any(alive(pid) for pid in tree) and time.time() < deadline:
        time.sleep(0.05)
    return [pid for pid in tree if alive(pid)]


def stop_runner():
    """Stop the runner and everything it started, and wait until all of it is gone."""
    if not RUNNING or RUNNING[0].poll() is not None:
        return
    tree = [RUNNING[0].pid, *descendants(RUNNING[0].pid)]
    signal_all(tree, signal.SIGTERM)
    signal_all(wait_gone(tree, 5), signal.SIGKILL)
    wait_gone(tree, 5)


def board_state(script):
    done = subprocess.run(["sh", "-c", script], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return done.stdout.decode(errors="replace")


def run(request, fd):
    """Answer ``run`` with ``ran``, also when the run itself could not start."""
    try:
        say("ran " + json.dumps(run_runner(request, fd)))
    except Exception as exc:  # noqa: BLE001  (the client must get an answer, not silence)
        say("ran " + json.dumps({"status": 127, "stdout": "", "stderr": f"{type(exc).__name__}: "
                                                                         f"{exc}"}))


def run_runner(request, fd):
    """State and snapshot, the runner (holding the lock fd too), snapshot and state again."""
    env = dict(os.environ, **request.get("env", {}))
    before_state, before = board_state(request["state"]), snapshot()
    runner = subprocess.Popen(request["argv"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, pass_fds=(fd,),
                              start_new_session=True)
    RUNNING[:] = [runner]
    out, err = runner.communicate()
    after = snapshot()
    return {"status": runner.returncode, "stdout": out.decode(errors="replace"),
            "stderr": err.decode(errors="replace"), "before_state": before_state,
            "after_state": board_state(request["state"]), "before": before, "after": after}


def digests(request):
    def digest(path):
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError:
            return None  # unreadable counts as different: it is uploaded again
        return h.hexdigest()

    root = request["root"]
    if not os.path.isdir(root):
        return None
    return {n: digest(os.path.join(root, n)) if os.path.isfile(os.path.join(root, n)) else None
            for n in request["names"]}


def serve(fd, idle_s):
    """Answer the client's lines until it releases, goes quiet or goes away."""
    def end(*_):
        stop_runner()
        say("released")
        os._exit(0)  # only now does the kernel drop our hold on the lock

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, end)
    say(f"acquired {os.getpid()}")
    pending = b""
    while True:
        if not select.select([0], [], [], idle_s)[0]:
            end()  # no heartbeat: the client's host is gone
        data = os.read(0, 1 << 16)
        if not data:
            end()
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            verb, _, rest = line.decode(errors="replace").partition(" ")
            if verb == "r":
                end()
            elif verb == "digests":
                say("digests " + json.dumps(digests(json.loads(rest))))
            elif verb == "run":
                threading.Thread(target=run, args=(json.loads(rest), fd), daemon=True).start()


def hold(path, idle_s):
    try:
        fd = open_lock(path)
    except OSError as exc:
        say("error " + json.dumps(f"cannot open {path}: {exc.strerror}"))
        sys.exit(3)
    wait_for_lock(fd)
    serve(fd, idle_s)


if __name__ == "__main__":
    hold(sys.argv[2], float(sys.argv[3]))  # argv: hold LOCK IDLE_S
