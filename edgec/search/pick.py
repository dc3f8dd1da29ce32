"""Picking one configuration from the search's front.

The pick is the fastest feasible trial on the Pareto front whose drop, re-checked on calibration
images the search did not choose on (the budget's re-check tail, :class:`edgec.budget.BudgetSpec`),
is inside the budget too: a search that keeps the best of many configurations by their held-out
drop favours those whose drop it underestimated. Boards are noisy, so when the 95 %
intervals of the fastest and of the next distinct artifacts overlap, or their means are closer
than the drift a board shows between measurement windows (DRIFT_FRACTION), the fastest and up to
two such rivals are measured again, interleaved (A B C A B C …, ``remeasure_rounds`` rounds
through the device's own ``measure``); the lowest median over all those samples wins if it is
more than EQUAL_FRACTION ahead of the next and faster in most rounds; otherwise those equal to it
are, and the more accurate (held-out top-1), then the smaller, wins. What happened is kept in
:class:`Pick` (and the study's ``pick`` attribute).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgec.errors import EdgecError
from edgec.measure import MeasureSpec

EQUAL_FRACTION = 0.02  # medians closer than 2 % of the faster one: the finalists are equal
DRIFT_FRACTION = 0.25  # trials measured apart can differ this much on a busy machine: re-measure
MAX_FINALISTS = 3  # the fastest and at most two rivals within the drift are re-measured


@dataclass(frozen=True)
class Pick:
    """The chosen trial, why it won, and the re-measurement when there was one."""

    record: Any  # edgec.search.study.TrialRecord
    decision: str
    finalists: tuple[int, ...] = ()  # trial numbers re-measured, in the order measured
    rounds: tuple[tuple[float, ...], ...] = ()  # per round: each finalist's median ms
    medians_ms: tuple[float, ...] = ()  # each finalist's median over all its rounds' samples
    test_top1: float | None = None  # % on the evaluation split (reported, never chooses)

    @property
    def number(self) -> int:
        return self.record.number

    def to_json(self) -> dict[str, Any]:
        return {"trial": self.number, "label": self.record.label(), "decision": self.decision,
                "finalists": list(self.finalists),
                "rounds_median_ms": [list(r) for r in self.rounds],
                "medians_ms": list(self.medians_ms), "test_top1": self.test_top1}


@dataclass(frozen=True)
class Remeasure:
    """Where and how finalists are measured again: the device, the protocol, the rounds."""

    device: str = "local"
    spec: MeasureSpec = MeasureSpec()
    rounds: int = 4


def choose(records, front: tuple[int, ...], again: Remeasure | None = Remeasure(),
           progress: Callable[[str], None] = lambda message: None) -> Pick | None:
    """The fastest feasible trial (:class:`edgec.search.study.TrialRecord`) on ``front`` (trial
    numbers); None when no trial is feasible. ``again`` None: the latencies were predicted
    (edgec.search.predict), there is nothing to re-measure."""
    feasible = sorted((r for r in records if r.number in front and r.feasible),
                      key=lambda r: r.latency_ms)
    ranked = [r for r in feasible if rechecked(r)]
    refused = "".join(f"; trial {r.number} ({_lat(r)}) was faster but lost {r.attrs['recheck_drop']:.2f}"
                      f" points on the re-check, over the budget of {r.attrs['budget_points']:g}"
                      for r in feasible if not rechecked(r) and (not ranked or r.latency_ms
                                                                  < ranked[0].latency_ms))
    if not ranked:
        return None
    first = ranked[0]
    distinct = list({r.attrs["manifest_hash"]: r for r in reversed(ranked)}.values())[::-1]
    rivals = [r for r in distinct[1:] if again is not None
              and (overlap(first, r) or drift_may_explain(first, r))]
    if len(distinct) == 1:
        return Pick(first, "the only distinct artifact on the feasible front that passed the "
                           "re-check" + refused)
    if not rivals:
        second = distinct[1]
        return Pick(first, f"fastest on the feasible front: {_lat(first)} against "
                           f"trial {second.number}'s {_lat(second)} (intervals apart, "
                           f"{_gap(first, second):.0%} gap){refused}")
    pick = _settle((first, *rivals[:MAX_FINALISTS - 1]), again, progress)
    return replace(pick, decision=pick.decision + refused)


def with_rechecks(records, front: tuple[int, ...], recheck: Callable[[Any], Any]) -> tuple:
    """``records`` with the re-check run where it can decide the pick: a search's trials defer
    it (each would cost an evaluation of the re-check tail), so here it runs on the feasible
    front from the fastest until one passes, and on the trials close enough to rival that one
    (:func:`overlap`, :func:`drift_may_explain`). ``recheck`` returns the record with its
    ``recheck_drop`` (unchanged when it has one, or when the budget has no re-check tail)."""
    feasible = sorted((r for r in records if r.number in front and r.feasible),
                      key=lambda r: r.latency_ms)
    checked, first = {}, None
    for record in feasible:
        if first is None or overlap(first, record) or drift_may_explain(first, record):
            record = checked[record.number] = recheck(record)
            if first is None and rechecked(record):
                first = record
    return tuple(checked.get(r.number, r) for r in records)


def rechecked(record) -> bool:
    """Whether the trial's re-checked drop is inside its budget (True when it was not
    re-checked: a study without a re-check tail, or a trial :func:`with_rechecks` left out)."""
    drop = record.attrs.get("recheck_drop")
    return drop is None or drop <= record.attrs["budget_points"] + 1e-9


def feasible_front(records) -> list:
    """The feasible trials no other feasible trial beats on latency and held-out top-1 both
    (one per artifact), fastest first."""
    feasible = sorted((r for r in records if r.feasible and "repeat_of" not in r.attrs),
                      key=lambda r: (r.latency_ms, -r.heldout_top1))
    front: list = []
    for record in feasible:
        if not front or record.heldout_top1 > front[-1].heldout_top1:
            front.append(record)
    return front


def drift_may_explain(a, b) -> bool:
    """Whether the two means are closer than the board's drift between measurement windows:
    each trial's interval says how steady its own window was, not how the machine's speed moved
    between trials (a shared 2-core VM measured the same artifact 0.357 and 0.431 ms in two
    searches)."""
    return _gap(a, b) < DRIFT_FRACTION


def _gap(a, b) -> float:
    return abs(a.latency_ms - b.latency_ms) / min(a.latency_ms, b.latency_ms)


def overlap(a, b) -> bool:
    """Whether the 95 % intervals of the two latency means overlap."""
    return abs(a.latency_ms - b.latency_ms) <= a.ci95_ms + b.ci95_ms


def _lat(record) -> str:
    return f"{record.latency_ms:.4g} ms ± {record.ci95_ms:.2g}"


def _settle(finalists, again: Remeasure, progress) -> Pick:
    """Re-measure the finalists (fastest first) interleaved and decide among them."""
    try:
        samples = remeasure(finalists, again, progress)
    except EdgecError as exc:
        others = ", ".join(str(r.number) for r in finalists[1:])
        return Pick(finalists[0], f"too close to trial(s) {others} to tell apart, but "
                    f"re-measuring failed ({type(exc).__name__}: {exc}); kept the faster mean "
                    f"of the search")
    rounds = tuple(tuple(statistics.median(s) for s in per_round) for per_round in samples)
    medians = tuple(statistics.median([x for per_round in samples for x in per_round[i]])
                    for i in range(len(finalists)))
    winner, why = _decide(finalists, rounds, medians)
    numbers = tuple(r.number for r in finalists)
    return Pick(winner, why, numbers, rounds, medians)


def remeasure(finalists, again: Remeasure, progress) -> list[list[tuple[float, ...]]]:
    """Per round, each finalist's latency samples (ms), measured A B C A B C … on the device."""
    from edgec.devices import open_device

    device = open_device(again.device)
    out = []
    try:
        for round_ in range(again.rounds):
            measured = []
            for record in finalists:
                progress(f"re-measuring trial {record.number} on {device.name} "
                         f"(round {round_ + 1} of {again.rounds})")
                measured.append(device.measure(Path(record.attrs["artifact"]),
                                               again.spec).samples_ms)
            out.append(measured)
    finally:
        getattr(device, "close", lambda: None)()
    return out


def _decide(finalists, rounds, medians) -> tuple[Any, str]:
    """(winner, why): the lowest median when it is clearly and consistently lower than the next,
    else the more accurate, then the smaller, of those equal to it."""
    order = sorted(range(len(finalists)), key=lambda i: medians[i])
    best, runner = order[0], order[1]
    gap = (medians[runner] - medians[best]) / medians[best]
    wins = sum(r[best] < r[runner] for r in rounds)
    each = ", ".join(f"trial {finalists[i].number} median {medians[i]:.4g} ms"
                     for i in range(len(finalists)))
    told = (f"re-measured interleaved over {len(rounds)} rounds: {each} (the fastest "
            f"{gap:.1%} ahead of the next, faster in {wins} of {len(rounds)} rounds)")
    if gap > EQUAL_FRACTION and wins * 2 > len(rounds):
        return finalists[best], f"{told}: trial {finalists[best].number} is faster"
    tied = [finalists[i] for i in order if medians[i] <= medians[best] * (1 + EQUAL_FRACTION)]
    winner = max(tied if len(tied) > 1 else [finalists[best], finalists[runner]],
                 key=lambda r: (r.heldout_top1, -r.size_bytes))
    return winner, (f"{told}: equal within {EQUAL_FRACTION:.0%}, so the more accurate (then "
                    f"smaller) trial {winner.number} ({winner.heldout_top1:.2f} % held-out, "
                    f"{winner.size_bytes / 1024:.1f} KiB)")
