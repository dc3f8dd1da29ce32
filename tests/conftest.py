"""Shared fixtures: the one helper that finds ../shared/data, and real models and splits."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(EXAMPLES / "resnet20_cifar10"))


@pytest.fixture(scope="session", autouse=True)
def edgec_cache(tmp_path_factory):
    """Every test session gets its own step cache (never the user's ~/.cache/edgec)."""
    folder = tmp_path_factory.mktemp("edgec-cache")
    before = os.environ.get("EDGEC_CACHE")
    os.environ["EDGEC_CACHE"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("EDGEC_CACHE", None)
    else:
        os.environ["EDGEC_CACHE"] = before


def artifact_predict(directory: Path):
    """predict(x) of the runner shipped inside an artifact: the code a board would run."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location(f"runner_{directory.name}", directory / "runner.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    predict, _ = runner.load(json.loads((directory / "manifest.json").read_text()), 1)
    return predict


def host_saturates(manifest) -> bool:
    """Whether this host's int8 kernels saturate with the artifact's scheme (x86 without VNNI
    and plain u8s8): then its predictions may differ from an Arm board's, which sums exactly."""
    from edgec import int8
    from edgec.cpu import host_cpu

    return int8.saturates(int8.SCHEMES[manifest["int8"]["scheme"]], host_cpu().int8_path)


def shared_file(name: str) -> Path:
    """A file of ../shared/data, or skip the test with the reason it is missing."""
    from edgec.config import shared_data_dir

    folder = shared_data_dir()
    if folder is None:
        pytest.skip("real data folder ../shared/data (or $EDGEC_DATA_DIR) is missing")
    path = folder / name
    if not path.is_file():
        pytest.skip(f"{path} is missing from the shared data folder")
    return path


def cifar10_data_toml(path: Path, calibration: int = 2000, evaluation: int | None = None
                      ) -> Path:
    """A data TOML at ``path``: calibration from the first ``calibration`` CIFAR-10 training
    images, evaluation on the first ``evaluation`` test images (all 10,000 when None)."""
    count = "" if evaluation is None else f"count = {evaluation}\n"
    path.write_text(f'[calibration]\npath = "{shared_file("cifar10_train.npz")}"\n'
                    f'count = {calibration}\n'
                    f'[evaluation]\npath = "{shared_file("cifar10_test.npz")}"\n{count}')
    return path


@pytest.fixture(scope="session")
def cifar_test():
    from edgec.data import SplitSpec, load_split

    return load_split(SplitSpec(path=str(shared_file("cifar10_test.npz"))), Path("."))


@pytest.fixture(scope="session")
def cifar_train_slice():
    """The first 2,000 training images: calibration / fine-tuning data for fast tests."""
    from edgec.data import SplitSpec, load_split

    return load_split(SplitSpec(path=str(shared_file("cifar10_train.npz")), count=2000), Path("."))


@pytest.fixture(scope="session")
def resnet20_config():
    from edgec.model import load_model_config

    shared_file("resnet20-12fca82f.th")
    return load_model_config(EXAMPLES / "resnet20_cifar10" / "model.toml")


@pytest.fixture(scope="session")
def resnet20(resnet20_config):
    from edgec.model import load_torch_model

    return load_torch_model(resnet20_config)


@pytest.fixture(scope="session")
def resnet56_config():
    from edgec.model import load_model_config

    shared_file("resnet56-4bfd9763.th")
    return load_model_config(EXAMPLES / "resnet20_cifar10" / "resnet56.toml")


@pytest.fixture(scope="session")
def resnet56(resnet56_config):
    from edgec.model import load_torch_model

    return load_torch_model(resnet56_config)


@pytest.fixture(scope="session")
def digits_config():
    from edgec.model import load_model_config

    return load_model_config(EXAMPLES / "digits" / "model.toml")


@pytest.fixture(scope="session")
def digits_model(digits_config):
    from edgec.model import load_torch_model

    return load_torch_model(digits_config)


@pytest.fixture(scope="session")
def local_target():
    from edgec.targets import load_target

    return load_target("local")


# ----- SSH device tests: a real OpenSSH server on loopback and small real artifacts ----------
@pytest.fixture(scope="session")
def ssh_server(tmp_path_factory):
    """A real sshd on 127.0.0.1 (own host key, client key, known_hosts); skips without sshd."""
    from tests import sshd

    reason = sshd.missing_reason()
    if reason:
        pytest.skip(reason)
    try:
        server = sshd.SSHServer(tmp_path_factory.mktemp("sshd")).start()
    except RuntimeError as exc:
        if os.geteuid() == 0:
            raise
        pytest.skip(f"sshd cannot run as a non-root user here: {exc}")
    yield server
    server.stop()


def digits_artifact(out: Path, recipe: str = "int8.toml") -> Path:
    """The digits example built for the local target with ``recipe`` (not profiled)."""
    from edgec.build import BuildRequest, build

    return build(BuildRequest(model=EXAMPLES / "digits" / "model.toml", target="local",
                              recipe=ROOT / "passes" / recipe, profile=False,
                              out=out)).directory


@pytest.fixture(scope="session")
def digits_int8_artifact(tmp_path_factory):
    """The digits example built for the local target (int8 recipe, not profiled)."""
    return digits_artifact(tmp_path_factory.mktemp("digits-build"))


@pytest.fixture(scope="session")
def resnet20_int8_artifact(tmp_path_factory, resnet20_config):
    """ResNet-20 built for the local target (int8 recipe, not profiled; accuracy on 1,000 test
    images only: this fixture is for latency tests, not accuracy claims)."""
    from edgec.build import BuildRequest, build

    out = tmp_path_factory.mktemp("resnet20-build")
    data = cifar10_data_toml(out / "data.toml", evaluation=1000)
    return build(BuildRequest(model=EXAMPLES / "resnet20_cifar10" / "model.toml", target="local",
                              recipe=ROOT / "passes" / "int8.toml", data=data, profile=False,
                              out=out)).directory
