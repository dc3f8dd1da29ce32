"""HAWQ-V2 maths: low-bit scales, Hutchinson traces (finite, seeded), Pareto order, bisection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.fx.experimental.optimization import fuse

from edgec import hawq
from edgec.data import load_data_config, preprocess

torch.set_num_threads(1)
DIGITS = Path(__file__).resolve().parent.parent / "examples" / "digits"


def digits_calibration():
    return load_data_config(DIGITS / "data.toml").load("calibration")


def test_clipped_int4_scales_beat_minmax():
    weight = np.random.default_rng(0).standard_t(3, size=(16, 8, 3, 3)).astype(np.float32)
    minmax = np.abs(weight.reshape(16, -1)).max(1) / 7
    error_minmax = ((hawq.fake_quantize(weight, minmax, 4) - weight) ** 2).sum()
    assert hawq.perturbation(weight, 4) < error_minmax
    assert hawq.perturbation(weight, 8) < hawq.perturbation(weight, 4)
    levels = hawq.fake_quantize(weight, hawq.channel_scales(weight, 4), 4) / \
        hawq.channel_scales(weight, 4).reshape(-1, 1, 1, 1)
    assert np.allclose(levels, np.round(levels)) and levels.min() >= -8 and levels.max() <= 7


def test_pareto_order_and_bisection():
    costs = [hawq.LayerCost("a", 100, 1.0, {4: 5.0, 8: 1.0}),
             hawq.LayerCost("b", 1000, 1.0, {4: 5.0, 8: 1.0}),
             hawq.LayerCost("c", 1000, 1.0, {4: 2.0, 8: 1.0})]
    assert hawq.pareto_order(costs) == ["c", "b", "a"]  # cheapest sensitivity per saved byte first
    assert hawq.bits_for(["c", "b", "a"], 2) == {"c": 4, "b": 4, "a": 8}
    drops = [0.1, 0.2, 0.4, 0.9, 1.5, 3.0]
    assert hawq.largest_passing(0, 5, lambda k: drops[k] <= 1.0) == 3
    assert hawq.largest_passing(2, 2, lambda k: True) == 2


def _traces(model, images, labels, spec, seed, batch=32, samples=2):
    model = fuse(model.eval())
    params = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    batches = [(torch.from_numpy(preprocess(images[i:i + batch], spec)),
                torch.from_numpy(labels[i:i + batch])) for i in range(0, len(images), batch)]
    return hawq.hessian_traces(model, params, batches, samples=samples, seed=seed)


def _assert_seeded(run):
    first, again, other = run(0), run(0), run(1)
    assert all(np.isfinite(v) for v in first.values())
    assert first == again  # same seed: identical traces, so an identical order
    assert first != other  # the probes really come from the seed
    costs = hawq.layer_costs({n: np.ones((4, 4), np.float32) for n in first}, first)
    assert hawq.pareto_order(costs) == hawq.pareto_order(
        hawq.layer_costs({n: np.ones((4, 4), np.float32) for n in again}, again))


def test_hessian_traces_digits_seeded(digits_model, digits_config):
    data = digits_calibration().head(128)
    _assert_seeded(lambda seed: _traces(digits_model, data.images, data.labels,
                                        digits_config.input, seed))


def test_hessian_traces_resnet20_seeded(resnet20, resnet20_config, cifar_train_slice):
    data = cifar_train_slice.head(32)
    traces = _traces(resnet20, data.images, data.labels, resnet20_config.input, 0, samples=1)
    assert len(traces) == 20 and all(np.isfinite(v) for v in traces.values())
    again = _traces(resnet20, data.images, data.labels, resnet20_config.input, 0, samples=1)
    assert traces == again
