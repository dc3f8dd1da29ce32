"""Each bad input yields exactly one EdgecError whose message names the offending value."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgec.config import load_toml
from edgec.data import load_data_config, load_npz
from edgec.errors import ConfigError, DataError, EdgecError, ModelError
from edgec.model import import_factory, load_model_config, load_torch_model
from edgec.recipes import load_recipe
from edgec.targets import load_target

from .conftest import EXAMPLES, ROOT, shared_file

RESNET_DIR = EXAMPLES / "resnet20_cifar10"


def model_toml(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "model.toml"
    path.write_text(body)
    return path


def resnet_toml(tmp_path, factory="resnet.py:resnet20", checkpoint="", shape="[3, 32, 32]"):
    ckpt = f'checkpoint = "{checkpoint}"\n' if checkpoint else ""
    return model_toml(tmp_path, f'name = "m"\nfactory = "{RESNET_DIR / factory.split(":")[0]}:'
                      f'{factory.split(":")[1]}"\n{ckpt}[input]\nshape = {shape}\n')


def test_missing_model_file(tmp_path):
    path = resnet_toml(tmp_path, factory="nothere.py:resnet20")
    with pytest.raises(ModelError, match="nothere.py"):
        load_torch_model(load_model_config(path))


@pytest.mark.parametrize("ref", ["resnet.py", "resnet.py:", "resnet.py:no_such_factory"])
def test_bad_factory_reference(ref):
    with pytest.raises(ModelError, match=ref.split(":")[-1] or "resnet.py"):
        import_factory(ref, RESNET_DIR)


def test_checkpoint_that_does_not_fit(tmp_path):
    checkpoint = shared_file("resnet56-4bfd9763.th")
    with pytest.raises(ModelError, match="resnet56-4bfd9763.th.*does not fit"):
        load_torch_model(load_model_config(resnet_toml(tmp_path, checkpoint=str(checkpoint))))


def test_wrong_input_shape(tmp_path):
    with pytest.raises(ModelError, match=r"\(5, 32, 32\)"):
        load_torch_model(load_model_config(resnet_toml(tmp_path, shape="[5, 32, 32]")))


def test_malformed_toml(tmp_path):
    path = model_toml(tmp_path, 'name = "m"\nfactory = \n')
    with pytest.raises(ConfigError, match="malformed TOML"):
        load_toml(path)


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = model_toml(tmp_path, 'name = "m"\nfactroy = "x.py:f"\n[input]\nshape = [1, 8, 8]\n')
    with pytest.raises(ConfigError, match="'factroy'.*did you mean 'factory'"):
        load_model_config(path)


def test_unknown_recipe_param(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[[step]]\npass = "quantize"\nper_chanel = true\n')
    with pytest.raises(ConfigError, match="'per_chanel'.*did you mean 'per_channel'"):
        load_recipe(path)


def test_unknown_target():
    with pytest.raises(ConfigError, match="'rpi9'.*known targets: .*local"):
        load_target("rpi9")


def test_data_file_without_images(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, pixels=np.zeros((2, 8, 8, 1), np.uint8), labels=np.zeros(2))
    with pytest.raises(DataError, match=r"bad.npz.*lacks \['images'\]"):
        load_npz(path)


@pytest.mark.parametrize(("text", "message"), [
    ('[calibration]\npath = "a.npz"\ncount = 100\n[evaluation]\npath = "a.npz"\nstart = 50\n',
     "overlapping"),
    ('[calibration]\npath = "a.npz"\naugment = "rotate"\n[evaluation]\npath = "b.npz"\n',
     "augment 'rotate' unknown.*crop-flip"),
])
def test_bad_data_config_is_rejected(tmp_path, text, message):
    path = tmp_path / "data.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_data_config(path)


def test_errors_share_one_base():
    for cls in (ConfigError, DataError, ModelError):
        assert issubclass(cls, EdgecError)


def test_cli_prints_one_error_line(tmp_path):
    from typer.testing import CliRunner

    from edgec.cli import app

    result = CliRunner().invoke(app, ["build", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2
    assert "ConfigError" in result.output and "missing.toml" in result.output
    assert "Traceback" not in result.output


def test_checkpoint_mismatch_is_summarised(tmp_path):
    checkpoint = shared_file("resnet56-4bfd9763.th")
    path = resnet_toml(tmp_path, checkpoint=str(checkpoint))
    with pytest.raises(ModelError) as info:
        load_torch_model(load_model_config(path))
    message = str(info.value)
    assert "180 unexpected (layer1.3.conv1.weight, layer1.3.bn1.weight, layer1.3.bn1.bias, ...)" \
        in message and "is the factory right?" in message and "missing" not in message
    assert len(message.splitlines()) == 1


def test_pickled_model_is_refused_with_the_safe_way_unless_trusted(tmp_path):
    import resnet
    import torch

    torch.save(resnet.resnet20(), tmp_path / "whole.pt")
    path = resnet_toml(tmp_path, checkpoint=str(tmp_path / "whole.pt"))
    with pytest.raises(ModelError, match=r"pickled object.*state_dict\(\).*trust_checkpoint = true"):
        load_torch_model(load_model_config(path))
    trusted = path.read_text().replace("[input]", "trust_checkpoint = true\n[input]")
    path.write_text(trusted)
    with pytest.warns(UserWarning, match="runs code"):
        model = load_torch_model(load_model_config(path))
    assert sum(p.numel() for p in model.parameters()) > 200_000


def test_factory_typo_suggests_the_modules_callables():
    with pytest.raises(ModelError, match="no callable 'resnet2O'; did you mean 'resnet20'"):
        import_factory("resnet.py:resnet2O", RESNET_DIR)


def test_example_finds_the_shared_data_through_edgec_data_dir(tmp_path, monkeypatch):
    from edgec.config import resolve_path
    from edgec.data import load_data_config

    folder = shared_file("cifar10_test.npz").parent
    monkeypatch.setenv("EDGEC_DATA_DIR", str(folder))
    config = load_model_config(ROOT / "examples" / "resnet20_cifar10" / "model.toml")
    assert config.resolve(config.checkpoint) == folder / "resnet20-12fca82f.th"
    assert load_data_config(config.resolve(config.data)).load("evaluation").images.shape[0] \
        == 10000
    monkeypatch.setenv("EDGEC_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    import edgec.config

    monkeypatch.setattr(edgec.config, "__file__", str(tmp_path / "edgec" / "config.py"))
    with pytest.raises(ConfigError, match="export EDGEC_DATA_DIR"):
        resolve_path(tmp_path, "$EDGEC_DATA_DIR/cifar10_test.npz")
