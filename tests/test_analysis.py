"""analysis: MAC / byte counts and the per-layer efficiency report."""

from __future__ import annotations

import math

from edgec.analysis import (
    efficiency_report,
    efficiency_section,
    onnx_layer_costs,
    render_efficiency,
    torch_layer_costs,
    total_macs,
)
from edgec.onnx_export import export_onnx


def test_resnet20_macs_match_hand_count(resnet20, resnet20_config):
    costs = {c.name: c for c in torch_layer_costs(resnet20, resnet20_config.input)}
    # stem: 32×32 outputs × 16 channels × (3 inputs × 3×3) = 442,368
    assert costs["conv1"].macs == 32 * 32 * 16 * 3 * 9 == 442_368
    # stage 3 inner conv: 8×8 × 64 × (64 × 3×3)
    assert costs["layer3.1.conv1"].macs == 8 * 8 * 64 * 64 * 9
    assert costs["linear"].macs == 640
    assert costs["conv1"].bytes_moved(4) == (3 * 32 * 32 + 16 * 27 + 16 * 32 * 32) * 4
    total = total_macs(resnet20, resnet20_config.input)
    assert total == 40_551_040 and abs(total - 41e6) / 41e6 < 0.02


def test_onnx_costs_match_torch(resnet20, resnet20_config, tmp_path):
    path = tmp_path / "r20.onnx"
    path.write_bytes(export_onnx(resnet20, resnet20_config.input))
    costs = onnx_layer_costs(path)
    assert len(costs) == 20
    assert sum(c.macs for c in costs) == total_macs(resnet20, resnet20_config.input)


def test_efficiency_report_is_finite(digits_model, digits_config, local_target, tmp_path):
    path = tmp_path / "digits.onnx"
    path.write_bytes(export_onnx(digits_model, digits_config.input))
    peak = local_target.peak_gmacs["fp32"]
    layers, other = efficiency_report(path, digits_config.input.shape, peak, runs=20)
    assert [la.kind for la in layers] == ["Conv", "Conv", "Gemm"]
    for layer in layers:
        assert layer.macs > 0 and layer.time_us > 0
        assert math.isfinite(layer.gmacs) and layer.efficiency > 0
    assert other >= 0
    table = render_efficiency(layers, other, peak, "fp32")
    assert "| **total** |" in table and "% of peak" in table


def test_efficiency_section_of_an_artifact(digits_model, digits_config, local_target, tmp_path):
    (tmp_path / "model.onnx").write_bytes(export_onnx(digits_model, digits_config.input))
    manifest = {"entry": {"backend": "onnxruntime", "files": ["model.onnx"]},
                "target": local_target.to_json(), "input": digits_config.input.to_json(),
                "lineage": [{"pass": "export"}]}
    section = efficiency_section(tmp_path, manifest)
    assert "Efficiency gap" in section and "48 GMAC/s (fp32)" in section
    assert efficiency_section(tmp_path, {**manifest, "entry": {"backend": "tvm"}}) == ""
