"""fuse: BatchNorm folding and block fusion, checked on ONNX Runtime's own optimised graph."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from edgec import int8
from edgec.artifact import Artifact
from edgec.data import preprocess
from edgec.onnx_export import export_onnx
from edgec.passes.fuse import FuseParams, FusePass, fused_ops
from edgec.passes.quantize import QuantizeParams, quantize_int8
from edgec.pipeline import Context


def fuse(model, spec, tmp_path, **params):
    ctx = Context(None, spec, workdir=tmp_path)
    return FusePass().run(Artifact("torch", copy.deepcopy(model)), FuseParams(**params), ctx)


@pytest.fixture(scope="module")
def resnet20_fused(resnet20, resnet20_config, tmp_path_factory):
    return fuse(resnet20, resnet20_config.input, tmp_path_factory.mktemp("fuse"))


def test_resnet20_block_fusion_is_exact(resnet20, resnet20_config, resnet20_fused, cifar_test):
    x = torch.from_numpy(preprocess(cifar_test.images[:16], resnet20_config.input))
    with torch.no_grad():
        torch.testing.assert_close(resnet20_fused.payload(x), resnet20(x), atol=1e-4, rtol=1e-4)
    report = resnet20_fused.lineage[-1].report
    assert report["bn_folded"] == 19 and report["shortcuts_as_conv"] == 2


def test_ort_fuses_every_conv_relu_and_residual_add_relu(resnet20_fused):
    ort = resnet20_fused.lineage[-1].report["ort_optimized"]
    # 19 convs + 2 shortcut convs; the 9 residual Add+ReLU ride inside the second conv of
    # each block; no ReLU or Add is left to run on its own
    assert ort["conv_add_relu_fused"] == 9
    assert ort["conv_relu_fused"] == 10
    assert ort["standalone_relu"] == 0 and ort["standalone_add"] == 0


def test_zero_pad_shortcuts_block_fusion_without_the_rewrite(resnet20, resnet20_config, tmp_path):
    plain = fuse(resnet20, resnet20_config.input, tmp_path, shortcut_conv=False)
    ort = plain.lineage[-1].report["ort_optimized"]
    assert ort["conv_add_relu_fused"] < 9 and ort["standalone_add"] > 0


def test_int8_graph_keeps_no_standalone_relu(resnet20_fused, resnet20_config, cifar_train_slice,
                                            tmp_path):
    source = tmp_path / "fp32.onnx"
    source.write_bytes(export_onnx(resnet20_fused.payload, resnet20_config.input))
    batches = [preprocess(cifar_train_slice.images[:32], resnet20_config.input)]
    quantize_int8(source, tmp_path / "int8.onnx", batches, QuantizeParams(calibration_count=32),
                  int8.U8S8)
    ort = fused_ops(tmp_path / "int8.onnx")
    assert ort["standalone_relu"] == 0
    assert ort["op_types"].get("QLinearConv", 0) == 21


def test_digits_conv_relu_fused(digits_model, digits_config, tmp_path):
    report = fuse(digits_model, digits_config.input, tmp_path).lineage[-1].report
    assert report["bn_folded"] == 2 and report["shortcuts_as_conv"] == 0
    assert report["ort_optimized"]["conv_relu_fused"] == 2
    assert report["ort_optimized"]["standalone_relu"] == 0


def test_unpaddable_graph_is_left_alone(tmp_path):
    class PadsSpace(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.pad(x[:, :, ::2, ::2], (1, 1, 1, 1))

    from edgec.model import InputSpec

    result = fuse(PadsSpace(), InputSpec((2, 4, 4)), Path(tmp_path), verify=False)
    assert result.lineage[-1].report["shortcuts_as_conv"] == 0
