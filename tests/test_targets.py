"""Built-in targets: every file loads, names real backends, and bad fields are clear errors."""

from __future__ import annotations

import shutil

import pytest

from edgec.errors import ConfigError
from edgec.targets import load_target, target_paths

BOARDS = ["rpi4", "rpi5", "jetson-orin-nano", "android-arm64", "pynq-z2", "local"]


def test_every_board_of_the_issue_has_a_target():
    assert set(BOARDS) <= set(target_paths())


@pytest.mark.parametrize("name", BOARDS)
def test_target_loads_with_one_rate_per_precision(name):
    target = load_target(name)
    assert target.name == name
    assert set(target.peak_gmacs) == set(target.precisions)
    assert target.backends and target.cores >= 1 and target.memory_mb >= 256


def test_every_backend_named_by_a_target_is_registered():
    from edgec.backends import BACKENDS

    missing = {name: [b for b in load_target(name).backends if b not in BACKENDS]
               for name in target_paths()}
    assert not {k: v for k, v in missing.items() if v}, f"unregistered backends: {missing}"


def test_rpi5_extends_rpi4_and_merges_tables():
    rpi4, rpi5 = load_target("rpi4"), load_target("rpi5")
    assert rpi5.isa == rpi4.isa == "aarch64"
    assert rpi5.tvm_target["mtriple"] == "aarch64-linux-gnu"  # inherited
    assert rpi5.tvm_target["mcpu"] == "cortex-a76"  # overridden
    assert rpi5.peak_gmacs["int8"] > rpi4.peak_gmacs["int8"]


def test_cross_targets_do_not_run_on_this_host():
    assert load_target("local").runs_on_host
    assert not load_target("rpi4").runs_on_host
    assert load_target("jetson-orin-nano").tvm_target["arch"] == "sm_87"


def _copy_target(tmp_path, name: str, edit) -> str:
    path = tmp_path / f"{name}.toml"
    shutil.copyfile(target_paths()[name], path)
    path.write_text(edit(path.read_text()))
    return str(path)


def test_missing_field_names_file_and_key(tmp_path):
    path = _copy_target(tmp_path, "rpi4", lambda t: t.replace('cpu = "cortex-a72"\n', ""))
    with pytest.raises(ConfigError, match=r"rpi4\.toml.*missing required key 'cpu'"):
        load_target(path)


@pytest.mark.parametrize("old,new,key", [
    ("cores = 4", 'cores = "four"', "cores"),
    ("cores = 4", "cores = 0", "cores"),
    ('precisions = ["fp32", "int8"]', 'precisions = ["fp32", "int7"]', "precisions"),
    ("int8 = 96.0", "int16 = 96.0", "peak_gmacs"),
    ('backends = ["onnxruntime", "tvm", "executorch"]', "backends = []", "backends"),
    ('kind = "llvm"\n', "", "tvm_target"),
])
def test_invalid_field_names_file_and_key(tmp_path, old, new, key):
    path = _copy_target(tmp_path, "rpi4", lambda t: t.replace(old, new))
    with pytest.raises(ConfigError, match=rf"rpi4\.toml.*'{key}'"):
        load_target(path)


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = _copy_target(tmp_path, "rpi4", lambda t: t.replace("cores = 4", "coures = 4"))
    with pytest.raises(ConfigError, match="did you mean 'cores'"):
        load_target(path)


def test_extends_is_one_level_only(tmp_path):
    for name in ("rpi4", "rpi5"):
        shutil.copyfile(target_paths()[name], tmp_path / f"{name}.toml")
    (tmp_path / "rpi6.toml").write_text('extends = "rpi5"\ndescription = "x"\n')
    with pytest.raises(ConfigError, match="one level only"):
        load_target(str(tmp_path / "rpi6.toml"))


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(ConfigError, match="rpi4"):
        load_target("raspberry-pi-4")
    with pytest.raises(ConfigError, match=r"unknown target 'rpi9'; did you mean 'rpi\d'"):
        load_target("rpi9")


def test_runtime_requirements_are_data():
    from edgec.targets import Requirements

    assert load_target("rpi4").requirements == Requirements(">=3.9", ("numpy", "onnxruntime|tvm"))
    assert load_target("rpi5").requirements == load_target("rpi4").requirements  # inherited
    assert load_target("jetson-orin-nano").requirements.commands == (
        "/usr/src/tensorrt/bin/trtexec",)
    assert load_target("android-arm64").requirements == Requirements()  # no Python runner


@pytest.mark.parametrize("version, spec, ok", [
    ("3.11.2", ">=3.9", True), ("3.9.0", ">=3.9", True), ("3.8.18", ">=3.9", False),
    ("3.12.1", ">=3.9,<3.12", False), ("3.10", "==3.10", True), ("3.10.4", "!=3.10.*", False),
    ("3.10.4", "!=3.10", True),
])
def test_python_version_specifiers(version, spec, ok):
    from edgec.targets import version_satisfies

    assert version_satisfies(version, spec) is ok


@pytest.mark.parametrize("old, new, message", [
    ('runtime_requires = { python = ">=3.9", ', 'runtime_requires = { python = "3.9+", ',
     "python '3.9\\+' is not a version specifier"),
    ('modules = ["numpy", "onnxruntime|tvm"] }', 'modules = ["numpy", "onnxruntime or tvm"] }',
     "are not module names"),
    ('modules = ["numpy", "onnxruntime|tvm"] }', 'modules = ["numpy"], packages = ["x"] }',
     "unknown entries \\['packages'\\]"),
])
def test_bad_runtime_requirements_name_the_file_and_key(tmp_path, old, new, message):
    path = _copy_target(tmp_path, "rpi4", lambda t: t.replace(old, new))
    with pytest.raises(ConfigError, match=rf"rpi4\.toml.*'runtime_requires'.*{message}"):
        load_target(path)


@pytest.mark.parametrize("said, name", [
    ("jetson", "jetson-orin-nano"), ("nvidia/jetson-orin-nano", "jetson-orin-nano"),
    ("raspberry-pi/4b-aarch64", "rpi4"), ("pi4", "rpi4"), ("pi5", "rpi5"),
    ("android", "android-arm64"), ("fpga", "pynq-z2"),
])
def test_targets_answer_to_the_names_people_say(said, name):
    assert load_target(said).name == name


def test_aliases_are_unique_and_a_typo_gets_the_closest_name():
    from edgec.targets import target_aliases, target_paths

    aliases = target_aliases()
    assert not set(aliases) & set(target_paths())
    assert load_target("rpi5").aliases == ("pi5",)  # rpi4's aliases are not inherited
    with pytest.raises(ConfigError, match="unknown target 'jetsn'; did you mean 'jetson'"):
        load_target("jetsn")
