"""The emulated Raspberry Pi as a real SSH board: the arm64 root (scripts/make-arm64-root.sh) runs
its own aarch64 sshd under qemu-user, in a network namespace at 10.77.9.2, and edgec profiles and
evaluates the rpi4 ResNet-20 artifact there end to end with SSHDevice.

Run by hand (root): ``python -m pytest tests/test_board_emulated.py -m board -q``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from edgec.artifact import read_manifest
from edgec.build import BuildRequest, build
from edgec.devices import LocalDevice
from edgec.devices.ssh import SSHDevice
from edgec.measure import MeasureSpec
from tests import sshd
from tests.conftest import EXAMPLES, ROOT, cifar10_data_toml, host_saturates

ARM64_ROOT = Path(os.environ.get("EDGEC_ARM64_ROOT", ROOT / ".board" / "arm64-root"))
HOST_IP, BOARD_IP = "10.77.9.1", "10.77.9.2"  # our own namespace's addresses, nothing else
BOARD_PYTHON = "/usr/bin/python3"  # the root's python3; its wheels come through a .pth file
EVAL_IMAGES = 200

pytestmark = [pytest.mark.board, pytest.mark.slow]


def _missing_reason() -> str:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("chroot"):
        return "the emulated board needs root, chroot and util-linux unshare"
    if not (ARM64_ROOT / ".edgec-ready-v1").is_file():
        return f"no arm64 root at {ARM64_ROOT}; run scripts/make-arm64-root.sh (as root)"
    if not (ARM64_ROOT / "usr" / "sbin" / "sshd").is_file():
        return (f"the arm64 root at {ARM64_ROOT} has no sshd; run scripts/make-arm64-root.sh "
                f"(as root) to install openssh-server in it")
    return sshd.missing_reason() or sshd.Namespace.missing_reason()


class ChrootSSHServer(sshd.SSHServer):
    """The root's own aarch64 sshd (under qemu), chrooted into the root, in ``netns``.

    Its keys and config live in ``<root>/tmp/<name>``; the config names them by their paths
    inside the root. /proc is mounted in a private mount namespace (never /sys: onnxruntime's
    cpuinfo reads the host's x86 topology there under qemu and crashes).
    """

    def __init__(self, arm64_root: Path, name: str, host: str, netns: str):
        self.arm64_root, self.inside = arm64_root, f"/tmp/{name}"
        super().__init__(arm64_root / "tmp" / name, host=host, netns=netns)
        self.config.write_text(self.config.read_text().replace(str(self.root), self.inside))
        self.lock_path = f"{self.inside}/board.lock"  # as the board (chrooted) sees it

    def start(self) -> ChrootSSHServer:
        (self.arm64_root / "run" / "sshd").mkdir(parents=True, exist_ok=True)
        config = f"{self.inside}/sshd_config"
        script = ('mount -t proc proc "$0/proc" && '
                  'exec chroot "$0" /usr/sbin/sshd -D -e -f "$1"')
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, "unshare", "-m", "sh", "-c", script,
                 str(self.arm64_root), config], stdout=log, stderr=log)
        deadline = time.monotonic() + 120  # an emulated sshd is slow to come up
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"board sshd exited: {self.log.read_text()[-2000:]}")
            if self._speaks():
                return self
            time.sleep(0.2)
        raise RuntimeError(f"board sshd did not start on {self.host}:{self.port}")


@pytest.fixture(scope="module")
def emulated_board():
    """The arm64 root's sshd at 10.77.9.2 in its own namespace; sshd and namespace always go."""
    reason = _missing_reason()
    if reason:
        pytest.skip(reason)
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():  # lost at reboot
        subprocess.run(["bash", str(ROOT / "scripts" / "make-arm64-root.sh"), str(ARM64_ROOT)],
                       check=True, capture_output=True)
    namespace = sshd.Namespace()
    namespace.host_ip, namespace.board_ip = HOST_IP, BOARD_IP
    name = f"edgec-board-{os.getpid()}"
    server = None
    try:
        namespace.create()
        server = ChrootSSHServer(ARM64_ROOT, name, host=BOARD_IP, netns=namespace.name).start()
        yield server
    finally:
        if server is not None:
            server.stop()
        namespace.delete()
        shutil.rmtree(ARM64_ROOT / "tmp" / name, ignore_errors=True)


@pytest.fixture(scope="module")
def rpi4_artifact(tmp_path_factory):
    """ResNet-20 int8 for the rpi4 target (onnxruntime), calibrated on the training split."""
    out = tmp_path_factory.mktemp("rpi4-build")
    data = cifar10_data_toml(out / "data.toml", calibration=512, evaluation=EVAL_IMAGES)
    result = build(BuildRequest(model=EXAMPLES / "resnet20_cifar10" / "model.toml",
                                target="rpi4", recipe=ROOT / "passes" / "int8.toml", data=data,
                                profile=False, out=out / "artifact"))
    return result.directory


def test_emulated_rpi4_profiles_and_evaluates_over_ssh(emulated_board, rpi4_artifact,
                                                        cifar_test, tmp_path):
    assert emulated_board.host == BOARD_IP  # only our own namespace is ever targeted
    config = sshd.board_config(emulated_board, Path(emulated_board.inside) / "work",
                               name="emulated-rpi4", target="rpi4", python=BOARD_PYTHON,
                               connect_timeout_s=60.0, command_timeout_s=900.0)
    images = tmp_path / "images.npz"
    np.savez(images, images=cifar_test.images[:EVAL_IMAGES],
             labels=cifar_test.labels[:EVAL_IMAGES])
    started = time.monotonic()
    with SSHDevice(config) as device:
        facts = device.facts()
        measurement = device.measure(rpi4_artifact, MeasureSpec(warmup=3, repeat=20,
                                                                min_time_s=0.0))
        on_board = device.evaluate(rpi4_artifact, str(images))
    here = LocalDevice().evaluate(rpi4_artifact, str(images))
    print(f"\nemulated rpi4: {facts.get('arch')} {facts.get('os')}, runtimes "
          f"{facts.get('runtimes')}; ResNet-20 int8 p50 {measurement.p50:.2f} ms "
          f"(n={len(measurement.samples_ms)}), top-1 {on_board['top1']:.3f} on "
          f"{on_board['total']} images; {time.monotonic() - started:.0f} s over SSH")
    assert facts["arch"] == "aarch64"
    assert facts["runtimes"].get("onnxruntime")
    assert len(measurement.samples_ms) >= 20 and math.isfinite(measurement.p50)
    assert measurement.p50 > 0
    assert on_board["total"] == here["total"] == EVAL_IMAGES
    if not host_saturates(read_manifest(rpi4_artifact)):
        assert on_board["predictions_sha256"] == here["predictions_sha256"], (on_board, here)
    assert device.uploads == 2  # the artifact and the images, once each


def test_devices_check_says_the_emulated_rpi4_matches(emulated_board, tmp_path):
    """`edgec devices check` on the aarch64 board with target rpi4: its requirements (Python
    >= 3.9, numpy, onnxruntime or tvm) are checked as data against what the probe found."""
    from typer.testing import CliRunner

    from edgec.cli import app
    from edgec.devices.inventory import save_device

    save_device(sshd.board_config(emulated_board, Path(emulated_board.inside) / "work",
                                  name="emulated-rpi4", target="rpi4", python=BOARD_PYTHON,
                                  connect_timeout_s=60.0), tmp_path / "devices")
    checked = CliRunner().invoke(app, ["devices", "check", "emulated-rpi4", "--devices-dir",
                                       str(tmp_path / "devices")])
    print(f"\n{checked.output}")
    assert checked.exit_code == 0, checked.output
    assert "matches target rpi4" in checked.stdout and "aarch64" in checked.stdout
    assert not checked.stderr.strip()


def test_build_for_rpi4_evaluates_on_the_emulated_board(emulated_board, tmp_path, monkeypatch,
                                                         resnet20_config):
    """`edgec build --target rpi4 --device NAME --eval-count N`: the scheme is chosen for the
    board's own CPU (its runner probes it over SSH), the board evaluates the artifact, and the
    manifest keeps both accuracies with the CPU each ran on."""
    from edgec.devices.inventory import save_device

    config = sshd.board_config(emulated_board, Path(emulated_board.inside) / "work",
                               name="emulated-rpi4", target="rpi4", python=BOARD_PYTHON,
                               connect_timeout_s=60.0, command_timeout_s=900.0)
    save_device(config, tmp_path / "devices")
    monkeypatch.setenv("EDGEC_DEVICES_DIR", str(tmp_path / "devices"))
    data = cifar10_data_toml(tmp_path / "data.toml", calibration=512)
    result = build(BuildRequest(model=EXAMPLES / "resnet20_cifar10" / "model.toml",
                                target="rpi4", recipe=ROOT / "passes" / "int8.toml", data=data,
                                device="emulated-rpi4", eval_count=EVAL_IMAGES,
                                measure=MeasureSpec(warmup=2, repeat=10, min_time_s=0.0),
                                out=tmp_path / "out", profiles=tmp_path / "profiles"))
    manifest = result.manifest
    board_cpu = manifest["accuracy_on_device"]["measured_on"]["cpu"]
    print(f"\nemulated rpi4 CPU {board_cpu}; host {manifest['accuracy']['measured_on']['cpu']}; "
          f"scheme {manifest['int8']}; on board {manifest['accuracy_on_device']}")
    assert board_cpu["arch"] == "aarch64" and board_cpu["int8_path"].startswith("arm64")
    assert manifest["cpu"]["runs_on"]["source"] == "device emulated-rpi4"
    assert manifest["int8"]["int8_path"] == board_cpu["int8_path"]
    assert manifest["int8"]["scheme"] == "u8s8"  # Arm's int8 kernels sum exactly
    on_board = manifest["accuracy_on_device"]
    assert on_board["total"] == EVAL_IMAGES and manifest["accuracy"]["total"] == 10000
    assert abs(manifest["accuracy"]["top1"] - 0.9173) <= 0.005
    assert result.rows[-1].top1_on == "emulated-rpi4"
    if host_saturates(manifest):  # the board sums exactly, this host does not
        assert on_board["top1"] > 0.85
    else:
        assert on_board["same_predictions_as_host"] and not result.warnings


def test_search_on_the_emulated_board_measures_there(emulated_board, tmp_path, monkeypatch):
    """`edgec search --target rpi4 --device NAME`: four trials built for the board's own CPU,
    each measured and (partly) evaluated over SSH on the emulated aarch64 board; the pick's
    latency is the board's, and its rebuild command names the device."""
    from edgec.devices.inventory import save_device
    from edgec.search.study import SearchRequest, run_search

    config = sshd.board_config(emulated_board, Path(emulated_board.inside) / "work",
                               name="emulated-rpi4", target="rpi4", python=BOARD_PYTHON,
                               connect_timeout_s=60.0, command_timeout_s=900.0)
    save_device(config, tmp_path / "devices")
    monkeypatch.setenv("EDGEC_DEVICES_DIR", str(tmp_path / "devices"))
    monkeypatch.setenv("EDGEC_CACHE", str(tmp_path / "cache"))
    outcome = run_search(SearchRequest(
        EXAMPLES / "digits" / "model.toml", target="rpi4", device="emulated-rpi4", trials=4,
        recipes=("fp32", "int8"), backends=("onnxruntime",), overrides={"budget.holdout": 250},
        measure=MeasureSpec(warmup=2, repeat=10, min_time_s=0.0), eval_count=EVAL_IMAGES,
        out=tmp_path / "out"))
    built = [r for r in outcome.records if r.counts]
    complete = [r for r in built if r.state == "complete"]
    print(f"\nsearch on the emulated rpi4: {len(built)} built, {len(complete)} complete; pick "
          f"{outcome.pick and outcome.pick.record.label()}: {outcome.pick and outcome.pick.decision}")
    assert len(built) == 4 and len(complete) >= 3  # ~20 s a trial under qemu
    for record in complete:
        manifest = read_manifest(Path(record.attrs["artifact"]))
        assert manifest["accuracy_on_device"]["total"] == EVAL_IMAGES
        assert manifest["accuracy_on_device"]["measured_on"]["cpu"]["arch"] == "aarch64"
        profile = json.loads((Path(record.attrs["artifact"]) / "profile.json").read_text())
        assert profile["device"] == "emulated-rpi4"
    assert outcome.pick is not None
    assert "--device" in outcome.command and "emulated-rpi4" in outcome.command
    assert "--eval-count" in outcome.command


@pytest.mark.skipif(not os.environ.get("EDGEC_BOARD_SEARCH_RESNET20"),
                    reason="ResNet-20 search on the emulated board takes ~20 min under qemu; set "
                           "EDGEC_BOARD_SEARCH_RESNET20=1 (and EDGEC_CACHE to a local search's "
                           "cache to share its prune steps) to run it")
def test_resnet20_search_on_the_emulated_board(emulated_board, tmp_path, monkeypatch):
    """The ResNet-20 search of the issue's acceptance, on the emulated rpi4: fp32, int8 and
    prune-int8 on onnxruntime (the board's root has no ExecuTorch), 8 trials, 200 test images
    evaluated on the board; prints the pick and the table of trials."""
    from edgec.devices.inventory import save_device
    from edgec.search.report import trial_rows
    from edgec.search.study import SearchRequest, run_search

    config = sshd.board_config(emulated_board, Path(emulated_board.inside) / "work",
                               name="emulated-rpi4", target="rpi4", python=BOARD_PYTHON,
                               connect_timeout_s=60.0, command_timeout_s=1800.0)
    save_device(config, tmp_path / "devices")
    monkeypatch.setenv("EDGEC_DEVICES_DIR", str(tmp_path / "devices"))
    monkeypatch.chdir(tmp_path)  # its profile database (./profiles) stays out of the repository
    out = Path(os.environ.get("EDGEC_BOARD_SEARCH_OUT", tmp_path / "out"))
    outcome = run_search(SearchRequest(
        EXAMPLES / "resnet20_cifar10" / "model.toml", target="rpi4", device="emulated-rpi4",
        trials=8, recipes=("fp32", "int8", "prune-int8"), backends=("onnxruntime",),
        measure=MeasureSpec(warmup=2, repeat=10, min_time_s=0.0), eval_count=EVAL_IMAGES,
        out=out, study="r20-emulated-rpi4"))
    for row in trial_rows(outcome):
        print(" | ".join(row))
    print(f"pick: {outcome.pick and outcome.pick.record.label()}: "
          f"{outcome.pick and outcome.pick.decision}")
    built = [r for r in outcome.records if r.counts]
    assert len(built) >= 6 and sum(r.state == "complete" for r in built) >= 4
    assert outcome.pick is not None


@pytest.mark.skipif(not os.environ.get("EDGEC_BOARD_LATENCY_RESNET20"),
                    reason="sampling ResNet-20 structures on the emulated board takes ~20 s each "
                           "under qemu; set EDGEC_BOARD_LATENCY_RESNET20=N (configurations drawn "
                           "from the grid; EDGEC_BOARD_LATENCY_OUT keeps the profiles to resume)")
def test_resnet20_latency_model_on_the_emulated_board(emulated_board, tmp_path, monkeypatch):
    """#20's acceptance on the board: `edgec latency sample` measures ResNet-20 structures over
    SSH on the emulated rpi4 (onnxruntime: cuts x multiples x int8 schemes, per channel or
    not), `edgec latency fit --holdout 10` fits the board's model without 10 of them and
    predicts those: median error within 10 % and Kendall tau at least 0.8."""
    from edgec.cli_latency import fit_device, held_out_line, repeatability_line
    from edgec.devices.inventory import save_device
    from edgec.latency.sample import SampleRequest, run_sample

    config = sshd.board_config(emulated_board, Path(emulated_board.inside) / "work",
                               name="emulated-rpi4", target="rpi4", python=BOARD_PYTHON,
                               connect_timeout_s=60.0, command_timeout_s=900.0)
    save_device(config, tmp_path / "devices")
    monkeypatch.setenv("EDGEC_DEVICES_DIR", str(tmp_path / "devices"))
    out = Path(os.environ.get("EDGEC_BOARD_LATENCY_OUT", tmp_path / "out"))
    outcome = run_sample(SampleRequest(
        (EXAMPLES / "resnet20_cifar10" / "model.toml",), device="emulated-rpi4", target="rpi4",
        count=int(os.environ["EDGEC_BOARD_LATENCY_RESNET20"]), profiles=out / "profiles",
        measure=MeasureSpec(warmup=1, repeat=2, min_time_s=0.0),
        rounds=int(os.environ.get("EDGEC_BOARD_LATENCY_ROUNDS", "1")),
        windows=int(os.environ.get("EDGEC_BOARD_LATENCY_WINDOWS", "10"))),
        progress=print)
    print(f"measured {len(outcome.measured)}, found {len(outcome.skipped)}, not buildable "
          f"{len(outcome.unbuildable)}")
    [fitted] = fit_device("emulated-rpi4", out / "profiles", holdout=10)
    model, [held] = fitted.model, fitted.held_out
    print(f"{model.key.describe()}: {model.configurations} configurations fit, chosen "
          f"{model.chosen}, leave-one-out {model.loo[model.chosen]}")
    print(repeatability_line(fitted.repeatability))
    print(held_out_line(held))
    assert model.key.runtime.startswith("onnxruntime=") and held["n"] == 10
    assert held["median_ape"] <= 0.10 and held["kendall_tau"] >= 0.8
