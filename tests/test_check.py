"""``edgec check``: per-backend op support, before any build."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from edgec.check import NATIVE, REWRITE, UNSUPPORTED, ModelViews, check_backend, check_model, render_check
from edgec.cli import app
from edgec.model import InputSpec
from tests.conftest import EXAMPLES

RESNET20 = EXAMPLES / "resnet20_cifar10" / "model.toml"


class Determinant(torch.nn.Module):
    """A model with an op (ONNX Det) that ONNX Runtime runs but TVM and TensorRT do not."""

    def forward(self, x):
        return torch.linalg.det(x[:, 0]).unsqueeze(1) + x.flatten(1)[:, :1]


def test_unsupported_op_is_named_per_backend():
    views = ModelViews(Determinant().eval(), InputSpec(shape=(1, 4, 4)))
    assert check_backend("onnxruntime", views).ops["Det"][0] == NATIVE
    tensorrt = check_backend("tensorrt", views)
    assert tensorrt.ops["Det"][0] == UNSUPPORTED and tensorrt.verdict.startswith("fails")
    pytest.importorskip("tvm", reason="apache-tvm not installed: pip install 'edgec[tvm]'")
    assert check_backend("tvm", views).ops["Det"] == (UNSUPPORTED, "no Relax ONNX converter")


def test_resnet20_on_pynq_needs_rewrites_for_hls4ml(resnet20_config):
    report = check_model(RESNET20, "pynq-z2")
    (hls,) = report.backends
    assert hls.backend == "hls4ml" and hls.graph == "fx"
    assert hls.ops["adaptive_avg_pool2d"][0] == REWRITE
    assert hls.ops["Conv2d"] == (NATIVE, "") and hls.counts["Conv2d"] == 19
    assert hls.verdict.startswith("needs rewrites")


def test_resnet20_on_rpi4_lowers_everywhere(resnet20_config):
    pytest.importorskip("tvm", reason="apache-tvm not installed: pip install 'edgec[tvm]'")
    report = check_model(RESNET20, "rpi4")
    verdicts = {check.backend: check.verdict for check in report.backends}
    # XNNPACK (rpi4's third backend) delegates the convolutions; the rest runs on portable ops
    executorch = verdicts.pop("executorch")
    assert verdicts == {"onnxruntime": "ok: every op native", "tvm": "ok: every op native"}
    assert executorch.startswith(("runs, ", "ok: ")), executorch
    tvm = report.backends[1]
    assert tvm.graph == "onnx_static" and "Constant" not in tvm.ops  # shape arithmetic folded
    assert tvm.counts["Conv"] == 19


def test_cli_prints_one_block_per_backend(resnet20_config):
    result = CliRunner().invoke(app, ["check", str(RESNET20), "--target", "android-arm64"])
    assert result.exit_code == 0, result.output
    for backend in ("[ort-mobile]", "[executorch]", "[onnxruntime]"):
        assert backend in result.output
    assert "edgec check: resnet20 on android-arm64" in result.output


def test_cli_unknown_target_is_one_clear_error(resnet20_config):
    result = CliRunner().invoke(app, ["check", str(RESNET20), "--target", "rpi9"])
    assert result.exit_code == 2 and "unknown target 'rpi9'" in result.output


def test_render_lists_every_op(resnet20_config):
    text = render_check(check_model(RESNET20, "jetson-orin-nano"))
    assert text.count("[") == 3 and "GlobalAveragePool" in text
