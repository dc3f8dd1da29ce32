"""Model sources besides a factory: .pt2 ExportedProgram and .onnx; the measurement statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgec.accuracy import onnx_logits, torch_logits
from edgec.build import BuildRequest, build
from edgec.data import generated
from edgec.errors import MeasureError
from edgec.measure import Measurement, MeasureSpec
from edgec.model import load_model_config, load_torch_model
from edgec.onnx_export import export_onnx

from .conftest import EXAMPLES


def write_model_toml(tmp_path, file_name):
    path = tmp_path / "model.toml"
    path.write_text(f'name = "digits-file"\nfile = "{file_name}"\n'
                    f'data = "{EXAMPLES / "digits" / "data.toml"}"\n'
                    '[input]\nshape = [1, 8, 8]\nscale = 0.00392156862745098\n')
    return path


def test_pt2_exported_program_loads_and_matches(tmp_path, digits_model, digits_config):
    example = (torch.zeros(2, 1, 8, 8),)
    batch_dim = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
    program = torch.export.export(digits_model, example, dynamic_shapes=batch_dim)
    torch.export.save(program, tmp_path / "m.pt2")
    loaded = load_torch_model(load_model_config(write_model_toml(tmp_path, "m.pt2")))
    batch = generated(digits_config.input, 64)
    diff = np.abs(torch_logits(loaded, batch, digits_config.input)
                  - torch_logits(digits_model, batch, digits_config.input))
    assert diff.max() < 1e-5


def test_onnx_model_builds_with_an_onnx_recipe(tmp_path, digits_model, digits_config):
    (tmp_path / "m.onnx").write_bytes(export_onnx(digits_model, digits_config.input))
    recipe = tmp_path / "q.toml"
    recipe.write_text('[[step]]\npass = "quantize"\ncalibration_count = 256\n')
    result = build(BuildRequest(write_model_toml(tmp_path, "m.onnx"), "local", recipe,
                                out=tmp_path / "out", profile=False))
    assert [s["pass"] for s in result.manifest["lineage"]] == ["quantize"]
    batch = generated(digits_config.input, 64)
    built = onnx_logits(result.directory / "model.onnx", batch, digits_config.input)
    assert np.isfinite(built).all() and result.manifest["accuracy"]["top1"] > 0.9


def test_measurement_statistics():
    m = Measurement(tuple(float(v) for v in range(1, 101)), peak_rss_mb=10.0)
    assert m.p50 == pytest.approx(50.5) and m.p90 == pytest.approx(90.1)
    assert m.p99 == pytest.approx(99.01) and m.mean == pytest.approx(50.5)
    assert m.ci95 == pytest.approx(1.96 * np.std(range(1, 101), ddof=1) / 10)
    with pytest.raises(MeasureError, match="no samples"):
        Measurement((), 1.0)
    with pytest.raises(MeasureError, match="repeat >= 1"):
        MeasureSpec(repeat=0)
