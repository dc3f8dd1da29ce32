"""The command line as a new user meets it: names instead of paths, suggestions, readable lists."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgec import __version__
from edgec.errors import ConfigError
from edgec.recipes import load_recipe, recipe_paths, resolve_recipe
from edgec.targets import target_paths
from tests.conftest import EXAMPLES


def edgec(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-m", "edgec.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


def test_version_recipes_and_targets_fit_80_columns():
    assert edgec("--version").stdout.strip() == f"edgec {__version__}"
    recipes = edgec("recipes").stdout
    assert all(name in recipes for name in recipe_paths())
    listed = edgec("targets").stdout
    for name in target_paths():  # the names a user must type are never cut
        assert f"│ {name} " in listed
    assert max(len(line) for line in listed.splitlines()) <= 80


def test_built_in_recipes_resolve_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the clone: passes/ is not here
    assert resolve_recipe("prune-int8") == recipe_paths()["prune-int8"]
    assert resolve_recipe("passes/int8.toml") == recipe_paths()["int8"]
    assert [s.pass_.name for s in load_recipe("int8").steps] == ["fuse", "export", "quantize"]
    with pytest.raises(ConfigError, match="unknown recipe 'int9'.*did you mean 'int8'"):
        resolve_recipe("int9")


def test_pass_typo_gets_a_suggestion(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[step]]\npass = "exprt"\n')
    with pytest.raises(ConfigError, match="unknown pass 'exprt'; did you mean 'export'"):
        load_recipe(recipe)


def test_build_by_recipe_name_and_target_tag_outside_the_clone(tmp_path):
    done = edgec("build", str(EXAMPLES / "digits" / "model.toml"), "--recipe", "int8",
                 "--target", "raspberry-pi/4b-aarch64", "--no-profile",
                 "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    [report] = (tmp_path / "out" / "rpi4").glob("digits-cnn-*/report.html")
    assert "host, not rpi4" in report.read_text()  # evaluated here, standing in for the Pi
    failed = edgec("build", str(EXAMPLES / "digits" / "model.toml"), "--recipe", "int9",
                   cwd=tmp_path)
    assert failed.returncode == 2 and "did you mean 'int8'" in failed.stderr
    assert failed.stdout.strip() == ""  # errors go to stderr


def test_overrides_change_one_step_and_are_checked_like_recipe_keys():
    pipeline = load_recipe("prune-int8").with_overrides({"prune.ratio": 0.2,
                                                         "quantize.mode": "mixed"})
    params = {step.pass_.name: step.params for step in pipeline.steps}
    assert params["prune"].ratio == 0.2 and params["quantize"].mode == "mixed"
    assert load_recipe("prune-int8").steps[-1].params.mode == "int8"  # the recipe is untouched
    for key, value, message in [
        ("quantise.mode", "mixed", "has no pass 'quantise'; did you mean 'quantize'"),
        ("quantize.mdoe", "mixed", "unknown key 'mdoe'; did you mean 'mode'"),
        ("quantize.mode", "int3", "mode 'int3' unknown"),
        ("quantize", "int8", "is not 'pass.param'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_recipe("int8").with_overrides({key: value})


def test_cli_set_overrides_a_parameter(tmp_path):
    done = edgec("build", str(EXAMPLES / "digits" / "model.toml"), "--no-profile",
                 "--set", "quantize.scheme=u8s8-reduce-range", "--set", "quantize.batch=16",
                 "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    [manifest] = (tmp_path / "local").glob("digits-cnn-*/manifest.json")
    recipe = json.loads(manifest.read_text())["recipe"]
    assert recipe[-1]["params"]["scheme"] == "u8s8-reduce-range"
    assert recipe[-1]["params"]["batch"] == 16
    bad = edgec("build", str(EXAMPLES / "digits" / "model.toml"), "--set", "quantize.batch")
    assert bad.returncode == 2 and "PASS.PARAM=VALUE" in bad.stderr
