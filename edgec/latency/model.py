"""The latency model of one board as it is used: its key, its two candidates, its JSON file.

One model per :class:`LatencyKey` (device or target, backend, runtime version, threads, CPU
governor): a latency measured under one of these says little about another. Two candidates are
fit (edgec.latency.fit) and the one with the lower leave-one-configuration-out median absolute
percentage error is chosen:

* ``additive``: latency ≈ c0 + c_stage·stage calls + Σ_layers (a_arith,kind·MACs
  + b_arith·bytes + d_arith) + e·per-channel MACs + z_0·int8 MACs on activations of zero
  point 0 + z_1·int8 MACs on others, every coefficient ≥ 0, fit by non-negative least squares
  on relative error (rows divided by the measured latency, columns scaled to at most 1);
  ``arith`` is the layer's arithmetic (fp32, or an int8 kernel such as u8s8: see
  edgec.latency.features). Layer sums are expected values per inference: a layer of an
  early-exit stage counts with the probability that its stage runs.
* ``boosted``: scikit-learn's HistGradientBoostingRegressor on the per-model aggregates
  (:func:`edgec.latency.features.aggregate`), on log latency, fixed random_state. Its trees are
  exported node by node into the JSON and evaluated here with numpy, as sklearn evaluates raw
  (unbinned) data: ``x <= num_threshold`` goes left, NaN goes where ``missing_go_to_left`` says.

This module needs only numpy (fitting, in edgec.latency.fit, needs scipy and scikit-learn). The
JSON carries its format version, the number of samples and a digest of the profile set the model
was fit on.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from edgec.errors import ConfigError, DataError
from edgec.latency.features import ARITHMETIC, FEATURES_FORMAT, KINDS, aggregate

MODEL_FORMAT = 2
CANDIDATES = ("additive", "boosted")
COVERAGE_COLUMNS = tuple(f"macs:{a}:{k}" for a in ARITHMETIC for k in KINDS)


@dataclass(frozen=True)
class LatencyKey:
    """What a latency depends on besides the configuration: where and how it was measured."""

    device: str  # a device name, or a target's name for profiles measured on the host
    backend: str
    runtime: str  # e.g. "onnxruntime=1.31.1" (see runtime_label)
    threads: int
    governor: str = "unknown"

    def describe(self) -> str:
        return (f"device {self.device}, backend {self.backend}, runtime {self.runtime}, "
                f"{self.threads} thread(s), governor {self.governor}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatencyKey:
        return cls(str(data["device"]), str(data["backend"]), str(data["runtime"]),
                   int(data["threads"]), str(data.get("governor", "unknown")))


def runtime_label(runtime: dict[str, str] | str) -> str:
    """``{"onnxruntime": "1.31.1"}`` → ``"onnxruntime=1.31.1"`` (sorted, comma separated)."""
    if isinstance(runtime, str):
        return runtime
    return ",".join(f"{name}={version}" for name, version in sorted(runtime.items())) or "unknown"


@dataclass(frozen=True, eq=False)
class LatencySample:
    """One measured configuration: its features (:func:`artifact_features`) and mean latency."""

    features: dict[str, Any]
    latency_ms: float
    origin: str = ""  # where it came from, for error messages ("profiles/pi/2025-01-02.jsonl:3")


def configuration_id(features: dict[str, Any]) -> str:
    """Identity of a configuration's structure (the artifact's hash left out: the weights'
    values do not change latency); repeated measurements of one share it."""
    blob = json.dumps({k: v for k, v in features.items() if k != "artifact"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def profile_set_digest(samples: list[LatencySample]) -> str:
    """SHA-256 of the set of (configuration, latency) pairs, independent of their order."""
    items = sorted(hashlib.sha256(json.dumps([s.features, s.latency_ms], sort_keys=True)
                                  .encode()).hexdigest() for s in samples)
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


# --- the two candidates ------------------------------------------------------------------------


def column_matrix(rows: list[dict[str, float]], columns: tuple[str, ...]) -> np.ndarray:
    """Rows of aggregate values as a float64 matrix of these columns, in this order."""
    return np.array([[row[c] for c in columns] for row in rows], dtype=np.float64)


@dataclass(frozen=True)
class AdditiveModel:
    """latency_ms = Σ coefficient × aggregate column; all coefficients ≥ 0."""

    columns: tuple[str, ...]
    coefficients: tuple[float, ...]

    def predict_rows(self, rows: list[dict[str, float]]) -> np.ndarray:
        """Predicted latency (ms) of aggregate rows."""
        return column_matrix(rows, self.columns) @ np.array(self.coefficients, dtype=np.float64)

    def to_json(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "coefficients": list(self.coefficients)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AdditiveModel:
        return cls(tuple(data["columns"]), tuple(float(c) for c in data["coefficients"]))


@dataclass(frozen=True)
class Tree:
    """One regression tree as sklearn's TreePredictor holds it, node arrays by field."""

    feature_idx: np.ndarray
    num_threshold: np.ndarray
    missing_go_to_left: np.ndarray
    left: np.ndarray
    right: np.ndarray
    is_leaf: np.ndarray
    value: np.ndarray

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Leaf value for every row of ``x`` (raw feature values)."""
        node = np.zeros(len(x), dtype=np.int64)
        rows = np.arange(len(x))
        for _ in range(len(self.value)):
            leaf = self.is_leaf[node]
            if leaf.all():
                break
            data = x[rows, self.feature_idx[node]]
            go_left = np.where(np.isnan(data), self.missing_go_to_left[node],
                               data <= self.num_threshold[node])
            node = np.where(leaf, node, np.where(go_left, self.left[node], self.right[node]))
        return self.value[node]

    def to_json(self) -> dict[str, list]:
        return {"feature_idx": self.feature_idx.tolist(),
                "num_threshold": [_finite_or_text(t) for t in self.num_threshold.tolist()],
                "missing_go_to_left": self.missing_go_to_left.astype(int).tolist(),
                "left": self.left.tolist(), "right": self.right.tolist(),
                "is_leaf": self.is_leaf.astype(int).tolist(), "value": self.value.tolist()}

    @classmethod
    def from_json(cls, data: dict[str, list]) -> Tree:
        return cls(np.array(data["feature_idx"], dtype=np.int64),
                   np.array([float(t) for t in data["num_threshold"]], dtype=np.float64),
                   np.array(data["missing_go_to_left"], dtype=bool),
                   np.array(data["left"], dtype=np.int64), np.array(data["right"], dtype=np.int64),
                   np.array(data["is_leaf"], dtype=bool),
                   np.array(data["value"], dtype=np.float64))


def _finite_or_text(value: float) -> float | str:
    """JSON has no infinity: sklearn's split-on-NaN thresholds (inf) are written as "inf"."""
    return value if math.isfinite(value) else str(value)


@dataclass(frozen=True)
class BoostedModel:
    """Gradient-boosted trees on aggregate columns predicting log(latency_ms)."""

    columns: tuple[str, ...]
    baseline: float
    trees: tuple[Tree, ...]

    def raw_predict(self, x: np.ndarray) -> np.ndarray:
        """log(latency_ms) per row of ``x``: what sklearn's ``est.predict`` returns, summed in
        its order (baseline, then each tree)."""
        out = np.zeros(len(x), dtype=np.float64) + self.baseline
        for tree in self.trees:
            out += tree.predict(x)
        return out

    def predict_rows(self, rows: list[dict[str, float]]) -> np.ndarray:
        """Predicted latency (ms) of aggregate rows."""
        return np.exp(self.raw_predict(column_matrix(rows, self.columns)))

    def to_json(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "target": "log_ms", "baseline": self.baseline,
                "trees": [tree.to_json() for tree in self.trees]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BoostedModel:
        return cls(tuple(data["columns"]), float(data["baseline"]),
                   tuple(Tree.from_json(tree) for tree in data["trees"]))


# --- the model of one key ----------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyModel:
    """The chosen candidate of one key, both candidates' leave-one-out errors and what the
    model was fit on (sample count, distinct configurations, profile-set digest)."""

    key: LatencyKey
    chosen: str
    additive: AdditiveModel
    boosted: BoostedModel | None
    samples: int
    configurations: int
    profile_set: str
    loo: dict[str, dict[str, Any] | None]
    seen: tuple[str, ...]  # arithmetic:kind columns the profiles held layers of

    def predict(self, features: dict[str, Any], key: LatencyKey) -> float:
        """Predicted mean latency (ms) of a configuration measured under ``key``; refuses a key
        other than the model's and layer kinds the profiles never held."""
        self.check_key(key)
        self.check_features(features)
        row = aggregate(features)
        candidate = self.additive if self.chosen == "additive" else self.boosted
        return float(candidate.predict_rows([row])[0])

    def check_key(self, key: LatencyKey) -> None:
        """Raise a ConfigError naming the first field where ``key`` differs from the model's."""
        for field in fields(LatencyKey):
            mine, theirs = getattr(self.key, field.name), getattr(key, field.name)
            if mine != theirs:
                raise ConfigError(
                    f"the latency model of {self.key.describe()} was fit for {field.name} "
                    f"{mine!r}, not {theirs!r}; measure configurations with {field.name} "
                    f"{theirs!r} and fit again with `edgec latency fit --device {key.device}`")

    def check_features(self, features: dict[str, Any]) -> None:
        """Raise unless the features were taken with the key's backend and threads and hold
        only layer kinds the profiles held."""
        for name in ("backend", "threads"):
            if features.get(name) != getattr(self.key, name):
                raise ConfigError(f"features of {name} {features.get(name)!r} given to the "
                                  f"latency model of {self.key.describe()}; take the features "
                                  f"with {name} {getattr(self.key, name)!r}")
        missing = self.unseen(features)
        if missing:
            raise DataError(
                f"the latency model of {self.key.describe()} saw no {', '.join(missing)} layers "
                f"in its {self.samples} profiles; measure configurations with them on "
                f"{self.key.device} and fit again with `edgec latency fit --device "
                f"{self.key.device}`")

    def unseen(self, features: dict[str, Any]) -> list[str]:
        """Arithmetic / kind pairs of these features that no profile of the fit held."""
        row = aggregate(features)
        return [c.removeprefix("macs:").replace(":", " ") for c in COVERAGE_COLUMNS
                if row[c] > 0 and c not in self.seen]

    def to_json(self) -> dict[str, Any]:
        return {"format": MODEL_FORMAT, "features_format": FEATURES_FORMAT,
                "key": self.key.to_json(), "chosen": self.chosen, "samples": self.samples,
                "configurations": self.configurations, "profile_set": self.profile_set,
                "loo": self.loo, "seen": list(self.seen), "additive": self.additive.to_json(),
                "boosted": self.boosted.to_json() if self.boosted else None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatencyModel:
        if data.get("format") != MODEL_FORMAT or data.get("features_format") != FEATURES_FORMAT:
            raise ConfigError(f"latency model of format {data.get('format')!r} (features "
                              f"{data.get('features_format')!r}); this edgec reads format "
                              f"{MODEL_FORMAT} (features {FEATURES_FORMAT}): fit it again with "
                              f"`edgec latency fit`")
        boosted = data.get("boosted")
        return cls(LatencyKey.from_json(data["key"]), data["chosen"],
                   AdditiveModel.from_json(data["additive"]),
                   BoostedModel.from_json(boosted) if boosted else None, int(data["samples"]),
                   int(data["configurations"]), data["profile_set"], data["loo"],
                   tuple(data["seen"]))


# --- files -------------------------------------------------------------------------------------


def save(path: str | Path, models: list[LatencyModel]) -> Path:
    """Write the models of one device as JSON, under a temporary name renamed into place."""
    from edgec.artifact import atomic_write_text

    text = json.dumps({"format": MODEL_FORMAT, "models": [m.to_json() for m in models]},
                      indent=1, allow_nan=False) + "\n"
    return atomic_write_text(Path(path), text)


def load(path: str | Path) -> list[LatencyModel]:
    """The models in a file :func:`save` wrote (needs only numpy)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no latency model at {path}; fit one with `edgec latency fit "
                          f"--device NAME`") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); fit it again with "
                          f"`edgec latency fit`") from None
    if not isinstance(data, dict) or "models" not in data:
        raise ConfigError(f"{path} is not an edgec latency model file; fit it again with "
                          f"`edgec latency fit`")
    try:
        return [LatencyModel.from_json(model) for model in data["models"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path} is damaged ({type(exc).__name__}: {exc}); fit it again with "
                          f"`edgec latency fit`") from None


def select_model(models: list[LatencyModel], device: str, backend: str, threads: int,
                 runtime: str | None = None, governor: str | None = None) -> LatencyModel:
    """The one model for this device, backend and threads (and runtime / governor when given);
    a ConfigError says what the file holds when none or several fit."""
    wanted = {"device": device, "backend": backend, "threads": threads, "runtime": runtime,
              "governor": governor}
    matches = [m for m in models
               if all(v is None or getattr(m.key, k) == v for k, v in wanted.items())]
    if len(matches) == 1:
        return matches[0]
    held = "; ".join(m.key.describe() for m in models) or "no models"
    asked = ", ".join(f"{k} {v}" for k, v in wanted.items() if v is not None)
    if not matches:
        raise ConfigError(f"no latency model for {asked} (the file holds: {held}); measure such "
                          f"configurations and fit with `edgec latency fit --device {device}`")
    raise ConfigError(f"{len(matches)} latency models fit {asked} ({held}); choose one with "
                      f"--runtime and --governor")
