"""One accuracy budget per build: a ledger that every pass spends from.

The reference is the build's input float model on one held-out slice of the calibration split
(the tail, ``holdout`` images) that no pass trains on: the build hands the passes the rest. After
each step the pipeline charges the step with what its output lost against the reference
(:meth:`Ledger.charge`), so the int8 step's drop is charged like any other. A step that takes the
cumulative drop past the budget raises BudgetError naming what each earlier pass spent. Passes
that choose something against accuracy (prune's ratio, early exit's thresholds, mixed
precision's 4-bit layers) read :meth:`Ledger.allowance`: what is left, less what the recipe
reserves for the steps still to come.

``view`` 'shifted' measures on :func:`edgec.accuracy.shifted` images, for models that memorised
their whole training split (the pretrained ResNets score ~99.8 % on any slice of it).

``recheck`` images after the held-out slice are seen by nothing that chooses: not the passes,
not the ledger. The build measures only its final output there (:meth:`Ledger.recheck`), so a
search that chose among many configurations by the ledger's drop can check its pick's drop on
images the choice did not fit.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgec.accuracy import SHIFTED_DRAWS, VIEWS, shifted, top1, view_top1
from edgec.cache import dataset_identity
from edgec.data import Dataset, preprocess
from edgec.errors import BudgetError, ConfigError


@dataclass(frozen=True)
class BudgetSpec:
    """A recipe's ``[budget]`` table (or ``--budget POINTS``): ``points`` of top-1 the whole
    build may lose, measured on the last ``holdout`` calibration images in ``view``;
    ``reserve`` keeps points for later passes when an earlier one chooses (``{quantize =
    0.3}``)."""

    points: float
    view: str = "plain"
    holdout: int = 0  # 0: a fifth of the calibration split, at most 5,000 images
    reserve: dict[str, float] = field(default_factory=dict)
    recheck: int = 0  # images after the held-out slice for the final re-check (0: none)

    def __post_init__(self):
        if not self.points >= 0:
            raise ConfigError(f"budget points {self.points} must be >= 0 (top-1 points)")
        if self.view not in VIEWS:
            raise ConfigError(f"budget view {self.view!r} is not one of {VIEWS}")
        if self.holdout and self.holdout < 100:
            raise ConfigError(f"budget holdout {self.holdout} is too few images; use >= 100 "
                              f"(or 0 for a fifth of the calibration split)")
        if self.recheck and self.recheck < 100:
            raise ConfigError(f"budget recheck {self.recheck} is too few images; use >= 100 "
                              f"(or 0 for no re-check)")
        if any(value < 0 for value in self.reserve.values()):
            raise ConfigError(f"budget reserve {self.reserve} must be >= 0 points each")

    def holdout_count(self, images: int) -> int:
        """The held-out slice's size for a calibration split of ``images``."""
        return self.holdout or min(5000, images // 5)

    def split(self, calibration: Dataset) -> tuple[Dataset, Dataset, Dataset | None]:
        """(what the passes may use, the held-out slice the ledger measures on, the re-check
        tail or None): the split's tail is held out, the last ``recheck`` images of it apart."""
        count, again = self.holdout_count(len(calibration)), self.recheck
        if len(calibration) - again < 2 * count or count < 100:
            raise ConfigError(f"the accuracy budget holds out {count} calibration images"
                              f"{f' and {again} more to re-check' if again else ''} but "
                              f"{calibration.origin} has {len(calibration)}; it needs at least "
                              f"twice the held-out count plus the re-check and 100 held out: "
                              f"lower [budget] holdout or recheck, or give more images")
        end = len(calibration) - again
        recheck = calibration.slice(end, len(calibration)) if again else None
        return calibration.slice(0, end - count), calibration.slice(end - count, end), recheck


class Ledger:
    """The build's one accuracy budget: the reference, and what each step spent."""

    def __init__(self, spec: BudgetSpec, holdout: Dataset, input_spec, reference_top1: float,
                 seed: int = 0, steps: list[str] | None = None, recheck: Dataset | None = None,
                 progress: Callable[[str], None] = lambda message: None):
        self.spec, self.holdout, self.input_spec, self.seed = spec, holdout, input_spec, seed
        self.progress = progress  # each evaluation is announced, and its result and seconds
        self.recheck_slice = recheck  # seen only by :meth:`recheck`
        self.rechecked: dict[str, Any] | None = None
        self.reference_top1 = reference_top1  # percent
        self.steps = list(steps or [])  # pass names in pipeline order, for reserves
        self.spends: list[dict[str, Any]] = []

    @property
    def total(self) -> float:
        return self.spec.points

    @property
    def spent(self) -> float:
        return sum(entry["points"] for entry in self.spends)

    def key(self) -> dict[str, Any]:
        """What a pass's choices depend on besides its input: keyed in the step cache."""
        return {"allowance": round(self.allowance(), 6), "view": self.spec.view,
                "holdout": dataset_identity(self.holdout), "seed": self.seed,
                "spends": [round(e["points"], 6) for e in self.spends]}

    def allowance(self, pass_name: str | None = None) -> float:
        """Points the pass running now may spend: what is left, less the reserves of the
        passes after it."""
        later = self.steps[len(self.spends) + 1:]
        reserved = sum(self.spec.reserve.get(name, 0.0) for name in later)
        return max(0.0, self.total - self.spent - reserved)

    def torch_top1(self, model, dataset: Dataset | None = None) -> float:
        """Top-1 (percent) of a torch model on the held-out slice (or ``dataset``) in the
        ledger's view."""
        with contextlib.suppress(NotImplementedError):  # a PT2E graph is in eval mode already
            model.eval()
        dataset = self.holdout if dataset is None else dataset
        return self._timed(dataset, lambda: view_top1(model, dataset, self.input_spec,
                                                      self.spec.view, self.seed) * 100)

    def input_top1(self) -> float:
        """The top-1 (percent) of the running pass's input, as the ledger counts it."""
        return self.reference_top1 - self.spent

    def top1(self, artifact, dataset: Dataset | None = None) -> float:
        """Top-1 (percent) of an artifact (torch module, ONNX file, early-exit cascade) on the
        held-out slice (or ``dataset``) in the ledger's view."""
        if artifact.stage == "torch":
            return self.torch_top1(artifact.payload, dataset)
        dataset = self.holdout if dataset is None else dataset
        return self._timed(dataset, lambda: onnx_view_top1(
            artifact.payload, dataset, self.input_spec, self.spec.view, self.seed,
            artifact.extras.get("cascade")) * 100)

    def _timed(self, dataset: Dataset, evaluate: Callable[[], float]) -> float:
        """``evaluate()``, announced (a search's time split counts it as evaluation)."""
        self.progress(f"accuracy budget: top-1 on {dataset.origin} ({self.spec.view})")
        started = time.monotonic()
        value = evaluate()
        self.progress(f"  top-1 {value:.2f} % in {time.monotonic() - started:.1f} s")
        return value

    def recheck(self, reference_top1: float, final_top1: float) -> dict[str, Any]:
        """Record the re-check: the float model's and the final output's top-1 (percent) on the
        re-check tail (:meth:`top1` with ``recheck_slice``); the drop is not charged."""
        drop = reference_top1 - final_top1
        self.rechecked = {"origin": self.recheck_slice.origin, "images": len(self.recheck_slice),
                          "reference_top1": round(reference_top1, 4),
                          "top1": round(final_top1, 4), "drop": round(drop, 4),
                          "within_budget": drop <= self.total + 1e-9}
        return self.rechecked

    def charge(self, pass_name: str, artifact, exact: bool = False) -> dict[str, Any]:
        """Charge ``pass_name`` with what ``artifact`` lost since the previous step; BudgetError
        when the cumulative drop leaves the budget. ``exact``: a transformation that computes the
        same function (BN folding, export) is charged 0 without measuring."""
        before = self.reference_top1 - self.spent
        now = before if exact else self.top1(artifact)
        entry = {"pass": pass_name, "points": round(before - now, 4), "top1": round(now, 4),
                 "measured": not exact}
        drop = self.reference_top1 - now
        if drop > self.total + 1e-9:
            earlier = ", ".join(f"{e['pass']} {e['points']:+.2f}" for e in self.spends) or "none"
            raise BudgetError(
                f"accuracy budget exceeded: after {pass_name!r} the top-1 on the held-out "
                f"{self.holdout.origin} ({self.spec.view} view) is {now:.2f} %, "
                f"{drop:.2f} points below the float model's {self.reference_top1:.2f} %, over "
                f"the budget of {self.total} points; {pass_name!r} spent {entry['points']:+.2f}, "
                f"earlier passes: {earlier}; raise --budget or make {pass_name!r} cheaper")
        self.spends.append(entry)
        return entry

    def restore(self, spends: list[dict[str, Any]]) -> None:
        """The spends of steps that came from the cache."""
        self.spends = [dict(entry) for entry in spends]

    def to_json(self) -> dict[str, Any]:
        return {"points": self.total, "view": self.spec.view,
                "holdout": {"origin": self.holdout.origin, "images": len(self.holdout)},
                "reserve": self.spec.reserve, "reference_top1": round(self.reference_top1, 4),
                "spent": round(self.spent, 4), "spends": self.spends,
                **({"recheck": self.rechecked} if self.rechecked else {})}


def pass_budget(ctx, own: float | None) -> float | None:
    """The points a pass may lose: its own cap (None: none), and in a build with a ledger at
    most what the ledger allows it."""
    if ctx.ledger is None:
        return own
    allowed = ctx.ledger.allowance()
    return allowed if own is None else min(own, allowed)


def onnx_view_top1(path, dataset: Dataset, spec, view: str = "plain", seed: int = 0,
                   cascade: dict[str, Any] | None = None, batch: int = 500) -> float:
    """Top-1 (fraction) of an ONNX model on ``dataset`` in ``view`` (averaged over the draws
    :func:`edgec.accuracy.view_top1` takes); an early-exit graph answers as its cascade does:
    from the first exit whose confidence reaches its threshold."""
    from edgec.runner.runner import ort_session

    session = ort_session(path, 2)
    draws = SHIFTED_DRAWS if view == "shifted" else 1
    scores = []
    for k in range(draws):
        logits = np.concatenate([
            _cascade_logits(session, _view_batch(dataset, spec, view, seed + 1000 * k, i, batch),
                            cascade)
            for i in range(0, len(dataset), batch)])
        scores.append(top1(logits, dataset.labels))
    return float(np.mean(scores))


def _view_batch(dataset: Dataset, spec, view: str, seed: int, start: int, batch: int):
    x = preprocess(dataset.images[start:start + batch], spec)
    if view != "shifted":
        return x
    import torch

    return shifted(torch.from_numpy(x), seed + start).numpy()


def _cascade_logits(session, x: np.ndarray, cascade: dict[str, Any] | None) -> np.ndarray:
    from edgec.exits import cascade_exits, confidence

    name = session.get_inputs()[0].name
    if not cascade or not cascade["exits"]:  # no exit kept: the final output alone
        return session.run(None, {name: x})[0]
    exits = cascade["exits"]
    names = ["logits", *[f"exit_{k}" for k in range(len(exits))]]
    final, *exit_logits = session.run(names, {name: x})
    exit_at = cascade_exits([confidence(z) for z in exit_logits], [e["threshold"] for e in exits])
    table = np.stack([*exit_logits, final])
    return table[exit_at, np.arange(len(x))]
