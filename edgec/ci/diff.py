"""``edgec ci diff OLD NEW``: per (target, device), how accuracy, latency and size changed, and
whether any change is a regression beyond the thresholds.

Latency regresses only when even the favourable end of the change's 95 % interval is beyond
the threshold: ``new - old - sqrt(ci_old² + ci_new²) > threshold * old``, with each side's
interval over separate measurement rounds (:func:`edgec.measure.across_rounds`), so a rebuild
that lands elsewhere inside the board's noise is not one. Accuracy is the same images through
a deterministic runner: a drop beyond ``max_accuracy_drop`` points is one. A target that was
ok and now is not, or that is gone, is one too.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from edgec.ci.index import entry_key
from edgec.errors import ConfigError


@dataclass(frozen=True)
class Thresholds:
    max_latency_regress: float = 0.05  # a fraction of the old mean
    max_accuracy_drop: float = 0.2  # top-1 points


@dataclass(frozen=True)
class Change:
    """One (target, device) in both or either index, and what regressed."""

    target: str
    device: str
    old: dict[str, Any] | None
    new: dict[str, Any] | None
    regressions: tuple[str, ...]

    @property
    def latency_change(self) -> float | None:
        """(new - old) / old of the mean latency; None unless both have one."""
        old, new = _latency(self.old), _latency(self.new)
        return None if old is None or new is None else (new["mean_ms"] - old["mean_ms"]) / old["mean_ms"]

    @property
    def accuracy_change(self) -> float | None:
        """new - old top-1, in points; None unless both have one."""
        old, new = _top1(self.old), _top1(self.new)
        return None if old is None or new is None else (new - old) * 100


def parse_fraction(text: str, option: str) -> float:
    """'5%' or '0.05' → 0.05; a ConfigError naming the option otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%?)\s*", str(text))
    if not match:
        raise ConfigError(f"{option} {text!r}: give a percentage like 5% or a fraction like 0.05")
    value = float(match.group(1))
    return value / 100 if match.group(2) else value


def compare(old: dict[str, Any], new: dict[str, Any], limits: Thresholds) -> list[Change]:
    """Every (target, device) of either index, in order, with its regressions."""
    before = {entry_key(e): e for e in old["entries"]}
    after = {entry_key(e): e for e in new["entries"]}
    keys = sorted(set(before) | set(after))
    return [Change(*key, before.get(key), after.get(key),
                   regressions(before.get(key), after.get(key), limits)) for key in keys]


def regressions(old: dict[str, Any] | None, new: dict[str, Any] | None,
                limits: Thresholds) -> tuple[str, ...]:
    """Why ``new`` is worse than ``old`` (empty: it is not)."""
    if old is None or old["status"] != "ok":
        return ()
    if new is None:
        return ("gone from the new index",)
    if new["status"] != "ok":
        return (f"{new['status']}: {new['error']}",)
    found = []
    old_top1, new_top1 = _top1(old), _top1(new)
    if old_top1 is not None and new_top1 is not None:
        drop = (old_top1 - new_top1) * 100
        if drop > limits.max_accuracy_drop + 1e-9:
            found.append(f"top-1 {old_top1 * 100:.2f} % → {new_top1 * 100:.2f} % "
                         f"(-{drop:.2f} points > {limits.max_accuracy_drop:g})")
    found += _latency_regression(_latency(old), _latency(new), limits.max_latency_regress)
    return tuple(found)


def _latency_regression(old, new, threshold: float) -> list[str]:
    if old is None or new is None:
        return []
    change = new["mean_ms"] - old["mean_ms"]
    noise = math.hypot(old["ci95_ms"], new["ci95_ms"])
    if change - noise <= threshold * old["mean_ms"]:
        return []
    return [f"latency {old['mean_ms']:.4g} ± {old['ci95_ms']:.2g} → {new['mean_ms']:.4g} ± "
            f"{new['ci95_ms']:.2g} ms (+{change / old['mean_ms']:.1%}; beyond "
            f"{threshold:.0%} by more than the noise)"]


def _latency(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """Only a measured latency is compared (a prediction is not evidence of a regression)."""
    latency = (entry or {}).get("latency")
    return latency if latency and latency.get("source") == "measured" else None


def _top1(entry: dict[str, Any] | None) -> float | None:
    accuracy = (entry or {}).get("accuracy")
    return None if not accuracy else accuracy["top1"]
