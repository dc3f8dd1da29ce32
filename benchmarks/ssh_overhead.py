"""One run, one table: one artifact measured here (LocalDevice) and over SSH on this same machine
(SSHDevice against a loopback OpenSSH server), same CPU, same protocol, rounds interleaved (the
order flips every round) so machine load hits both alike.

The latency columns are what the runner timed; the gap between them is what the SSH path costs
the timed loop itself. ``call s`` is the wall time of one ``measure`` call: connection, board
lock, cache check, process snapshots and the runner's start-up, none of it inside the timings.

    python benchmarks/ssh_overhead.py [ARTIFACT] [--rounds 5] [--repeat 500] [--min-time 2]

ARTIFACT defaults to the digits example built by
``edgec build examples/digits/model.toml --target local --no-profile --out /tmp/h16``.
Needs root and sshd (as the tests do).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgec.devices import LocalDevice  # noqa: E402
from edgec.devices.ssh import SSHDevice  # noqa: E402
from edgec.measure import MeasureSpec  # noqa: E402
from tests import sshd  # noqa: E402

DEFAULT_BUILD = Path("/tmp/h16/local")


def default_artifact() -> Path:
    found = sorted(DEFAULT_BUILD.glob("digits-*/manifest.json"))
    if not found:
        sys.exit(f"no digits artifact under {DEFAULT_BUILD}; build it with `edgec build "
                 f"examples/digits/model.toml --target local --no-profile --out /tmp/h16`")
    return found[-1].parent


def timed(device, artifact: Path, spec: MeasureSpec) -> tuple[float, float, float, int]:
    """(mean ms, p50 ms, wall s of the call, disturbance warnings) of one measurement."""
    started = time.perf_counter()
    m = device.measure(artifact, spec)
    disturbed = sum(w.startswith("measurement disturbed") for w in m.warnings)
    return m.mean, m.p50, time.perf_counter() - started, disturbed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", nargs="?", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=500)
    parser.add_argument("--min-time", type=float, default=2.0)
    args = parser.parse_args()
    artifact = args.artifact or default_artifact()
    spec = MeasureSpec(warmup=20, repeat=args.repeat, min_time_s=args.min_time)
    reason = sshd.missing_reason()
    if reason:
        sys.exit(reason)
    with tempfile.TemporaryDirectory(prefix="edgec-ssh-overhead-") as scratch:
        server = sshd.SSHServer(Path(scratch) / "sshd").start()
        try:
            with SSHDevice(sshd.board_config(server, Path(scratch) / "board")) as remote:
                timed(remote, artifact, spec)  # upload and first connection, not counted
                rows = run_rounds(LocalDevice(), remote, artifact, spec, args.rounds)
        finally:
            server.stop()
    print_table(artifact, spec, rows)


def run_rounds(local, remote, artifact, spec, rounds: int) -> list[tuple]:
    rows = []
    for n in range(rounds):
        order = [("local", local), ("ssh", remote)]
        results = {name: timed(device, artifact, spec)
                   for name, device in (order if n % 2 == 0 else order[::-1])}
        rows.append((n + 1, results["local"], results["ssh"]))
    return rows


def print_table(artifact: Path, spec: MeasureSpec, rows: list[tuple]) -> None:
    print(f"{artifact.name}: warmup {spec.warmup}, >= {spec.repeat} runs and {spec.min_time_s} s "
          f"per measurement, 1 thread; rounds alternate which device goes first")
    print(f"{'round':>5} | {'local mean':>10} {'ssh mean':>9} | {'local p50':>9} {'ssh p50':>8} | "
          f"{'local call s':>12} {'ssh call s':>10} | ssh disturbed")
    for n, (lm, lp, lw, _), (sm, sp, sw, sd) in rows:
        print(f"{n:>5} | {lm:>10.4f} {sm:>9.4f} | {lp:>9.4f} {sp:>8.4f} | {lw:>12.2f} "
              f"{sw:>10.2f} | {'yes' if sd else 'no'}")
    local = statistics.fmean(r[1][0] for r in rows)
    remote = statistics.fmean(r[2][0] for r in rows)
    local50 = statistics.fmean(r[1][1] for r in rows)
    remote50 = statistics.fmean(r[2][1] for r in rows)
    print(f"{'mean':>5} | {local:>10.4f} {remote:>9.4f} | {local50:>9.4f} {remote50:>8.4f} | "
          f"{statistics.fmean(r[1][2] for r in rows):>12.2f} "
          f"{statistics.fmean(r[2][2] for r in rows):>10.2f} |")
    print(f"SSH vs local: mean {100 * (remote / local - 1):+.2f} %, p50 "
          f"{100 * (remote50 / local50 - 1):+.2f} % (latencies in ms)")


if __name__ == "__main__":
    main()
