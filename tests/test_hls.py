"""FPGA path: hls_rewrite is exact; the hls4ml C simulation agrees with the float model.

CI runs the C simulation on the digits CNN (g++ compile ~30 s); ResNet-20 through hls4ml takes
~2.5 min to compile and ~1 s per image to simulate, so it is a ``board``-marked test here and
``benchmarks/fpga_resnet20.py`` (run by hand).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import fx, nn

from edgec.accuracy import torch_logits
from edgec.artifact import Artifact, LineageStep, read_manifest, sha256_file
from edgec.backends.hls import fixed_point_type
from edgec.batchnorm import fold_batchnorm
from edgec.build import BuildRequest, build
from edgec.data import load_data_config, preprocess
from edgec.errors import PassError
from edgec.passes.hls_rewrite import HlsRewriteParams, rewrite_for_hls
from edgec.targets import load_target

from .conftest import artifact_predict

ROOT = Path(__file__).resolve().parent.parent
needs_hls4ml = pytest.mark.skipif(
    importlib.util.find_spec("hls4ml") is None or shutil.which("g++") is None,
    reason="hls4ml (pip install 'edgec[fpga]') or g++ is missing")


def test_rewrite_resnet20_is_exact_and_leaves_only_hls4ml_layers(resnet20):
    graph = fx.symbolic_trace(resnet20)
    fold_batchnorm(graph)
    rewritten = rewrite_for_hls(graph, torch.zeros(1, 3, 32, 32))
    assert rewritten.meta["pooling_rewritten"] == 1
    assert rewritten.meta["shortcuts_rewritten"] == 2  # layer2.0 and layer3.0 option-A shortcuts
    functions = {getattr(n.target, "__name__", str(n.target)) for n in rewritten.graph.nodes
                 if n.op == "call_function"}
    assert functions <= {"relu", "add", "flatten"}, functions
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d | nn.Identity) for m in rewritten.modules())
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (rewritten(x) - resnet20(x)).abs().max().item() < 1e-4


def test_rewrite_rejects_pooling_that_is_not_fixed():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64, 2))
    with pytest.raises(PassError, match="6x6 → 4x4"):
        rewrite_for_hls(model.eval(), torch.zeros(1, 1, 8, 8))


def test_rewrite_params_are_validated():
    with pytest.raises(ValueError, match="tolerance"):
        HlsRewriteParams(tolerance=0)


def test_fixed_point_width_comes_from_the_quantize_bits_in_the_lineage():
    target = load_target("pynq-z2")
    plain = Artifact("torch", None)
    assert fixed_point_type(plain, target) == "ap_fixed<24,8>"
    quantized = Artifact("torch", None, (LineageStep("quantize", {"bits": 8}),))
    assert fixed_point_type(quantized, target) == "ap_fixed<8,6>"


@needs_hls4ml
@pytest.mark.slow
def test_build_pynq_z2_digits_csim_agrees_with_float(digits_config, digits_model, tmp_path):
    result = build(BuildRequest(model=ROOT / "examples/digits/model.toml", target="pynq-z2",
                                recipe=ROOT / "passes/fpga.toml", out=tmp_path, profile=False))
    manifest = read_manifest(result.directory)
    entry = manifest["entry"]
    assert entry["backend"] == "hls4ml" and entry["io_type"] == "io_stream"
    assert entry["precision"] == "ap_fixed<24,8>" and entry["reuse_factor"] == 64
    assert (result.directory / "hls" / "firmware" / "edgec_model.cpp").is_file()
    assert {"hls4ml", "g++"} <= set(manifest["versions"])
    for name, digest in manifest["files"].items():
        assert sha256_file(result.directory / name) == digest
    assert entry["resources"]["dsp"] > 0 and entry["resources"]["fits"]
    test = load_data_config(digits_config.resolve(digits_config.data)).load("evaluation")
    simulated = artifact_predict(result.directory)(preprocess(test.images, digits_config.input))
    reference = torch_logits(digits_model, test, digits_config.input)
    assert len(test) == 500
    assert (simulated.argmax(1) == reference.argmax(1)).mean() >= 0.99


@needs_hls4ml
@pytest.mark.board
@pytest.mark.skipif(not os.environ.get("EDGEC_BOARD_TESTS"),
                    reason="~10 min of g++ and C simulation: EDGEC_BOARD_TESTS=1 pytest -m board")
def test_resnet20_csim_agrees_with_float_on_500_images(resnet20_config, resnet20, cifar_test,
                                                      tmp_path):
    """~2.5 min g++ compile plus ~1 s per image of C simulation: run by hand (-m board)."""
    result = build(BuildRequest(model=ROOT / "examples/resnet20_cifar10/model.toml",
                                target="pynq-z2", recipe=ROOT / "passes/fpga.toml", out=tmp_path,
                                profile=False))
    images = cifar_test.head(500)
    simulated = artifact_predict(result.directory)(preprocess(images.images, resnet20_config.input))
    reference = torch_logits(resnet20, images, resnet20_config.input)
    assert (np.argmax(simulated, 1) == np.argmax(reference, 1)).mean() >= 0.99
