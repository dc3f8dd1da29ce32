"""CPU capabilities as data and the int8 scheme each backend's policy picks for them.

The /proc/cpuinfo texts are trimmed copies of real machines' (x86: AMD EPYC with AVX-512 VNNI, an
AVX2-only EPYC, a Skylake-X Xeon with AVX-512 but no VNNI, an Alder Lake core with AVX-VNNI;
Arm: Raspberry Pi 4 and 5).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgec import int8
from edgec.build import _accuracy_warnings
from edgec.cpu import CpuInfo, declared_cpu, host_cpu, target_cpu
from edgec.errors import ConfigError
from edgec.passes.quantize import QuantizeParams
from edgec.runner import runner
from edgec.targets import load_target
from tests.conftest import ROOT

EPYC_VNNI = ("model name\t: AMD EPYC 9R14\nflags\t\t: fpu sse sse2 ssse3 sse4_1 avx avx2 fma "
             "avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16\n")
EPYC_AVX2 = "model name\t: AMD EPYC 7R32\nflags\t\t: fpu sse sse2 ssse3 sse4_1 avx avx2 fma\n"
SKYLAKE_X = ("model name\t: Intel(R) Xeon(R) Platinum 8175M\nflags\t\t: sse4_2 avx avx2 avx512f "
             "avx512dq avx512bw avx512vl\n")
ALDER_LAKE = "model name\t: 12th Gen Intel(R) Core(TM) i7-1255U\nflags\t\t: avx avx2 avx_vnni\n"
PI4 = ("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
       "CPU implementer\t: 0x41\nCPU part\t: 0xd08\n")
PI5 = ("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 "
       "atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU part\t: 0xd0b\n")


@pytest.mark.parametrize("text, machine, path, model", [
    (EPYC_VNNI, "x86_64", "x86-vnni", "AMD EPYC 9R14"),
    (EPYC_AVX2, "x86_64", "x86-avx2", "AMD EPYC 7R32"),
    (SKYLAKE_X, "x86_64", "x86-avx512bw", "Intel(R) Xeon(R) Platinum 8175M"),
    (ALDER_LAKE, "x86_64", "x86-vnni", "12th Gen Intel(R) Core(TM) i7-1255U"),
    (PI4, "aarch64", "arm64-neon", "Cortex-A72"),
    (PI5, "aarch64", "arm64-dotprod", "Cortex-A76"),
])
def test_cpuinfo_gives_the_int8_kernel_path(text, machine, path, model):
    info = runner.cpu_info(text, machine, detected={})
    assert info["int8_path"] == path and info["model"] == model and info["arch"] == machine


def test_run_time_detection_overrides_cpuinfo():
    """Under an emulator /proc/cpuinfo is the host's; numpy's CPUID view is what the code runs."""
    haswell = {"AVX2": True, "AVX512F": False, "AVX512BW": False, "AVX512VNNI": False}
    assert runner.cpu_info(EPYC_VNNI, "x86_64", detected=haswell)["int8_path"] == "x86-avx2"
    # flags numpy cannot see (avx_vnni, amx_int8) count only where the text is this CPU's
    sapphire = ("model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: avx avx2 avx512f avx512bw "
                "avx512_vnni avx_vnni amx_int8\n")
    info = runner.cpu_info(sapphire, "x86_64", detected=haswell)
    assert info["features"] == ["avx2"] and info["int8_path"] == "x86-avx2"
    native = {"AVX2": True, "AVX512F": True, "AVX512BW": True, "AVX512VNNI": True}
    assert runner.cpu_info(sapphire, "x86_64", detected=native)["features"] == [
        "amx_int8", "avx2", "avx512_vnni", "avx512bw", "avx512f", "avx_vnni"]
    assert runner.cpu_info(ALDER_LAKE, "x86_64", detected={"AVX2": True, "AVX512F": False,
                                                          "AVX512BW": False, "AVX512VNNI": False}
                           )["int8_path"] == "x86-vnni"


def test_this_host_is_probed_and_board_targets_declare_theirs():
    here = host_cpu()
    assert here.arch == runner.ISA_ALIASES.get(os.uname().machine, os.uname().machine)
    assert target_cpu(load_target("local")) == here and here.source == "this host"
    pi4, pi5 = declared_cpu(load_target("rpi4")), target_cpu(load_target("rpi5"))
    assert (pi4.int8_path, pi4.int8_dot, pi4.model) == ("arm64-neon", False, "cortex-a72")
    assert (pi5.int8_path, pi5.int8_dot) == ("arm64-dotprod", True)
    assert "declared" in pi4.source


def _cpu(path: str) -> CpuInfo:
    features = {"x86-vnni": ("avx2", "avx512_vnni"), "x86-avx2": ("avx2",),
                "x86-avx512bw": ("avx2", "avx512bw"), "arm64-neon": ("asimd",),
                "arm64-dotprod": ("asimd", "asimddp")}[path]
    arch = "aarch64" if path.startswith("arm64") else "x86_64"
    return CpuInfo(arch, "test", features, "test")


@pytest.mark.parametrize("path, scheme", [
    ("x86-vnni", "u8s8"), ("x86-avx2", "u8s8-reduce-range"),
    ("x86-avx512bw", "u8s8-reduce-range"), ("arm64-neon", "u8s8"), ("arm64-dotprod", "u8s8"),
])
def test_onnxruntime_policy_keeps_exact_sums(path, scheme):
    choice = int8.choose(load_target("local"), _cpu(path))
    assert choice.scheme.name == scheme
    assert not int8.saturates(choice.scheme, path)
    assert int8.saturates(int8.U8S8, path) == (scheme != "u8s8")


def test_backend_owns_the_policy_and_the_recipe_may_force_one():
    jetson = load_target("jetson-orin-nano")
    assert int8.choose(jetson, declared_cpu(jetson)).scheme == int8.S8S8_SYMMETRIC
    assert int8.choose(jetson, declared_cpu(jetson), backend="onnxruntime").scheme == int8.U8S8
    forced = int8.choose(load_target("local"), _cpu("x86-avx2"), forced="s8s8")
    assert forced.scheme == int8.S8S8 and "recipe" in forced.reason
    with pytest.raises(ConfigError, match="no int8 policy"):
        int8.choose(load_target("pynq-z2"), _cpu("arm64-neon"))
    with pytest.raises(ValueError, match="scheme 'u4s4'"):
        QuantizeParams(scheme="u4s4")


def test_runner_warns_when_the_int8_path_differs_from_where_accuracy_was_measured():
    manifest = {"int8": {"scheme": "u8s8"},
                "accuracy": {"top1": 0.9179, "measured_on": {"cpu": {
                    "model": "AMD EPYC 9R14", "int8_path": "x86-vnni"}}}}
    avx2 = runner.cpu_info(EPYC_AVX2, "x86_64", detected={})
    warning = runner.int8_path_warning(manifest, avx2)
    assert "x86-vnni" in warning and "x86-avx2" in warning and "saturate" in warning
    assert "91.79 %" in warning
    assert runner.int8_path_warning(manifest, runner.cpu_info(EPYC_VNNI, "x86_64", {})) is None
    reduced = {**manifest, "int8": {"scheme": "u8s8-reduce-range"}}
    assert "rounding" in runner.int8_path_warning(reduced, avx2)
    assert runner.int8_path_warning({"accuracy": manifest["accuracy"]}, avx2) is None  # fp32


@pytest.mark.parametrize("device_top1, warns", [(0.9150, True), (0.9170, False)])
def test_build_says_when_host_and_device_disagree(device_top1, warns):
    cpu = {"model": "AMD EPYC", "int8_path": "x86-vnni"}
    manifest = {"accuracy": {"measured_on": {"device": "local", "cpu": cpu}},
                "accuracy_on_device": {"top1": device_top1, "total": 1000,
                                       "host_top1_same_images": 0.9165,
                                       "measured_on": {"device": "pi", "cpu": None}}}
    notes = _accuracy_warnings(manifest)
    assert bool(notes) == warns
    if warns:
        assert "pi" in notes[0] and "-0.15 points" in notes[0] and "x86-vnni" in notes[0]
    suspected = {**manifest["accuracy_on_device"], "runner_warnings": ["other int8 kernels"]}
    assert "other int8 kernels" in _accuracy_warnings({**manifest, "accuracy_on_device": suspected})
    same = {**suspected, "same_predictions_as_host": True, "top1": 0.9165}
    assert _accuracy_warnings({**manifest, "accuracy_on_device": same}) == []


@pytest.fixture(scope="module")
def resnet20_int8_models(resnet20, resnet20_config, cifar_train_slice, tmp_path_factory):
    """ResNet-20 int8 ONNX models, one per scheme (512 calibration images of the train split)."""
    from edgec.artifact import Artifact
    from edgec.passes.export import ExportParams, ExportPass
    from edgec.passes.fuse import FuseParams, FusePass
    from edgec.passes.quantize import QuantizePass
    from edgec.pipeline import Context

    ctx = Context(load_target("local"), resnet20_config.input, cifar_train_slice,
                  tmp_path_factory.mktemp("schemes"))
    fused = FusePass().run(Artifact("torch", resnet20), FuseParams(), ctx)
    exported = ExportPass().run(fused, ExportParams(), ctx)
    models = {}
    for scheme in ("u8s8-reduce-range", "u8s8"):
        quantized = QuantizePass().run(exported, QuantizeParams(scheme=scheme), ctx)
        assert quantized.lineage[-1].report["int8_scheme"]["scheme"] == scheme
        models[scheme] = ctx.workdir / f"{scheme}.onnx"
        quantized.payload.rename(models[scheme])
    return models


HASWELL_LOGITS = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import runner
print(json.dumps(runner.cpu_info()))
for path in sys.argv[3:]:
    session = runner.ort_session(path, 1)
    np.save(path + ".logits.npy", session.run(None, {"input": np.load(sys.argv[2])})[0])
"""


@pytest.mark.slow
def test_default_scheme_is_exact_on_avx2_where_u8s8_saturates(resnet20_int8_models, cifar_test,
                                                               resnet20_config, tmp_path):
    """qemu-x86_64 -cpu Haswell hides AVX-512/VNNI from ONNX Runtime, so this runs the AVX2
    kernels on any x86 machine: the reduce-range model's logits equal the host's, plain u8s8's
    do not (VPMADDUBSW saturates)."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None or os.uname().machine != "x86_64":
        pytest.skip("needs x86-64 and qemu-user (apt-get install qemu-user) to run AVX2 kernels")
    from edgec.data import preprocess

    x = tmp_path / "x.npy"
    np.save(x, preprocess(cifar_test.images[:64], resnet20_config.input))
    paths = [str(resnet20_int8_models[name]) for name in ("u8s8-reduce-range", "u8s8")]
    done = subprocess.run([qemu, "-cpu", "Haswell", sys.executable, "-c", HASWELL_LOGITS,
                           str(ROOT / "edgec" / "runner"), str(x), *paths],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"int8_path": "x86-avx2"' in done.stdout.splitlines()[-1]
    emulated = {name: np.load(f"{p}.logits.npy") for name, p in zip(("rr", "u8s8"), paths)}
    native = {name: runner.ort_session(p, 1).run(None, {"input": np.load(x)})[0]
              for name, p in zip(("rr", "u8s8"), paths)}
    here = host_cpu().int8_path
    assert np.abs(emulated["rr"] - native["rr"]).max() < 1e-5
    if not int8.saturates(int8.U8S8, here):  # this host sums exactly; Haswell saturates
        assert np.abs(emulated["u8s8"] - native["u8s8"]).max() > 1e-3


def test_an_emulated_arm_cpu_ignores_the_hosts_x86_cpuinfo():
    info = runner.cpu_info(EPYC_VNNI, "aarch64", detected={"ASIMD": True, "ASIMDDP": True})
    assert info == {"arch": "aarch64", "model": "aarch64 (model unknown)",
                    "features": ["asimd", "asimddp"], "int8_path": "arm64-dotprod"}
