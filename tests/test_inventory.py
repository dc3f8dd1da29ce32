"""The device inventory: TOML → frozen DeviceConfig, no secrets, clear errors, CLI round trip."""

from __future__ import annotations

import dataclasses
import shutil
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
from edgec.devices.probe import parse, readiness_problems, target_mismatches
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
    ('workdir = "../../etc"', "no '..'"),
    ('workdir = "~/-rf"', "no part starting with '-'"),
    ('workdir = "/"', "not '/'"),
    ('workdir = "cache/~root"', "starting with '-' or '~'"),
    ('host = "-oProxyCommand=x"', "not a host name"),
    ('user = "pi; rm -rf ~"', "user 'pi; rm -rf ~' is not a login name"),
    ('user = "-oProxyCommand=x"', "is not a login name"),
    ('key = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW"',
     "not key material"),
    ('key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHx edgec"', "not key material"),
    ('target = "rpi9"', r"key 'target': unknown target 'rpi9'; did you mean 'rpi\d'"),
    ('lock_path = "board.lock"', "lock_path 'board.lock' must be an absolute file path"),
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


def test_cli_add_rejects_an_unknown_target_on_stderr(tmp_path):
    from edgec.cli import app

    result = CliRunner().invoke(app, ["devices", "add", "b", "--host", "127.0.0.1", "--target",
                                      "rpi-4", "--devices-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown target 'rpi-4'; did you mean 'rpi4'?" in result.stderr and not result.stdout
    assert not list(tmp_path.iterdir())


def test_cli_add_refuses_pasted_key_material_without_echoing_it(tmp_path):
    from edgec.cli import app

    material = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZWQyNTUxOQ"
    result = CliRunner().invoke(app, ["devices", "add", "b", "--host", "127.0.0.1", "--target",
                                      "local", "--key", material, "--devices-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--key: key must be a file path, not key material" in \
        result.stderr
    assert material not in result.output and not list(tmp_path.iterdir())


def test_cli_add_resolves_a_relative_known_hosts_against_the_working_directory(tmp_path,
                                                                               monkeypatch):
    from edgec.cli import app

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    result = CliRunner().invoke(app, ["devices", "add", "b", "--host", "127.0.0.1", "--target",
                                      "local", "--known-hosts", "lab_known_hosts",
                                      "--devices-dir", str(tmp_path / "devices")])
    assert result.exit_code == 0, result.output
    assert load_device("b", tmp_path / "devices").known_hosts == str(
        tmp_path / "work" / "lab_known_hosts")
    default = CliRunner().invoke(app, ["devices", "add", "c", "--host", "127.0.0.1", "--target",
                                       "local", "--devices-dir", str(tmp_path / "devices")])
    assert default.exit_code == 0  # the default ~/.ssh/known_hosts stays the default
    assert "known_hosts" not in (tmp_path / "devices" / "c.toml").read_text()


def test_the_shipped_example_is_never_written_or_removed(tmp_path):
    from edgec.cli import app

    devices = tmp_path / "devices"
    devices.mkdir()
    shutil.copyfile(ROOT / "devices" / "example.toml", devices / "example.toml")
    original = (devices / "example.toml").read_text()
    runner = CliRunner()
    removed = runner.invoke(app, ["devices", "remove", "example", "--devices-dir", str(devices)])
    added = runner.invoke(app, ["devices", "add", "example", "--host", "127.0.0.1", "--target",
                                "local", "--force", "--devices-dir", str(devices)])
    for result in (removed, added):
        assert result.exit_code == 2 and "devices/example.toml is the documented example" in \
            result.stderr
    assert (devices / "example.toml").read_text() == original


def test_list_shows_the_good_devices_and_reports_each_bad_file(tmp_path):
    from edgec.cli import app

    save_device(DeviceConfig(name="good", target="local", host="127.0.0.1"), tmp_path)
    (tmp_path / "typo.toml").write_text('target = "rpi9"\nhost = "10.0.0.9"\n')
    (tmp_path / "broken.toml").write_text('target = "rpi4\n')
    result = CliRunner().invoke(app, ["devices", "list", "--devices-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "good" in result.stdout and "127.0.0.1" in result.stdout
    assert "typo.toml: key 'target': unknown target 'rpi9'" in result.stderr
    assert "broken.toml: malformed TOML" in result.stderr


BOARD = ("governor=performance\ntemp_mc=48312\nthrottled=0x0\narch=aarch64\n"
         "python_path=/usr/bin/python3\npython=3.11.2\ndisk_free_kb=2048\nmem_available_kb=\n"
         'runtimes={"numpy": "1.26.4", "onnxruntime": "1.19.0"}\n')


def test_probe_output_parses_and_matches_targets():
    facts = parse(BOARD + "command=/usr/src/tensorrt/bin/trtexec\t\n")
    assert facts["temp_c"] == pytest.approx(48.312) and facts["disk_free_mb"] == 2.0
    assert facts["mem_available_mb"] is None and facts["governor"] == "performance"
    assert facts["commands"] == {"/usr/src/tensorrt/bin/trtexec": ""}
    assert target_mismatches(load_target("rpi4"), facts) == []  # aarch64, 3.11, numpy + onnxruntime
    assert target_mismatches(load_target("local"), facts) == [
        "board is aarch64, target 'local' needs x86_64"]
    assert target_mismatches(load_target("jetson-orin-nano"), facts) == [
        "/usr/src/tensorrt/bin/trtexec is missing on the board (target 'jetson-orin-nano' runs it)"]


def test_requirements_are_checked_as_data_against_the_probe():
    rpi4, facts = load_target("rpi4"), parse(BOARD)
    tvm_only = {**facts, "runtimes": {"numpy": "2.0", "tvm": "0.27"}}
    assert target_mismatches(rpi4, tvm_only) == []  # "onnxruntime|tvm": either one
    assert target_mismatches(rpi4, {**facts, "runtimes": {"numpy": "2.0"}}, "/opt/py/bin/python3") == [
        "onnxruntime or tvm cannot be imported by /opt/py/bin/python3 on the board; install it "
        "there: `/opt/py/bin/python3 -m pip install onnxruntime` or `/opt/py/bin/python3 -m pip "
        "install apache-tvm`"]
    [old] = target_mismatches(rpi4, {**facts, "python": "3.7.3"})
    assert old.startswith("the board's python3 is Python 3.7.3, target 'rpi4' needs >=3.9")
    wrong_path = {**facts, "python_path": "", "python": "", "runtimes": {}}
    [missing] = target_mismatches(rpi4, wrong_path, "/usr/bin/python9")
    assert missing.startswith("python '/usr/bin/python9' (the `python` of the device file) was "
                              "not found on the board") and "pip install" not in missing


def test_a_board_without_free_disk_is_not_ready():
    assert readiness_problems({"disk_free_mb": 0.004}, ".cache/edgec") == [
        "only 0.0 MiB free in .cache/edgec on the board (edgec wants 64 MiB for artifacts); free "
        "disk space there or set another `workdir` in the device file"]
    assert readiness_problems({"disk_free_mb": 20_000.0}, ".cache/edgec") == []


def test_unsafe_artifact_file_names_are_refused():
    from edgec.devices.ssh import check_relative_name

    assert check_relative_name("lib/model.so") == "lib/model.so"
    for name in ("../x", "/etc/passwd", "a/../../b", "-rf", "a b", "x;rm", "a\\b"):
        with pytest.raises(DeviceError, match="unsafe"):
            check_relative_name(name)


def test_contention_names_runners_busy_processes_and_short_lived_work():
    """Two snapshots 1 s apart at 100 ticks/s: what else ran is named; our own processes (the
    holder and its session) and the runner (our reaped child) are not."""
    from edgec.devices.contention import others

    def snapshot(uptime, busy, children, procs):
        return {"hz": 100, "uptime": uptime, "self": [10, 9], "busy": busy,
                "children": children, "procs": procs}

    before = snapshot(50.0, 1000, 0, [[9, "sshd", 5, 100, False], [10, "python3", 7, 4000, False],
                                      [20, "stress", 100, 200, False],
                                      [21, "python3", 3, 300, True], [22, "cron", 1, 300, False]])
    after = snapshot(51.0, 1000 + 95 + 80 + 1 + 30, 80,
                     [[9, "sshd", 5, 100, False], [10, "python3", 8, 4000, False],
                      [20, "stress", 195, 200, False], [22, "cron", 1, 300, False]])
    assert others(before, after) == ["edgec runner pid 21 (python3)", "pid 20 (stress) 95 % CPU",
                                     "short-lived processes 30 % CPU"]
    quiet = snapshot(51.0, 1000 + 80 + 1 + 2, 80, [[9, "sshd", 5, 100, False],
                                                   [10, "python3", 8, 4000, False]])
    assert others(snapshot(50.0, 1000, 0, quiet["procs"]), quiet) == []
