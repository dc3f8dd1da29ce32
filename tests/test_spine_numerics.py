"""The spine on real weights and real images: load, fuse, export, int8."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgec.accuracy import onnx_logits, top1, torch_logits
from edgec.artifact import Artifact
from edgec.cpu import host_cpu
from edgec.passes.export import ExportParams, ExportPass
from edgec.passes.fuse import FuseParams, FusePass
from edgec.passes.quantize import QuantizeParams, QuantizePass
from edgec.pipeline import Context
from edgec.targets import load_target


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, resnet20_config, local_target, cifar_train_slice):
    return Context(local_target, resnet20_config.input, cifar_train_slice,
                   tmp_path_factory.mktemp("work"))


@pytest.fixture(scope="module")
def fused(resnet20, ctx):
    return FusePass().run(Artifact("torch", resnet20), FuseParams(), ctx)


@pytest.fixture(scope="module")
def exported(fused, ctx):
    return ExportPass().run(fused, ExportParams(), ctx)


@pytest.fixture(scope="module")
def float_logits(resnet20, resnet20_config, cifar_test):
    return torch_logits(resnet20, cifar_test, resnet20_config.input)


def test_resnet20_scores_published_accuracy(float_logits, cifar_test):
    assert round(top1(float_logits, cifar_test.labels) * 100, 2) == 91.73


def test_fused_matches_float(fused, resnet20, resnet20_config, cifar_test):
    batch = cifar_test.head(500)
    diff = np.abs(torch_logits(fused.payload, batch, resnet20_config.input)
                  - torch_logits(resnet20, batch, resnet20_config.input)).max()
    assert diff < 1e-4
    assert fused.lineage[-1].report["bn_folded"] == 19
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.payload.modules())


def test_onnx_matches_torch(exported, float_logits, resnet20_config, cifar_test):
    batch = cifar_test.head(500)
    diff = np.abs(onnx_logits(exported.payload, batch, resnet20_config.input) - float_logits[:500])
    assert diff.max() < 1e-4


def test_int8_within_half_a_point(exported, ctx, float_logits, resnet20_config, cifar_test):
    """Holds on every CPU: the default scheme is chosen for the CPU that runs it (here, this
    host), and on x86 without VNNI that is not plain u8s8 (whose int16 sums saturate there)."""
    quantized = QuantizePass().run(exported, QuantizeParams(), ctx)
    scheme = quantized.lineage[-1].report["int8_scheme"]
    assert scheme["int8_path"] == host_cpu().int8_path
    if scheme["int8_path"] in ("x86-avx2", "x86-avx512bw", "x86-sse"):
        assert scheme["scheme"] == "u8s8-reduce-range"
    int8 = top1(onnx_logits(quantized.payload, cifar_test, resnet20_config.input), cifar_test.labels)
    assert abs(int8 - top1(float_logits, cifar_test.labels)) <= 0.005
    assert quantized.payload.stat().st_size < exported.payload.stat().st_size / 2


@pytest.mark.slow
def test_resnet56_int8_within_half_a_point(resnet56, resnet56_config, cifar_train_slice,
                                           cifar_test, tmp_path):
    ctx = Context(load_target("local"), resnet56_config.input, cifar_train_slice, tmp_path)
    fused = FusePass().run(Artifact("torch", resnet56), FuseParams(), ctx)
    quantized = QuantizePass().run(ExportPass().run(fused, ExportParams(), ctx),
                                   QuantizeParams(), ctx)
    int8 = top1(onnx_logits(quantized.payload, cifar_test, resnet56_config.input), cifar_test.labels)
    assert round(top1(torch_logits(resnet56, cifar_test, resnet56_config.input),
                      cifar_test.labels) * 100, 2) == 93.39
    assert abs(int8 - 0.9339) <= 0.005
