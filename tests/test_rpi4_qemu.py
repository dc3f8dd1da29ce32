"""The rpi4 artifacts run on an emulated Raspberry Pi: aarch64 code under qemu-user in an arm64
Debian root (scripts/make-arm64-root.sh), with the board's own Python wheels. The outputs must
equal the host's: fp32 TVM logits within 1e-4, int8 ONNX Runtime argmax identical on 500 images.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from edgec.build import write_artifact
from edgec.data import preprocess
from edgec.devices import LocalDevice
from edgec.pipeline import Context
from edgec.recipes import load_recipe
from edgec.targets import load_target
from tests.conftest import ROOT, host_saturates

ARM64_ROOT = Path(os.environ.get("EDGEC_ARM64_ROOT", ROOT / ".board" / "arm64-root"))
LOGITS = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import runner
manifest = json.load(open(sys.argv[1] + "/manifest.json"))
predict, versions = runner.load(manifest, 1)
np.save(sys.argv[1] + "/logits.npy", predict(np.load(sys.argv[1] + "/x.npy")))
print(json.dumps(versions))
"""


@pytest.fixture(scope="module")
def board():
    """The arm64 root, or skip with the command that makes it."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("the emulated board needs root (chroot, mounts) and util-linux unshare")
    if not (ARM64_ROOT / ".edgec-ready-v1").is_file():
        pytest.skip(f"no arm64 root at {ARM64_ROOT}; run scripts/make-arm64-root.sh (as root)")
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "make-arm64-root.sh"), str(ARM64_ROOT)],
                       check=True, capture_output=True)
    return ARM64_ROOT


def on_board(root: Path, artifact: Path, argv: list[str], timeout: float = 300) -> str:
    """Copy ``artifact`` into the root and run ``python3 ARGV`` there (paths: ``{dir}``).

    /proc is mounted in a private mount namespace, so nothing outlives the call.
    """
    inside = f"/tmp/edgec-{uuid.uuid4().hex[:8]}"
    shutil.copytree(artifact, root / inside.lstrip("/"))
    try:
        argv = [a.replace("{dir}", inside) for a in argv]
        # no /sys: onnxruntime's cpuinfo, reading the host's x86 topology there under qemu,
        # crashes (SIGSEGV); without it, it falls back to /proc and runs correctly
        script = 'mount -t proc proc "$0/proc" && exec chroot "$0" /usr/bin/python3 "$@"'
        done = subprocess.run(["unshare", "-m", "sh", "-c", script, str(root), *argv],
                              capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stderr[-2000:]
        logits = root / inside.lstrip("/") / "logits.npy"
        if logits.is_file():
            shutil.copyfile(logits, artifact / "logits.npy")
        return done.stdout
    finally:
        shutil.rmtree(root / inside.lstrip("/"), ignore_errors=True)


def _build(model, config, recipe: str, target, out: Path, calibration=None, backend=None):
    ctx = Context(target, config.input, calibration, out.parent)
    built = load_recipe(ROOT / "passes" / recipe).run(_torch_artifact(model), ctx)
    out.mkdir()
    manifest = write_artifact(built, config, target, [], out, backend)
    return manifest


def _torch_artifact(model):
    from edgec.artifact import Artifact

    return Artifact("torch", model)


@pytest.mark.slow
def test_tvm_fp32_aarch64_logits_match_host(board, resnet20, resnet20_config, cifar_test,
                                            tmp_path):
    target = load_target("rpi4")
    artifact = tmp_path / "tvm"
    manifest = _build(resnet20, resnet20_config, "fp32.toml", target, artifact, backend="tvm")
    assert manifest["entry"]["backend"] == "tvm" and not manifest["entry"]["runs_on_host"]
    assert (artifact / "model.so").read_bytes()[:4] == b"\x7fELF"
    x = preprocess(cifar_test.images[:16], resnet20_config.input)
    np.save(artifact / "x.npy", x)
    versions = json.loads(on_board(board, artifact, ["-c", LOGITS, "{dir}"]).splitlines()[-1])
    board_logits = np.load(artifact / "logits.npy")
    with torch.no_grad():
        host_logits = resnet20.eval()(torch.from_numpy(x)).numpy()
    assert versions == {"tvm": "0.27.0.post1"}
    assert board_logits.shape == host_logits.shape == (16, 10)
    assert np.abs(board_logits - host_logits).max() < 1e-4


@pytest.mark.slow
def test_int8_onnxruntime_aarch64_argmax_identical_on_500(board, resnet20, resnet20_config,
                                                          cifar_test, cifar_train_slice, tmp_path):
    target = load_target("rpi4")
    artifact = tmp_path / "int8"
    manifest = _build(resnet20, resnet20_config, "int8.toml", target, artifact,
                      calibration=cifar_train_slice)
    assert manifest["entry"]["backend"] == "onnxruntime"
    np.savez(artifact / "eval.npz", images=cifar_test.images[:500], labels=cifar_test.labels[:500])
    host = LocalDevice().evaluate(artifact, str(artifact / "eval.npz"))
    out = on_board(board, artifact, ["{dir}/runner.py", "eval", "--data", "{dir}/eval.npz"])
    on_arm = json.loads(out.strip().splitlines()[-1])
    assert on_arm["total"] == host["total"] == 500
    assert manifest["int8"]["int8_path"] == "arm64-neon"  # rpi4 declares a Cortex-A72
    if not host_saturates(manifest):  # both sum u8 x s8 exactly: the same predictions
        assert on_arm["predictions_sha256"] == host["predictions_sha256"], (on_arm, host)
    assert on_arm["top1"] > 0.85
