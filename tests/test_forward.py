"""edgec.forward: the fast host forward agrees with eager PyTorch or is not used."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from edgec.forward import batch_forward, is_pt2e_quantized

torch.manual_seed(0)


def _images(digits_config, count: int = 64) -> torch.Tensor:
    from edgec.data import load_data_config, preprocess

    data = load_data_config(digits_config.resolve(digits_config.data)).load("evaluation")
    return torch.from_numpy(preprocess(data.images[:count], digits_config.input))


def _eager(model, x) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(x).numpy()


def test_a_float_module_runs_in_onnxruntime_with_the_same_top1(digits_model, digits_config):
    x = _images(digits_config)
    forward = batch_forward(digits_model.eval(), x, digits_config.input)
    assert forward.__qualname__.startswith("_onnxruntime")  # not the eager fallback
    got, expected = forward(x[:37]), _eager(digits_model, x[:37])  # any batch size
    assert got.shape == expected.shape == (37, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert digits_model.training is False


def test_a_model_with_two_outputs_runs_eagerly(digits_model, digits_config):
    class TwoOutputs(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            y = self.inner(x)
            return y, y.softmax(-1)

    x = _images(digits_config, 16)
    forward = batch_forward(TwoOutputs(digits_model).eval(), x, digits_config.input)
    assert forward.__qualname__.startswith("_eager")
    assert isinstance(forward(x), tuple)


def test_a_module_that_disagrees_with_its_export_runs_eagerly(digits_model, digits_config):
    class Stateful(torch.nn.Module):  # each call differs: the exported graph cannot agree
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * (1.0 if torch.jit.is_tracing() else -1.0)

    x = _images(digits_config, 16)
    model = Stateful(digits_model).eval()
    assert batch_forward(model, x, digits_config.input).__qualname__.startswith("_eager")


@pytest.mark.skipif(importlib.util.find_spec("executorch") is None,
                    reason="executorch (the mobile extra) is not installed")
def test_a_pt2e_graph_runs_lowered_to_xnnpack_and_keeps_its_top1(digits_model, digits_config):
    from edgec.data import load_data_config, to_batches
    from edgec.passes.quantize_pt2e import quantize_int8_pt2e

    data = load_data_config(digits_config.resolve(digits_config.data))
    calibration = to_batches(data.load("calibration").head(128), digits_config.input, 32)
    quantized = quantize_int8_pt2e(digits_model.eval(), calibration)
    assert is_pt2e_quantized(quantized) and not is_pt2e_quantized(digits_model)
    x = _images(digits_config, 250)
    forward = batch_forward(quantized, x, digits_config.input)
    assert type(forward).__name__ == "_Lowered"
    got = forward(x)  # 250 images: two full batches of 100 and one padded
    with torch.no_grad():
        expected = quantized(x).numpy()
    assert got.shape == expected.shape
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.98
