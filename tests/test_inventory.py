"""The device inventory: TOML → frozen DeviceConfig, no secrets, clear errors, CLI round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgec.devices.inventory import (
    DeviceConfig,
    device_paths,
    load_device,
    parse_device,
    remove_device,
    save_device,
)
from edgec.devices.probe import parse, target_mismatches
from edgec.errors import ConfigError, DeviceError
from edgec.targets import load_target

ROOT = Path(__file__).resolve().parent.parent


def test_example_parses_and_is_not_listed_as_a_device():
    example = parse_device(ROOT / "devices" / "example.toml")
    assert example.target == "rpi4" and example.port == 22 and example.tags == ("lab", "heatsink")
    assert example.key == str(Path("~/.ssh/id_ed25519").expanduser())
    assert dataclasses.is_dataclass(example)
    with pytest.raises(dataclasses.FrozenInstanceError):
        example.host = "elsewhere"
    assert "example" not in device_paths(ROOT / "devices")


def test_save_load_round_trip_keeps_only_non_defaults(tmp_path):
    config = DeviceConfig(name="pi-1", target="rpi4", host="10.0.0.5", user="pi",
                          key=str(tmp_path / "id"), tags=("desk",), retries=0)
    path = save_device(config, tmp_path)
    text = path.read_text()
    assert "command_timeout_s" not in text and "retries = 0" in text
    expanded = str(Path("~/.ssh/known_hosts").expanduser())
    assert load_device("pi-1", tmp_path) == dataclasses.replace(config, known_hosts=expanded)
    with pytest.raises(ConfigError, match="already exists.*--force"):
        save_device(config, tmp_path)
    remove_device("pi-1", tmp_path)
    with pytest.raises(ConfigError, match=r"unknown device 'pi-1'.*edgec devices add pi-1"):
        load_device("pi-1", tmp_path)


@pytest.mark.parametrize("line, message", [
    ('password = "hunter2"', "never stores passwords"),
    ('key = "-----BEGIN OPENSSH PRIVATE KEY-----"', "not key material"),
    ('prot = 22', "did you mean 'port'"),
    ('port = 70000', "port 70000 must be in 1..65535"),
    ('workdir = "../../etc"', "without '..'"),
    ('host = "-oProxyCommand=x"', "not a host name"),
])
def test_bad_device_files_are_config_errors_naming_the_file(tmp_path, line, message):
    path = tmp_path / "board.toml"
    fields = {"target": 'target = "local"', "host": 'host = "127.0.0.1"'}
    key = line.split()[0]
    body = [v for k, v in fields.items() if k != key] + [line]
    path.write_text("\n".join(body) + "\n")
    with pytest.raises(ConfigError, match=message) as info:
        parse_device(path)
    assert str(path) in str(info.value)
    assert "hunter2" not in str(info.value)


def test_device_names_are_safe_and_local_is_reserved(tmp_path):
    for name in ("local", "../x", "a b", ""):
        with pytest.raises(ValueError):
            DeviceConfig(name=name, target="local", host="h")


def test_cli_add_rejects_an_unknown_target(tmp_path):
    from edgec.cli import app

    result = CliRunner().invoke(app, ["devices", "add", "b", "--host", "127.0.0.1", "--target",
                                      "nope", "--devices-dir", str(tmp_path)])
    assert result.exit_code == 2 and "unknown target 'nope'" in result.output
    assert not list(tmp_path.iterdir())


def test_probe_output_parses_and_matches_targets():
    facts = parse("governor=performance\ntemp_mc=48312\nthrottled=0x0\narch=aarch64\n"
                  "python=3.11.2\ndisk_free_kb=2048\nmem_available_kb=\n"
                  'runtimes={"numpy": "1.26.4", "onnxruntime": "1.19.0"}\n')
    assert facts["temp_c"] == pytest.approx(48.312) and facts["disk_free_mb"] == 2.0
    assert facts["mem_available_mb"] is None and facts["governor"] == "performance"
    assert target_mismatches(load_target("local"), facts) == [
        "board is aarch64, target 'local' needs x86_64"]
    missing = target_mismatches(load_target("local"), {**facts, "arch": "x86_64", "runtimes": {}})
    assert missing == ["numpy is missing on the board (pip install numpy)",
                       "onnxruntime is missing on the board (pip install onnxruntime)"]


def test_unsafe_artifact_file_names_are_refused():
    from edgec.devices.ssh import check_relative_name

    assert check_relative_name("lib/model.so") == "lib/model.so"
    for name in ("../x", "/etc/passwd", "a/../../b", "-rf", "a b", "x;rm", "a\\b"):
        with pytest.raises(DeviceError, match="unsafe"):
            check_relative_name(name)
