"""Mobile backends on the real ResNet-20: .ort and .pte run by the artifact's own runner.

fp32 artifacts must match the float model (max |logit diff| < 1e-4); int8 artifacts must keep
top-1 within 1 point of the float model on 2,000 test images.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgec.accuracy import top1, torch_logits
from edgec.artifact import Artifact, read_manifest, sha256_file
from edgec.build import write_artifact
from edgec.config import from_dict
from edgec.data import preprocess
from edgec.devices.local import LocalDevice
from edgec.errors import ConfigError, MissingExtraError
from edgec.measure import OVERSUBSCRIBED, MeasureSpec
from edgec.passes.export import ExportParams, ExportPass
from edgec.passes.fuse import FuseParams, FusePass
from edgec.passes.quantize import QuantizeParams, QuantizePass
from edgec.passes.quantize_pt2e import QuantizePt2eParams, QuantizePt2ePass
from edgec.pipeline import Context, Pipeline, Step
from edgec.targets import load_target

from .conftest import artifact_predict

ROOT = Path(__file__).resolve().parent.parent
IMAGES = 2000


@pytest.fixture(scope="module")
def android():
    return load_target("android-arm64")


@pytest.fixture(scope="module")
def images(cifar_test, resnet20_config):
    x = preprocess(cifar_test.images[:IMAGES], resnet20_config.input)
    return x, cifar_test.labels[:IMAGES]


@pytest.fixture(scope="module")
def float_logits(resnet20, cifar_test, resnet20_config):
    return torch_logits(resnet20, cifar_test.head(IMAGES), resnet20_config.input)


def _compile(steps, resnet20, resnet20_config, target, calibration, tmp_path, backend):
    ctx = Context(target, resnet20_config.input, calibration, tmp_path)
    source = Artifact("torch", resnet20, extras={"input_shape": list(resnet20_config.input.shape)})
    built = Pipeline(steps).run(source, ctx)
    directory = tmp_path / "artifact"
    directory.mkdir()
    manifest = write_artifact(built, resnet20_config, target, [], directory, backend_name=backend)
    return directory, manifest


def test_ort_mobile_fp32_matches_float(resnet20, resnet20_config, android, images, float_logits,
                                       tmp_path):
    steps = [Step(FusePass(), FuseParams()), Step(ExportPass(), ExportParams())]
    directory, manifest = _compile(steps, resnet20, resnet20_config, android, None, tmp_path,
                                   None)
    assert manifest["entry"]["backend"] == "ort-mobile"  # the target's first choice
    assert (directory / "model.ort").read_bytes()[4:8] == b"ORTM"  # ORT flatbuffer identifier
    logits = artifact_predict(directory)(images[0][:500])
    assert np.abs(logits - float_logits[:500]).max() < 1e-4


def test_ort_mobile_int8_within_one_point(resnet20, resnet20_config, android, images,
                                          float_logits, cifar_train_slice, tmp_path):
    steps = [Step(FusePass(), FuseParams()), Step(ExportPass(), ExportParams()),
             Step(QuantizePass(), QuantizeParams(calibration_count=256))]
    directory, manifest = _compile(steps, resnet20, resnet20_config, android, cifar_train_slice,
                                   tmp_path, None)
    assert manifest["entry"]["precision"] == "int8"
    logits = artifact_predict(directory)(images[0])
    assert abs(top1(logits, images[1]) - top1(float_logits, images[1])) <= 0.01


@pytest.mark.slow
def test_executorch_fp32_matches_float(resnet20, resnet20_config, android, images, float_logits,
                                       tmp_path):
    directory, manifest = _compile([Step(FusePass(), FuseParams())], resnet20, resnet20_config,
                                   android, None, tmp_path, None)
    assert manifest["entry"]["backend"] == "executorch"  # ort-mobile does not take torch models
    assert manifest["entry"]["delegate"] == "xnnpack"
    assert "executorch" in manifest["versions"]
    logits = artifact_predict(directory)(images[0][:200])
    assert np.abs(logits - float_logits[:200]).max() < 1e-4


def test_executorch_runs_on_the_threads_it_is_given(resnet20, resnet20_config, android,
                                                   tmp_path):
    """ExecuTorch's XNNPACK pool defaults to one thread per core; the runner resets it to
    ``--threads``. Measured with one thread, the process keeps about one core busy (1.8 with
    the pool left alone on a 2-core machine); on one core this holds either way."""
    directory, _ = _compile([Step(FusePass(), FuseParams())], resnet20, resnet20_config,
                            android, None, tmp_path, None)
    measured = LocalDevice().measure(directory, MeasureSpec(warmup=20, repeat=50,
                                                            min_time_s=1.0, threads=1))
    assert measured.extra["cores_busy"] < 1 + OVERSUBSCRIBED
    assert not measured.warnings


@pytest.mark.slow
def test_executorch_int8_pt2e_within_one_point(resnet20, resnet20_config, android, images,
                                               float_logits, cifar_train_slice, tmp_path):
    steps = [Step(FusePass(), FuseParams()),
             Step(QuantizePt2ePass(), QuantizePt2eParams(calibration_count=256))]
    directory, manifest = _compile(steps, resnet20, resnet20_config, android, cifar_train_slice,
                                   tmp_path, None)
    assert manifest["entry"]["precision"] == "int8"
    assert manifest["size_bytes"] < 0.4 * 4 * 270_000  # int8 weights, not float
    logits = artifact_predict(directory)(images[0])
    assert abs(top1(logits, images[1]) - top1(float_logits, images[1])) <= 0.01


def test_build_android_digits_records_backend_versions_files(tmp_path):
    """``edgec build --target android-arm64`` end to end (the self-contained digits example),
    as a user runs it: no log lines of ONNX Runtime's converter on the terminal."""
    done = subprocess.run([sys.executable, "-m", "edgec.cli", "build",
                           str(ROOT / "examples/digits/model.toml"), "--target", "android-arm64",
                           "--no-profile", "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[INFO]" not in done.stderr + done.stdout
    [directory] = (tmp_path / "android-arm64").iterdir()
    manifest = read_manifest(directory)
    assert manifest["entry"]["backend"] == "ort-mobile"
    assert {"onnxruntime", "edgec", "torch"} <= set(manifest["versions"])
    for name, digest in manifest["files"].items():
        assert sha256_file(directory / name) == digest
    assert manifest["accuracy"]["total"] == 500 and manifest["accuracy"]["top1"] > 0.9


def test_quantize_pt2e_rejects_bad_params():
    with pytest.raises(ConfigError, match="calibration_count"):
        from_dict(QuantizePt2eParams, {"calibration_count": 0}, "mobile-int8.toml step 2")


def test_litert_is_an_optional_extra(resnet20, resnet20_config, android, tmp_path):
    from edgec.backends.mobile import LiteRtBackend

    if importlib.util.find_spec("litert_torch") is not None:
        pytest.skip("litert-torch is installed; the missing-extra error cannot be shown")
    artifact = Artifact("torch", resnet20, extras={"input_shape": [3, 32, 32]})
    with pytest.raises(MissingExtraError, match=r"pip install 'edgec\[litert\]'"):
        LiteRtBackend().compile(artifact, android, tmp_path)


def test_litert_fp32_matches_float(resnet20, resnet20_config, android, images, float_logits,
                                   tmp_path):
    pytest.importorskip("litert_torch", reason="optional extra edgec[litert] is not installed")
    pytest.importorskip("ai_edge_litert", reason="optional extra edgec[litert] is not installed")
    with_litert = replace(android, backends=(*android.backends, "litert"))
    directory, manifest = _compile([Step(FusePass(), FuseParams())], resnet20, resnet20_config,
                                   with_litert, None, tmp_path, "litert")
    logits = artifact_predict(directory)(images[0][:100])
    assert np.abs(logits - float_logits[:100]).max() < 1e-4
