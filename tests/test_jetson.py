"""The Jetson artifact: ONNX int8/fp16 variants, the on-board trtexec step, TVM CUDA for sm_87."""

from __future__ import annotations

import shlex
import shutil
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgec.artifact import Artifact, sha256_file
from edgec.backends.jetson import build_script, strip_qdq, trtexec_command
from edgec.build import write_artifact
from edgec.data import preprocess
from edgec.devices import LocalDevice
from edgec.pipeline import Context
from edgec.recipes import load_recipe
from edgec.targets import load_target
from tests.conftest import ROOT

FATBIN_MAGIC = bytes([0x50, 0xED, 0x55, 0xBA])


@pytest.fixture(scope="module")
def jetson_artifact(resnet20, resnet20_config, cifar_train_slice, tmp_path_factory):
    """ResNet-20, int8 recipe, compiled for jetson-orin-nano (calibrated on the train split)."""
    pytest.importorskip("tvm", reason="apache-tvm not installed: pip install 'edgec[tvm]'")
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("no aarch64 cross compiler: apt-get install g++-aarch64-linux-gnu")
    work = tmp_path_factory.mktemp("jetson")
    target = load_target("jetson-orin-nano")
    ctx = Context(target, resnet20_config.input, cifar_train_slice, work)
    built = load_recipe(ROOT / "passes" / "int8.toml").run(Artifact("torch", resnet20), ctx)
    out = work / "artifact"
    out.mkdir()
    return out, write_artifact(built, resnet20_config, target, [], out)


@pytest.mark.slow  # shares a ~40 s build (quantize, TVM CUDA, nvcc)
def test_manifest_is_complete(jetson_artifact):
    directory, manifest = jetson_artifact
    entry = manifest["entry"]
    assert entry["backend"] == "tensorrt"
    assert entry["variants"] == {"int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}
    assert {"model.int8.onnx", "model.fp16.onnx", "build_engine.sh", "model_cuda.so",
            "runner.py"} <= set(manifest["files"])
    for name, digest in manifest["files"].items():
        assert sha256_file(directory / name) == digest
    assert {"onnx", "onnxruntime", "tvm", "edgec", "torch"} <= set(manifest["versions"])
    assert manifest["target"]["name"] == "jetson-orin-nano"
    assert entry["tvm_cuda"]["arch"] == "sm_87"
    assert sorted(entry["on_board_build"]["creates"]) == ["model.fp16.plan", "model.int8.plan"]


@pytest.mark.slow  # shares a ~40 s build (quantize, TVM CUDA, nvcc)
def test_int8_variant_is_symmetric_signed_for_tensorrt(jetson_artifact):
    """TensorRT's explicit quantization takes only s8 with zero point 0: the backend's policy."""
    from onnx import numpy_helper

    directory, manifest = jetson_artifact
    assert manifest["int8"]["scheme"] == "s8s8-symmetric"
    model = onnx.load(str(directory / "model.int8.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node
                   if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)


@pytest.mark.slow  # shares a ~40 s build (quantize, TVM CUDA, nvcc)
def test_build_step_command_lines(jetson_artifact):
    directory, manifest = jetson_artifact
    commands = manifest["entry"]["on_board_build"]["commands"]
    int8 = shlex.split(commands["model.int8.plan"])
    assert int8[0] == "/usr/src/tensorrt/bin/trtexec"
    assert {"--onnx=model.int8.onnx", "--saveEngine=model.int8.plan", "--int8", "--fp16",
            "--optShapes=input:1x3x32x32", "--skipInference"} <= set(int8)
    fp16 = shlex.split(commands["model.fp16.plan"])
    assert "--fp16" in fp16 and "--int8" not in fp16
    script = (directory / "build_engine.sh").read_text()
    assert all(line in script for line in commands.values())
    subprocess.run(["sh", "-n", str(directory / "build_engine.sh")], check=True)


def test_build_script_quotes_hostile_paths_and_skips_built_engines(tmp_path):
    """Run the generated script with a stand-in trtexec that records its argv."""
    fake = tmp_path / "bin dir" / "trtexec"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done >> calls.txt\n'
                    'for a in "$@"; do case "$a" in --saveEngine=*) : > "${a#--saveEngine=}";;'
                    " esac; done\n")
    fake.chmod(0o755)
    argv = trtexec_command("my model;rm -rf x.onnx", "m $(id).plan", "int8", (3, 32, 32), str(fake))
    script = tmp_path / "build_engine.sh"
    script.write_text(build_script({"m $(id).plan": argv}))
    for _ in range(2):  # the second run finds the engine and does nothing
        subprocess.run(["sh", str(script)], check=True, cwd=tmp_path)
    assert (tmp_path / "calls.txt").read_text().splitlines() == argv[1:]
    assert (tmp_path / "m $(id).plan").is_file()


@pytest.mark.slow  # shares a ~40 s build (quantize, TVM CUDA, nvcc)
def test_tvm_cuda_module_compiled_for_orin(jetson_artifact):
    directory, manifest = jetson_artifact
    header = (directory / "model_cuda.so").read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # AArch64
    if shutil.which("nvcc") is None:
        assert manifest["entry"]["tvm_cuda"]["fatbin"].startswith("skipped")
        pytest.skip("nvcc not installed: the sm_87 fatbin is not built here")
    fatbin = directory / manifest["entry"]["tvm_cuda"]["fatbin"]
    assert fatbin.name == "kernels_sm_87.fatbin"
    assert fatbin.read_bytes()[:4] == FATBIN_MAGIC


@pytest.mark.slow  # shares a ~40 s build (quantize, TVM CUDA, nvcc)
def test_int8_variant_runs_with_the_artifacts_runner(jetson_artifact, cifar_test, tmp_path):
    directory, _ = jetson_artifact
    np.savez(tmp_path / "eval.npz", images=cifar_test.images[:500],
             labels=cifar_test.labels[:500])
    result = LocalDevice().evaluate(directory, str(tmp_path / "eval.npz"))
    assert result["total"] == 500 and result["top1"] > 0.85
    assert result["runtime"]["provider"] == "CPUExecutionProvider"  # no GPU on this host


@pytest.mark.slow  # shares a ~40 s build (quantize, TVM CUDA, nvcc)
def test_fp16_variant_agrees_with_the_float_model(jetson_artifact, resnet20, resnet20_config,
                                                  cifar_test):
    directory, _ = jetson_artifact
    fp16 = onnx.load(str(directory / "model.fp16.onnx"))
    assert not {n.op_type for n in fp16.graph.node} & {"QuantizeLinear", "DequantizeLinear"}
    x = preprocess(cifar_test.images[:300], resnet20_config.input)
    session = ort.InferenceSession(str(directory / "model.fp16.onnx"),
                                   providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": x})[0]
    with torch.no_grad():
        expected = resnet20.eval()(torch.from_numpy(x)).numpy()
    assert (logits.argmax(1) == expected.argmax(1)).mean() >= 0.97


@pytest.mark.slow  # shares a ~40 s build (quantize, TVM CUDA, nvcc)
def test_strip_qdq_keeps_the_int8_models_function(jetson_artifact, cifar_test, resnet20_config):
    directory, _ = jetson_artifact
    quantized = str(directory / "model.int8.onnx")
    stripped = strip_qdq(onnx.load(quantized))
    onnx.checker.check_model(stripped)
    x = preprocess(cifar_test.images[:200], resnet20_config.input)
    run = [ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
           for m in (quantized, stripped.SerializeToString())]
    assert (run[0].argmax(1) == run[1].argmax(1)).mean() >= 0.97


def test_without_a_cross_compiler_the_rest_is_built_and_the_gap_named(tmp_path):
    """TVM installed, no aarch64 linker: the ONNX/TensorRT part is built, the TVM CUDA module is
    skipped with the command that adds it (as when TVM itself is missing)."""
    from edgec.build import BuildRequest, build
    from edgec.resources import builtin_dir

    pytest.importorskip("tvm", reason="apache-tvm not installed: pip install 'edgec[tvm]'")
    text = (builtin_dir("targets") / "jetson-orin-nano.toml").read_text()
    target = tmp_path / "jetson-nolinker.toml"
    target.write_text(text.replace('cross_compiler = "aarch64-linux-gnu-g++"',
                                   'cross_compiler = "no-such-aarch64-g++"'))
    result = build(BuildRequest(model=ROOT / "examples" / "digits" / "model.toml",
                                target=str(target), out=tmp_path / "out", profile=False))
    entry = result.manifest["entry"]
    assert "no-such-aarch64-g++" in entry["tvm_cuda"]["skipped"]
    assert "apt-get install g++-aarch64-linux-gnu" in entry["tvm_cuda"]["skipped"]
    assert {"model.int8.onnx", "model.fp16.onnx"} <= set(entry["files"])
    assert "tvm_cuda not built: cross compiler" in (result.directory / "report.md").read_text()
