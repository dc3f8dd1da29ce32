"""The quantize pass: mixed int4/int8 weights (HAWQ-V2) in real ONNX INT4, budgets, bad params."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgec import hawq
from edgec.accuracy import onnx_logits, top1
from edgec.artifact import Artifact
from edgec.config import from_dict
from edgec.data import load_data_config
from edgec.errors import BudgetError, ConfigError
from edgec.passes.export import ExportParams, ExportPass
from edgec.passes.fuse import FuseParams, FusePass
from edgec.passes.quantize import QuantizeParams, QuantizePass, weight_bytes
from edgec.pipeline import Context, Pipeline, Step
from edgec.recipes import load_recipe

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent


def _mixed(model, spec, calibration, workdir, **params):
    ctx = Context(None, spec, calibration, workdir, baseline=model)
    pipeline = Pipeline([Step(FusePass(), FuseParams()), Step(ExportPass(), ExportParams(opset=21)),
                         Step(QuantizePass(), QuantizeParams(mode="mixed", **params))])
    return pipeline.run(Artifact("torch", model), ctx)


def _int4_weights(path) -> dict[str, np.ndarray]:
    graph = onnx.load(str(path)).graph
    dequantized = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    return {i.name: numpy_helper.to_array(i) for i in graph.initializer
            if i.data_type == onnx.TensorProto.INT4 and i.name in dequantized}


def test_mixed_digits_stores_int4_and_lists_bits(digits_model, digits_config, tmp_path):
    data = load_data_config(ROOT / "examples" / "digits" / "data.toml")
    built = _mixed(digits_model, digits_config.input, data.load("calibration"), tmp_path,
                   accuracy_budget=5.0, weight_bytes_budget=0.7, calibration_count=256,
                   hessian_count=128, holdout_count=500)
    report = built.lineage[-1].report
    bits = report["bits"]
    assert set(bits) == {"conv1", "conv2", "fc"} and set(bits.values()) <= {4, 8}
    assert built.extras["weight_bits"] == bits
    assert report["weight_bytes"] <= 0.7 * report["int8_weight_bytes"]
    assert all(np.isfinite(v) for v in report["sensitivity_int4"].values())
    # sensitivity and the accuracy check use the calibration (training) split, never evaluation
    assert report["hessian_images"].startswith("digits.py:train")
    assert report["holdout"].startswith("digits.py:train") and report["holdout"].endswith("[256:756]")
    stored = _int4_weights(built.payload)
    assert len(stored) == sum(b == 4 for b in bits.values()) > 0
    # the int4 levels are exactly the per-channel clipped quantization of the float weights
    pre = onnx.load(str(tmp_path / "01-export.onnx")).graph
    floats = {i.name: numpy_helper.to_array(i) for i in pre.initializer}
    name = next(iter(stored))
    weight = floats[name.removesuffix("_quantized")]
    assert np.array_equal(stored[name], np.round(
        hawq.fake_quantize(weight, hawq.channel_scales(weight, 4), 4)
        / hawq.channel_scales(weight, 4).reshape((-1,) + (1,) * (weight.ndim - 1))))
    evaluation = data.load("evaluation")
    accuracy = top1(onnx_logits(built.payload, evaluation, digits_config.input), evaluation.labels)
    assert accuracy > 0.85  # ONNX Runtime runs the int4 QDQ graph


def test_unreachable_budget_names_best_drop(resnet20, resnet20_config, cifar_train_slice, tmp_path):
    with pytest.raises(BudgetError, match=r"best achievable top-1 drop there is \d+\.\d+ points"):
        _mixed(resnet20, resnet20_config.input, cifar_train_slice, tmp_path,
               accuracy_budget=0.0, weight_bytes_budget=0.55, calibration_count=64,
               hessian_count=32, hessian_samples=1, holdout_count=500)


@pytest.mark.parametrize("params, message", [
    ({"bits": [3, 8]}, "bits"),
    ({"mode": "int2"}, "mode"),
    ({"weight_bytes_budget": 0.0}, "weight_bytes_budget"),
    ({"accuracy_budget": -1.0}, "accuracy_budget"),
    ({"calibration": "imagined"}, "calibration"),
    ({"mode": "mixed", "per_channel": False}, "per_channel"),
])
def test_bad_params_are_config_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(QuantizeParams, params, "recipe.toml step 3 (quantize)")


def test_recipes_load():
    mixed = load_recipe(ROOT / "passes" / "mixed.toml").steps[-1].params
    assert (mixed.mode, mixed.accuracy_budget, mixed.weight_bytes_budget) == ("mixed", 1.0, 0.7)
    assert load_recipe(ROOT / "passes" / "datafree-int8.toml").steps[-1].params.calibration == "datafree"


def test_weight_bytes_counts_int4_as_half(tmp_path):
    from onnx import helper

    graph = helper.make_graph([], "g", [], [], initializer=[
        helper.make_tensor("w4", onnx.TensorProto.INT4, [10], [1] * 10),
        helper.make_tensor("w8", onnx.TensorProto.INT8, [10], [1] * 10),
        helper.make_tensor("b", onnx.TensorProto.FLOAT, [10], [1.0] * 10)])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    assert weight_bytes(tmp_path / "m.onnx") == 5 + 10 + 40


def _quantized_bytes(model, spec, calibration, workdir: Path, cache, scheme: str) -> bytes:
    from edgec.targets import load_target

    workdir.mkdir(parents=True)
    ctx = Context(load_target("local"), spec, calibration, workdir, baseline=model, cache=cache)
    pipeline = Pipeline([Step(FusePass(), FuseParams()), Step(ExportPass(), ExportParams()),
                         Step(QuantizePass(), QuantizeParams(scheme=scheme,
                                                             calibration_method="percentile"))])
    return Path(pipeline.run(Artifact("torch", model), ctx).payload).read_bytes()


def test_calibration_ranges_are_shared_across_int8_schemes(digits_model, digits_config,
                                                           tmp_path):
    """One calibration for every scheme: the cached ranges give byte-identical models to a
    fresh calibration, for a scheme with other int8 types and symmetric activations."""
    from edgec.cache import Cache

    calibration = load_data_config(ROOT / "examples" / "digits" / "data.toml").load("calibration")
    spec = digits_config.input
    fresh = _quantized_bytes(digits_model, spec, calibration, tmp_path / "fresh", None,
                             "s8s8-symmetric")
    cache = Cache(tmp_path / "cache")
    _quantized_bytes(digits_model, spec, calibration, tmp_path / "first", cache, "u8s8")
    assert cache.info()["evaluations"]["entries"] == 1  # the ranges
    shared = _quantized_bytes(digits_model, spec, calibration, tmp_path / "second", cache,
                              "s8s8-symmetric")
    assert cache.info()["evaluations"]["entries"] == 1  # read, not calibrated again
    assert shared == fresh
