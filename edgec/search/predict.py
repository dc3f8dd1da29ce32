"""A search's latencies from a latency model (``edgec latency fit``) instead of, or before, the
board.

``--latency-model FILE`` gives the search a model of the device (the ``local`` host, a
``--device`` board, or a target's name for a board that is not attached). ``--measure-trials``:

* ``all``: every trial is measured; each is predicted too, so the report states the model's
  error on everything measured.
* ``promising`` (the default with a model and something to measure on): every trial is built and
  predicted; it is measured only when it may matter (:func:`promising`): never a screened
  trial (successive halving's cheap rung: it is never picked, and its promotion, the full
  build, is measured), but a baseline, the first
  within-budget trial, one predicted within ``PROMISING_MARGIN`` of the fastest measured
  feasible trial (the prediction first scaled by :func:`board_scale` over the trials of its
  backend measured so far: the board's speed today against the profiles the model was fit
  on), and every ``EXPLORE_EVERY``-th other
  within-budget trial (exploration: the model's errors show up). The others are ``predicted``
  trials: they guide the sampler with their predicted latency (on the same scale), are never
  on the front and never picked.
* ``none`` (the default with a model and no board: a target whose code does not run here and no
  ``--device``): every trial is predicted, the front and the pick are the predicted ones, and
  the pick is marked "predicted" (nothing is re-measured).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgec.errors import ConfigError, EdgecError, SearchError

MEASURE_TRIALS = ("all", "promising", "none")
PROMISING_MARGIN = 0.10  # measured when predicted at most 10 % slower than the fastest measured
EXPLORE_EVERY = 4  # and every 4th within-budget trial the margin passed over


@dataclass(frozen=True)
class Prediction:
    """One artifact's predicted mean latency and the model that predicted it."""

    latency_ms: float
    error: float  # the model's leave-one-configuration-out median error (fraction)
    model: str  # "additive model of device local, backend onnxruntime, ..."
    backend: str = ""  # the artifact's backend (the model's key)

    def to_attrs(self) -> dict[str, Any]:
        return {"predicted_ms": self.latency_ms, "predicted_error": self.error,
                "predicted_by": self.model}


@dataclass(frozen=True)
class Predictor:
    """The latency models of one device (a :func:`edgec.latency.save` file), for one thread
    count."""

    path: Path
    models: tuple[Any, ...]  # edgec.latency.LatencyModel
    device: str
    threads: int

    @classmethod
    def load(cls, path: Path, device: str, threads: int) -> Predictor:
        from edgec.latency import load

        models = tuple(load(path))
        if not any(m.key.device == device and m.key.threads == threads for m in models):
            held = "; ".join(m.key.describe() for m in models)
            raise ConfigError(f"--latency-model {path} holds no model of {device} with "
                              f"{threads} thread(s) (it holds: {held}); fit one with `edgec "
                              f"latency fit --device {device}` on profiles measured so")
        return cls(Path(path), models, device, threads)

    def predict(self, directory: Path) -> Prediction:
        """The artifact's predicted mean latency (ms); an EdgecError (no model for its backend,
        layer kinds the profiles never held) says what to measure."""
        from edgec.latency import artifact_features, select_model

        features = artifact_features(directory, self.threads)
        model = select_model(list(self.models), self.device, features["backend"], self.threads)
        latency = model.predict(features, self._key(model, directory))
        error = (model.loo.get(model.chosen) or {}).get("median_ape") or 0.0
        return Prediction(latency, float(error), f"{model.chosen} model of {model.key.describe()}",
                          features["backend"])


    def try_predict(self, directory: Path) -> tuple[Prediction | None, str]:
        """(prediction, '') or (None, why not): a trial the model cannot predict is measured."""
        try:
            return self.predict(directory), ""
        except EdgecError as exc:
            return None, f"{type(exc).__name__}: {exc}"

    def _key(self, model, directory: Path):
        """The model's key, with this host's runtime versions (the artifact's manifest records
        those it was built with) when the board is this host: a model fit on another
        onnxruntime refuses. A remote board's versions are known only once it runs something."""
        from edgec.latency.features import read_manifest
        from edgec.latency.model import runtime_label

        if self.device != "local":
            return model.key
        versions = read_manifest(directory).get("versions", {})
        names = [part.split("=")[0] for part in model.key.runtime.split(",")]
        if not all(name in versions for name in names):
            return model.key
        return replace(model.key, runtime=runtime_label({n: versions[n] for n in names}))


def resolve_mode(mode: str | None, predictor: Predictor | None, can_measure: bool) -> str:
    """``--measure-trials`` with its default filled in; a ConfigError for a mode the search
    cannot follow."""
    if mode is not None and mode not in MEASURE_TRIALS:
        raise ConfigError(f"--measure-trials {mode!r}: choose one of {', '.join(MEASURE_TRIALS)}")
    if predictor is None:
        if mode not in (None, "all"):
            raise ConfigError(f"--measure-trials {mode} needs a latency model: give "
                              f"--latency-model FILE (`edgec latency fit --device NAME`)")
        return "all"
    if mode is None:
        return "promising" if can_measure else "none"
    if mode != "none" and not can_measure:
        raise ConfigError(f"--measure-trials {mode}: the target's code does not run here and no "
                          f"--device was given; give --device NAME or --measure-trials none")
    return mode


def board_scale(pairs: list[tuple[float, float]]) -> float:
    """The median of measured / predicted over the (predicted, measured) latencies of the trials
    measured so far (1 before any): the gate compares a prediction with measurements on this
    scale, so a board that runs uniformly slower or faster than when its profiles were taken
    (another load, clock or runtime build) still has its fastest trials measured; the model is
    trusted to rank, not to know today's clock."""
    ratios = sorted(measured / predicted for predicted, measured in pairs if predicted > 0)
    if not ratios:
        return 1.0
    middle = len(ratios) // 2
    return ratios[middle] if len(ratios) % 2 else (ratios[middle - 1] + ratios[middle]) / 2


def promising(predicted_ms: float, fastest_measured_ms: float | None, within_budget: bool,
              baseline: bool, passed_over: int, screened: bool = False) -> tuple[bool, str]:
    """(measure this trial?, why): see the module docstring. ``passed_over``: within-budget
    trials the margin passed over so far (measured for exploration or not)."""
    if baseline:
        return True, "a baseline"
    if screened:
        return False, "screened: never picked, so predicted only (a promotion is measured)"
    if not within_budget:
        return False, "over the budget: its latency cannot make it the pick"
    if fastest_measured_ms is None:
        return True, "no feasible trial measured yet"
    bar = fastest_measured_ms * (1 + PROMISING_MARGIN)
    if predicted_ms <= bar:
        return True, f"predicted {predicted_ms:.4g} ms, within {PROMISING_MARGIN:.0%} of the " \
                     f"fastest measured ({fastest_measured_ms:.4g} ms)"
    if (passed_over + 1) % EXPLORE_EVERY == 0:
        return True, f"exploration (every {EXPLORE_EVERY}th trial the model passed over)"
    return False, f"predicted {predicted_ms:.4g} ms, over {bar:.4g} ms"


class MeasureGate:
    """One trial's ``profile_when`` (:class:`edgec.build.BuildRequest`): predicts the built
    artifact and says whether to measure it, by ``mode``; what it found becomes trial
    attributes (:meth:`attrs`) and, when nothing was measured, the trial's latency
    (:meth:`as_measurement`)."""

    def __init__(self, predictor: Predictor, mode: str, baseline: bool,
                 fastest_measured_ms: float | None, passed_over: int,
                 pairs: dict[str, list[tuple[float, float]]] | None = None,
                 screened: bool = False):
        self.predictor, self.mode, self.baseline = predictor, mode, baseline
        self.screened = screened
        self.fastest, self.passed_over, self.pairs = fastest_measured_ms, passed_over, pairs or {}
        self.scale = 1.0
        self.prediction: Prediction | None = None
        self.why, self.skipped_within_budget = "", False

    def __call__(self, directory: Path, manifest: dict[str, Any]) -> bool:
        self.prediction, failure = self.predictor.try_predict(directory)
        if self.mode == "none":
            if self.prediction is None:
                raise SearchError(f"the latency model cannot predict this trial ({failure}) "
                                  f"and --measure-trials none measures nothing")
            self.why = "predicted only (--measure-trials none)"
            return False
        if self.prediction is None or self.mode == "all":
            self.why = f"not predicted: {failure}" if failure else "every trial is measured"
            return True
        budget = manifest.get("budget") or {}
        within = budget.get("spent", 0.0) <= budget.get("points", float("inf")) + 1e-9
        same_backend = self.pairs.get(self.prediction.backend)
        self.scale = board_scale(same_backend or [p for ps in self.pairs.values() for p in ps])
        measure, self.why = promising(self.prediction.latency_ms * self.scale, self.fastest, within,
                                      self.baseline, self.passed_over, self.screened)
        self.skipped_within_budget = within and not self.screened and (
            not measure or self.why.startswith("exploration"))
        return measure

    def attrs(self) -> dict[str, Any]:
        found = self.prediction.to_attrs() if self.prediction else {"predicted_ms": None}
        return {**found, "board_scale": self.scale, "measure_why": self.why,
                "passed_over": self.skipped_within_budget}

    def as_measurement(self) -> PredictedLatency | None:
        """The prediction, on the board's scale, in place of a measurement (what the trial's
        objectives read: comparable with the measured trials')."""
        if self.prediction is None:
            return None
        value = self.prediction.latency_ms * self.scale
        return PredictedLatency(value, value * self.prediction.error, value)


@dataclass(frozen=True)
class PredictedLatency:
    """A predicted latency where a :class:`edgec.measure.Measurement` is read: mean and p50
    the predicted value, the 95 % half-width the model's median error times it."""

    mean: float
    ci95: float
    p50: float

    @property
    def extra(self) -> dict[str, Any]:
        return {"source": "predicted"}


def measured_pairs(records) -> list[tuple[float, float]]:
    """(predicted, measured) mean latency of each trial that was both (repeats once)."""
    return [pair for pairs in pairs_by_backend(records).values() for pair in pairs]


def pairs_by_backend(records) -> dict[str, list[tuple[float, float]]]:
    """:func:`measured_pairs` by the trial's backend: each backend's model errs its own way
    (a model fit on ONNX Runtime profiles may read 10 % low while ExecuTorch's reads 40 %)."""
    found: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        if r.attrs.get("predicted_ms") is not None and r.attrs.get("latency_source") \
                == "measured" and "repeat_of" not in r.attrs:
            found.setdefault(r.attrs.get("backend", ""), []).append(
                (r.attrs["predicted_ms"], r.attrs["latency_mean_ms"]))
    return found


def predicted_vs_measured(records) -> dict[str, Any] | None:
    """The model's errors on the trials that were both predicted and measured (None if none):
    what :func:`edgec.latency.fit.error_metrics` reports."""
    pairs = measured_pairs(records)
    if not pairs:
        return None
    try:
        from edgec.latency.fit import error_metrics
    except ImportError:  # scipy: only for Kendall's tau
        return None
    predicted, measured = zip(*pairs)
    return error_metrics(list(predicted), list(measured))
