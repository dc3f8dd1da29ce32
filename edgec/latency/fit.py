"""Fitting the latency model of one key: both candidates, leave-one-configuration-out errors,
the choice between them, and the error report of a model on held-out configurations.

Needs scipy (non-negative least squares, Kendall's τ) and scikit-learn (gradient boosting),
imported when called; using a fitted model does not (edgec.latency.model).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgec.errors import ConfigError, DataError
from edgec.latency.features import (
    ARITHMETIC,
    KINDS,
    ZERO_POINT_COLUMNS,
    aggregate,
    aggregate_names,
)
from edgec.latency.model import (
    CANDIDATES,
    COVERAGE_COLUMNS,
    AdditiveModel,
    BoostedModel,
    LatencyKey,
    LatencyModel,
    LatencySample,
    Tree,
    column_matrix,
    configuration_id,
    profile_set_digest,
)

MIN_CONFIGURATIONS = 4  # distinct configurations a key needs to be fit (leave-one-out needs 3+)
MIN_BOOSTED = 8  # below this many configurations only the additive model is a candidate
ADDITIVE_COLUMNS = ("intercept", "stage_calls",
                    *(f"macs:{a}:{k}" for a in ARITHMETIC for k in KINDS), "macs:per_channel",
                    *ZERO_POINT_COLUMNS,
                    *(f"bytes:{a}" for a in ARITHMETIC), *(f"layers:{a}" for a in ARITHMETIC))
BOOSTED_PARAMS = {"max_iter": 40, "learning_rate": 0.2, "max_leaf_nodes": 8,
                  "min_samples_leaf": 3, "l2_regularization": 0.0, "early_stopping": False,
                  "random_state": 0}


def fit_additive(rows: list[dict[str, float]], latency_ms: np.ndarray) -> AdditiveModel:
    """Non-negative least squares on relative error over the columns these rows use."""
    from scipy.optimize import nnls

    used = tuple(c for c in ADDITIVE_COLUMNS if any(row[c] != 0 for row in rows))
    x = column_matrix(rows, used)
    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0
    weights, _ = nnls(x / scale / latency_ms[:, None], np.ones(len(latency_ms)))
    return AdditiveModel(used, tuple(float(w) for w in weights / scale))


def boosted_estimator(x: np.ndarray, log_latency: np.ndarray):
    """The fitted HistGradientBoostingRegressor (one OpenMP thread: fits of 100 rows are
    faster alone, and do not disturb measurements running beside them)."""
    from sklearn.ensemble import HistGradientBoostingRegressor
    from threadpoolctl import threadpool_limits

    params = {**BOOSTED_PARAMS, "min_samples_leaf": min(3, max(1, len(x) // 4))}
    with threadpool_limits(1):
        return HistGradientBoostingRegressor(**params).fit(x, log_latency)


def export_estimator(estimator, columns: tuple[str, ...]) -> BoostedModel:
    """The trees of a fitted HistGradientBoostingRegressor (squared error, numeric features)."""
    if estimator.n_trees_per_iteration_ != 1 or estimator.is_categorical_ is not None:
        raise ConfigError("only single-output regressors on numeric features can be exported")
    trees = []
    for iteration in estimator._predictors:
        nodes = iteration[0].nodes
        if nodes["is_categorical"].any():
            raise ConfigError("a tree splits on a categorical feature; it cannot be exported")
        trees.append(Tree(nodes["feature_idx"].astype(np.int64),
                          nodes["num_threshold"].astype(np.float64),
                          nodes["missing_go_to_left"].astype(bool),
                          nodes["left"].astype(np.int64), nodes["right"].astype(np.int64),
                          nodes["is_leaf"].astype(bool), nodes["value"].astype(np.float64)))
    return BoostedModel(columns, float(estimator._baseline_prediction[0, 0]), tuple(trees))


def fit_boosted(rows: list[dict[str, float]], latency_ms: np.ndarray) -> BoostedModel:
    """Gradient-boosted trees on every aggregate column, exported for numpy."""
    columns = aggregate_names()
    estimator = boosted_estimator(column_matrix(rows, columns), np.log(latency_ms))
    return export_estimator(estimator, columns)


FITTERS = {"additive": fit_additive, "boosted": fit_boosted}


def error_metrics(predicted: np.ndarray, measured: np.ndarray) -> dict[str, Any]:
    """Mean and median absolute percentage error (fractions), the share within ±10 % and
    Kendall's τ between predicted and measured (None for fewer than 2 or constant values)."""
    from scipy.stats import kendalltau

    predicted, measured = np.asarray(predicted, float), np.asarray(measured, float)
    ape = np.abs(predicted - measured) / measured
    tau = float(kendalltau(predicted, measured).statistic) if len(measured) > 1 else float("nan")
    return {"n": len(measured), "mape": float(ape.mean()), "median_ape": float(np.median(ape)),
            "within_10": float((ape <= 0.10).mean()),
            "kendall_tau": tau if np.isfinite(tau) else None}


def configuration_errors(predicted: np.ndarray, measured: np.ndarray, groups: list[str]
                         ) -> dict[str, Any]:
    """:func:`error_metrics` per configuration: its prediction against the mean of its
    measurements (a configuration measured twice on a shared 2-core VM differed by 14 % in the
    median, so one measurement is a noisy target; ``n`` counts configurations)."""
    order = list(dict.fromkeys(groups))
    labels = np.array(groups)
    predicted, measured = np.asarray(predicted, float), np.asarray(measured, float)
    return error_metrics(np.array([predicted[labels == g].mean() for g in order]),
                         np.array([measured[labels == g].mean() for g in order]))


def repeatability(samples: list[LatencySample]) -> dict[str, Any] | None:
    """How well the board's own measurements pin each configuration down, over those measured
    at least twice (None if fewer than two were): ``mean_se`` is the median relative standard
    error of a configuration's mean latency (std / √k / mean), so a perfect model's median
    error against those means would be about ``floor_median_ape`` = 0.674 · mean_se (normal
    noise); ``halves`` is :func:`error_metrics` of one half of each configuration's
    measurements (alternate ones in the order recorded: interleaved rounds) against the other,
    whose Kendall τ says how far the board itself can rank them; ``halves_scaled`` the same
    after one common factor ``halves_factor`` (the median ratio of the halves): a machine that
    ran every configuration of one measurement set faster alike moves no ranking."""
    measured: dict[str, list[float]] = {}
    for sample in samples:
        measured.setdefault(configuration_id(sample.features), []).append(sample.latency_ms)
    repeated = [np.array(ms) for ms in measured.values() if len(ms) > 1]
    if len(repeated) < 2:
        return None
    mean_se = float(np.median([ms.std(ddof=1) / np.sqrt(len(ms)) / ms.mean()
                               for ms in repeated]))
    first, second = np.array([(ms[0::2].mean(), ms[1::2].mean()) for ms in repeated]).T
    factor = float(np.median(first / second))
    return {"n": len(repeated), "mean_se": mean_se, "floor_median_ape": 0.674 * mean_se,
            "halves": error_metrics(first, second), "halves_factor": factor,
            "halves_scaled": error_metrics(first / factor, second)}


def loo_predictions(candidate: str, rows: list[dict[str, float]], latency_ms: np.ndarray,
                    groups: list[str]) -> np.ndarray:
    """Each sample predicted by the candidate fit without its configuration (every repeated
    measurement of it left out together)."""
    fitter = FITTERS[candidate]
    predicted = np.empty(len(rows))
    labels = np.array(groups)
    for group in dict.fromkeys(groups):
        held = labels == group
        train = [row for row, out in zip(rows, held) if not out]
        model = fitter(train, latency_ms[~held])
        predicted[held] = model.predict_rows([row for row, out in zip(rows, held) if out])
    return predicted


def fit(samples: list[LatencySample], key: LatencyKey) -> LatencyModel:
    """Fit both candidates on the samples of one key; choose the one with the lower
    leave-one-configuration-out median APE (the additive one on a tie, or with fewer than
    MIN_BOOSTED configurations)."""
    rows, latency_ms, groups = _training_set(samples, key)
    configurations = len(set(groups))
    candidates = CANDIDATES if configurations >= MIN_BOOSTED else ("additive",)
    loo: dict[str, dict[str, Any] | None] = dict.fromkeys(CANDIDATES)
    for candidate in candidates:
        loo[candidate] = configuration_errors(
            loo_predictions(candidate, rows, latency_ms, groups), latency_ms, groups)
    chosen = min(candidates, key=lambda c: (loo[c]["median_ape"], CANDIDATES.index(c)))
    seen = tuple(c for c in COVERAGE_COLUMNS if any(row[c] > 0 for row in rows))
    return LatencyModel(key, chosen, fit_additive(rows, latency_ms),
                        fit_boosted(rows, latency_ms) if "boosted" in candidates else None,
                        len(samples), configurations, profile_set_digest(samples), loo, seen)


def _training_set(samples: list[LatencySample], key: LatencyKey):
    """Aggregate rows, latencies and configuration ids; a DataError for samples that do not
    belong to the key or are too few."""
    for sample in samples:
        for name in ("backend", "threads"):
            if sample.features.get(name) != getattr(key, name):
                raise DataError(f"{sample.origin or 'a sample'}: {name} "
                                f"{sample.features.get(name)!r} in a fit for {key.describe()}")
        if not (np.isfinite(sample.latency_ms) and sample.latency_ms > 0):
            raise DataError(f"{sample.origin or 'a sample'}: latency {sample.latency_ms!r} ms is "
                            f"not a positive number")
    groups = [configuration_id(s.features) for s in samples]
    if len(set(groups)) < MIN_CONFIGURATIONS:
        raise DataError(f"{len(set(groups))} distinct configurations measured for "
                        f"{key.describe()}; a latency model needs at least {MIN_CONFIGURATIONS}: "
                        f"measure more on {key.device} (edgec profile / edgec build --device)")
    rows = [aggregate(s.features) for s in samples]
    return rows, np.array([s.latency_ms for s in samples], dtype=np.float64), groups


def hold_out(samples: list[LatencySample], count: int, seed: int = 0
             ) -> tuple[list[LatencySample], list[LatencySample]]:
    """(training samples, held-out samples): ``count`` configurations drawn with ``seed``, every
    measurement of a drawn configuration held out with it."""
    import random

    ids = list(dict.fromkeys(configuration_id(s.features) for s in samples))
    if count >= len(ids) - MIN_CONFIGURATIONS + 1:
        raise DataError(f"cannot hold out {count} of {len(ids)} configurations and fit on at "
                        f"least {MIN_CONFIGURATIONS}; measure more or hold out fewer")
    held = set(random.Random(seed).sample(ids, count))
    chosen = [configuration_id(s.features) in held for s in samples]
    return ([s for s, out in zip(samples, chosen) if not out],
            [s for s, out in zip(samples, chosen) if out])


def held_out_draws(samples: list[LatencySample], key: LatencyKey, count: int, draws: int = 1
                   ) -> tuple[LatencyModel, list[dict[str, Any]], list[str]]:
    """Repeated hold-out: for each of ``draws`` draws (seeds 0, 1, ...), the model fit without
    ``count`` configurations and its errors on them (:func:`evaluate`, with ``draw`` and the
    board's :func:`repeatability` on them). Returns the first draw's model, the reports, and
    why a draw was left out (its held-out configurations have layer kinds its training set
    lacks, which a model refuses to predict)."""
    first, reports, refused = None, [], []
    for seed in range(draws):
        train, held = hold_out(samples, count, seed)
        model = fit(train, key)
        first = model if first is None else first
        try:
            reports.append({**evaluate(model, held), "draw": seed,
                            "repeatability": repeatability(held)})
        except DataError as exc:
            refused.append(f"hold-out draw {seed}: {exc}")
    return first, reports, refused


def evaluate(model: LatencyModel, samples: list[LatencySample],
             key: LatencyKey | None = None) -> dict[str, Any]:
    """The model's errors on (held-out) samples measured under ``key`` (default its own)."""
    if not samples:
        raise DataError("no samples to evaluate the latency model on")
    key = key or model.key
    predicted = np.array([model.predict(s.features, key) for s in samples])
    return configuration_errors(predicted, np.array([s.latency_ms for s in samples]),
                                [configuration_id(s.features) for s in samples])
