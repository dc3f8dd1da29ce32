"""Who else used the board while we measured: two process snapshots that the lock holder takes
just before the runner starts and just after it ends (``onboard.snapshot``), compared here.

A measurement is *disturbed* when another edgec runner was running, or another process (or
short-lived ones together: CPU the board spent that no surviving process accounts for) used more
than ``BUSY_PERCENT`` of one CPU over the window. Only pids and process names are reported, never
command lines (another user's may hold secrets).
"""

from __future__ import annotations

from typing import Any

BUSY_PERCENT = 10.0
SHOWN = 4  # processes named in the warning


def others(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What else ran during the window between the snapshots, busiest first: edgec runners, any
    process above BUSY_PERCENT of a CPU, and CPU that no surviving process accounts for
    (short-lived processes). The snapshotting holder and its SSH session are ours."""
    hz, window = before["hz"], after["uptime"] - before["uptime"]
    if window <= 0:
        return []
    ours = set(before["self"]) | set(after["self"])
    used = _ticks_in_window(before, after)
    found = {pid: (float("inf"), f"edgec runner pid {pid} ({name})")
             for pid, name, _, _, runner in before["procs"] + after["procs"]
             if runner and pid not in ours}
    for pid, (name, ticks) in used.items():
        percent = 100.0 * ticks / hz / window
        if pid not in ours and pid not in found and percent > BUSY_PERCENT:
            found[pid] = (percent, f"pid {pid} ({name}) {percent:.0f} % CPU")
    unseen = (after["busy"] - before["busy"] - (after["children"] - before["children"])
              - sum(ticks for _, ticks in used.values()))
    percent = 100.0 * unseen / hz / window
    if percent > BUSY_PERCENT:
        found[-1] = (percent, f"short-lived processes {percent:.0f} % CPU")
    return [text for _, text in sorted(found.values(), key=lambda item: -item[0])]


def _ticks_in_window(before: dict[str, Any], after: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """pid -> (name, CPU ticks between the snapshots) of every process alive at the second."""
    ticks0 = {(pid, start): ticks for pid, _, ticks, start, _ in before["procs"]}
    used = {}
    for pid, name, ticks, start, _ in after["procs"]:
        if (pid, start) in ticks0:
            used[pid] = (name, ticks - ticks0[(pid, start)])
        elif start / before["hz"] >= before["uptime"]:
            used[pid] = (name, ticks)  # started during the window
    return used


def disturbance_warning(found: list[str], window_s: float) -> str:
    """The Measurement warning for what ``others`` found."""
    shown = ", ".join(found[:SHOWN]) + (f" and {len(found) - SHOWN} more" if len(found) > SHOWN
                                        else "")
    return (f"measurement disturbed: other work ran on the board during its {window_s:.1f} s: "
            f"{shown}; its latencies are not those of an idle board, measure again when it is")
