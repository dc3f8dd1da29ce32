"""A latency model per board, learned from edgec's own profiles (issue #20, part 1).

``features``: what a built artifact is (layer table, backend, stages, exit rates);
``model``: the fitted model of one key, its JSON file and prediction (numpy only);
``fit``: fitting both candidates and choosing by leave-one-out error (scipy, scikit-learn);
``samples``: training samples from ``profiles/<device>/*.jsonl``.
"""

from edgec.latency.features import (
    artifact_features,
    layer_table_from_onnx,
    layer_table_from_torch,
)
from edgec.latency.fit import evaluate, fit
from edgec.latency.model import LatencyKey, LatencyModel, LatencySample, load, save, select_model
from edgec.latency.samples import samples_from_profiles

__all__ = ["LatencyKey", "LatencyModel", "LatencySample", "artifact_features", "evaluate", "fit",
           "layer_table_from_onnx", "layer_table_from_torch", "load", "samples_from_profiles",
           "save", "select_model"]
