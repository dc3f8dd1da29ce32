"""The tvm backend: ONNX → Relax → shared object, run by the artifact's own runner."""

from __future__ import annotations

import importlib.util
import shutil
import sys

import numpy as np
import pytest
import torch

from edgec.artifact import Artifact
from edgec.build import pick_backend, write_artifact
from edgec.data import preprocess
from edgec.devices import LocalDevice
from edgec.errors import CompileError, ConfigError, MissingExtraError
from edgec.pipeline import Context
from edgec.recipes import load_recipe
from edgec.targets import load_target
from tests.conftest import ROOT

pytest.importorskip("tvm", reason="apache-tvm not installed: pip install 'edgec[tvm]'")


def _exported(model, config, tmp_path, recipe="fp32.toml", calibration=None, target="local"):
    ctx = Context(load_target(target), config.input, calibration, tmp_path)
    return load_recipe(ROOT / "passes" / recipe).run(Artifact("torch", model), ctx)


def _runner_predict(artifact_dir):
    """The artifact's own runner.py, imported as the board would run it."""
    spec = importlib.util.spec_from_file_location("artifact_runner", artifact_dir / "runner.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    import json

    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    return runner.load(manifest, 1)


@pytest.fixture(scope="module")
def digits_fp32(digits_model, digits_config, tmp_path_factory):
    return _exported(digits_model, digits_config, tmp_path_factory.mktemp("digits"))


def test_local_tvm_artifact_matches_torch(digits_model, digits_config, digits_fp32, tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    manifest = write_artifact(digits_fp32, digits_config, load_target("local"), [], out, "tvm")
    assert manifest["entry"]["backend"] == "tvm" and manifest["entry"]["runs_on_host"]
    assert set(manifest["files"]) == {"model.so", "runner.py"}
    assert manifest["versions"]["tvm"].startswith("0.27")
    from examples.digits.digits import test as digits_test

    images, labels = digits_test()
    x = preprocess(images[:64], digits_config.input)
    predict, versions = _runner_predict(out)
    with torch.no_grad():
        expected = digits_model.eval()(torch.from_numpy(x)).numpy()
    assert np.abs(predict(x) - expected).max() < 1e-4
    np.savez(tmp_path / "eval.npz", images=images, labels=labels)
    result = LocalDevice().evaluate(out, str(tmp_path / "eval.npz"))
    assert result["total"] == len(labels) and result["top1"] > 0.9


def test_cross_compiled_for_aarch64(digits_config, digits_fp32, tmp_path):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("no aarch64 cross compiler: apt-get install g++-aarch64-linux-gnu")
    manifest = write_artifact(digits_fp32, digits_config, load_target("rpi4"), [], tmp_path, "tvm")
    header = (tmp_path / "model.so").read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # AArch64
    assert manifest["entry"]["tvm_target"]["mcpu"] == "cortex-a72"
    assert manifest["entry"]["runs_on_host"] is False


def test_int8_models_go_to_onnxruntime(resnet20, resnet20_config, cifar_train_slice, tmp_path):
    int8 = _exported(resnet20, resnet20_config, tmp_path, "int8.toml", cifar_train_slice, "rpi4")
    assert pick_backend(int8, load_target("rpi4")).name == "onnxruntime"
    with pytest.raises(CompileError, match="tvm: int8 QDQ"):
        pick_backend(int8, load_target("rpi4"), "tvm")


def test_backend_not_of_the_target_is_a_config_error(digits_fp32):
    with pytest.raises(ConfigError, match="not a backend of target 'pynq-z2'"):
        pick_backend(digits_fp32, load_target("pynq-z2"), "tvm")


def test_tuning_a_cross_target_is_refused(digits_config, digits_fp32, tmp_path):
    with pytest.raises(ConfigError, match="--tune 8: MetaSchedule measures candidates"):
        write_artifact(digits_fp32, digits_config, load_target("rpi4"), [], tmp_path, "tvm",
                       {"tune_trials": 8})


def test_missing_tvm_is_a_missing_extra_error(monkeypatch):
    from edgec.backends.tvm import TvmBackend

    monkeypatch.setitem(sys.modules, "tvm", None)  # what an absent package looks like to import
    with pytest.raises(MissingExtraError, match=r"pip install 'edgec\[tvm\]'"):
        TvmBackend().versions()


def test_tuning_cache_key_is_content_addressed():
    """Same model, target and budget share records; any change gets its own entry. (Tuning
    itself takes minutes here: benchmarks/tvm_tune.py runs it and shows the reuse.)"""
    from edgec.backends.tvm import tuning_cache_root, tuning_key

    llvm = {"kind": "llvm", "num-cores": 2}
    key = tuning_key(b"model", llvm, 8)
    assert key == tuning_key(b"model", dict(llvm), 8)
    assert len({key, tuning_key(b"model", llvm, 16), tuning_key(b"other", llvm, 8),
                tuning_key(b"model", {**llvm, "mcpu": "skylake"}, 8)}) == 4
    assert tuning_cache_root().name == "tvm-tuning"
