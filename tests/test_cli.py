"""The command line as a new user meets it: names instead of paths, suggestions, readable lists."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from edgec import __version__
from edgec.errors import ConfigError
from edgec.pipeline import load_recipe, recipe_paths, resolve_recipe
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
