"""ZeroQ data-free calibration: synthetic inputs match BN statistics and calibrate int8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgec import zeroq
from edgec.accuracy import onnx_logits, top1
from edgec.artifact import Artifact
from edgec.data import load_data_config
from edgec.errors import PassError
from edgec.passes.export import ExportParams, ExportPass
from edgec.passes.fuse import FuseParams, FusePass
from edgec.passes.quantize import QuantizeParams, QuantizePass
from edgec.pipeline import Context, Pipeline, Step

torch.set_num_threads(1)
DIGITS = Path(__file__).resolve().parent.parent / "examples" / "digits"


def test_bn_statistics_loss_decreases(digits_model, digits_config):
    synthesis = zeroq.synthesize(digits_model, digits_config.input, count=16, steps=40, seed=0)
    assert synthesis.losses[-1] < 0.5 * synthesis.losses[0]
    assert zeroq.bn_statistics_loss(digits_model, synthesis.inputs) < synthesis.losses[0]
    low, high = zeroq.input_bounds(digits_config.input)
    assert synthesis.inputs.min() >= float(low.min()) and synthesis.inputs.max() <= float(high.max())
    again = zeroq.synthesize(digits_model, digits_config.input, count=16, steps=40, seed=0)
    assert np.array_equal(again.inputs, synthesis.inputs)


def test_model_without_batchnorm_is_refused(digits_config):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with pytest.raises(PassError, match="BatchNorm"):
        zeroq.synthesize(model, digits_config.input, count=2, steps=1)


def _int8_top1(model, config, calibration, params, workdir):
    data = load_data_config(DIGITS / "data.toml")
    ctx = Context(None, config.input, calibration, workdir, baseline=model)
    pipeline = Pipeline([Step(FusePass(), FuseParams()),
                         Step(ExportPass(), ExportParams()), Step(QuantizePass(), params)])
    built = pipeline.run(Artifact("torch", model), ctx)
    evaluation = data.load("evaluation")
    return top1(onnx_logits(built.payload, evaluation, config.input), evaluation.labels), built


def test_datafree_int8_close_to_real_data_int8(digits_model, digits_config, tmp_path):
    calibration = load_data_config(DIGITS / "data.toml").load("calibration")
    real, _ = _int8_top1(digits_model, digits_config, calibration, QuantizeParams(), tmp_path)
    # no calibration split at all: "auto" falls back to ZeroQ
    free, built = _int8_top1(digits_model, digits_config, None,
                             QuantizeParams(synthetic_count=32, synthetic_steps=60), tmp_path)
    report = built.lineage[-1].report
    assert report["calibration"] == "datafree (ZeroQ)"
    assert report["bn_loss_last"] < report["bn_loss_first"]
    assert abs(real - free) <= 0.03, (real, free)


def test_mixed_without_labelled_data_is_refused(digits_model, digits_config, tmp_path):
    from edgec.passes.quantize import calibration_batches

    ctx = Context(None, digits_config.input, None, tmp_path, baseline=digits_model)
    with pytest.raises(PassError, match="data-free calibration works with mode 'int8' only"):
        calibration_batches(QuantizeParams(mode="mixed"), ctx)
