"""``edgec ci workflow``: a GitHub Actions workflow or a GitLab CI pipeline that builds the model
for each target, profiles it on each self-hosted board, merges the per-target indexes into
``dist/index.json`` + ``dist/index.html`` and, on a pull / merge request, diffs that index
against the main branch's.

Every job ends in one of four commands: ``edgec ci build`` (its non-zero exit is the budget
gate), ``edgec ci merge``, ``edgec ci report`` and ``edgec ci diff``.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from edgec.artifact import atomic_write_text
from edgec.devices.inventory import check_name
from edgec.errors import ConfigError
from edgec.targets import load_target

PROVIDERS = {"github": Path(".github/workflows/edgec.yml"), "gitlab": Path(".gitlab-ci.yml")}
ALLOWED_COMMANDS = (("ci", "build"), ("ci", "merge"), ("ci", "diff"), ("ci", "report"))
DIFF_LIMITS = "--max-latency-regress 5% --max-accuracy-drop 0.2"
TORCH_CPU = ("# the CPU build of torch: a build runner has no GPU, and the CUDA wheels are GBs\n"
             "pip install torch --index-url https://download.pytorch.org/whl/cpu\n")
INSTALL = ("# installs the checked-out project (edgec itself, or a model repository that depends "
           "on edgec)\npip install -e .\n")
CI_EXTRAS_SKIPPED = ("litert",)  # opt-in (about 2 GB with jax): a recipe that wants it says so


def target_extras(target: str) -> str:
    """The edgec extras a target's backends need, comma-separated (``tvm,mobile`` for rpi4)."""
    from edgec.backends import BACKEND_EXTRAS

    extras = (BACKEND_EXTRAS.get(name) for name in load_target(target).backends)
    return ",".join(dict.fromkeys(e for e in extras if e and e not in CI_EXTRAS_SKIPPED))


def install_script(extras: str | None = None) -> str:
    """Install the project and, for a build, torch's CPU wheels and the target's extras (pip
    keeps the edgec installed just before and adds only the extras' dependencies)."""
    if extras is None:
        return INSTALL
    extra_line = f'pip install "edgec[{extras}]"\n' if extras else ""
    return TORCH_CPU + INSTALL + extra_line
MERGE = "edgec ci merge dist/*/index.json --out dist/index.json\nedgec ci report dist/\n"
DIFF = ("if [ -f baseline/index.json ]; then\n"
        f"  edgec ci diff baseline/index.json dist/index.json {DIFF_LIMITS}\n"
        "else\n  echo \"no baseline index from the main branch yet; nothing to compare\"\nfi\n")
GH_BASELINE = (
    "# the edgec-index artifact of this workflow's latest successful run on main (none yet: no "
    "baseline)\n"
    "run_id=$(gh run list --repo \"$GITHUB_REPOSITORY\" --workflow edgec.yml --branch main "
    "--status success --limit 1 --json databaseId --jq '.[].databaseId' || true)\n"
    "if [ -n \"$run_id\" ]; then\n"
    "  gh run download \"$run_id\" --repo \"$GITHUB_REPOSITORY\" --name edgec-index --dir baseline "
    "|| true\nfi\n")
GL_BASELINE = (
    "# dist/index.json of the index job of the default branch's latest successful pipeline\n"
    "mkdir -p baseline\n"
    "curl --fail --silent --show-error --location --header \"JOB-TOKEN: $CI_JOB_TOKEN\" "
    "--output baseline/index.json "
    "\"$CI_API_V4_URL/projects/$CI_PROJECT_ID/jobs/artifacts/$CI_DEFAULT_BRANCH/raw/dist/index.json"
    "?job=index\" || rm -f baseline/index.json\n")
GL_MR = '$CI_PIPELINE_SOURCE == "merge_request_event"'
GL_MAIN = "$CI_COMMIT_BRANCH == $CI_DEFAULT_BRANCH"


def write_workflow(provider: str, targets: list[str], boards: dict[str, str], model: str,
                   out_root: Path, budget: float | None = None) -> Path:
    """Write the provider's CI file under ``out_root`` (``.github/workflows/edgec.yml`` or
    ``.gitlab-ci.yml``) and return its path. ``boards`` maps a device name of the inventory (the
    self-hosted runner's label) to its target."""
    relative = _provider_path(provider)
    text = (github_workflow if provider == "github" else gitlab_pipeline)(targets, boards, model, budget)
    return atomic_write_text(Path(out_root) / relative, text)


def github_workflow(targets: list[str], boards: dict[str, str], model: str,
                    budget: float | None = None) -> str:
    """The GitHub Actions workflow's YAML text (see the module docstring)."""
    targets, boards = _checked(targets, boards)
    jobs: dict[str, Any] = {"build": _gh_build(targets, model, budget)}
    for label, target in boards.items():
        jobs[_job_id(label)] = _gh_profile(label, target, model, budget)
    jobs["index"] = _gh_index(list(jobs))
    jobs["compare"] = _gh_compare()
    workflow = {"name": "edgec", "on": {"push": {"branches": ["main"]}, "pull_request": {}},
                "permissions": {"contents": "read", "actions": "read"}, "jobs": jobs}
    return _dump(workflow)


def gitlab_pipeline(targets: list[str], boards: dict[str, str], model: str,
                    budget: float | None = None) -> str:
    """The GitLab CI pipeline's YAML text: the same jobs as the GitHub workflow."""
    targets, boards = _checked(targets, boards)
    rules = [{"if": GL_MR}, {"if": GL_MAIN}]
    pipeline: dict[str, Any] = {
        # branch pipelines on the default branch, merge request pipelines for merge requests
        "workflow": {"rules": rules},
        "stages": ["build", "profile", "report", "compare"],
        "default": {"image": "python:3.11"},
        "build": {"stage": "build", "rules": rules,
                  "parallel": {"matrix": [_gl_cell(target) for target in targets]},
                  "script": [install_script("$EXTRAS"),
                             _build_command(model, '"$TARGET"', '"dist/$TARGET"', budget)],
                  "artifacts": {"when": "always", "paths": ["dist/"]}},
    }
    for label, target in boards.items():
        pipeline[_job_id(label)] = {
            "stage": "profile", "tags": [label], "rules": rules,
            "needs": [{"job": "build", "parallel": {"matrix": [_gl_cell(target)]}}],
            "script": [install_script(target_extras(target)),
                       _build_command(model, target, f"dist/{label}", budget, device=label)],
            "artifacts": {"when": "always", "paths": [f"dist/{label}/"]}}
    pipeline["index"] = {"stage": "report", "rules": [{**rule, "when": "always"} for rule in rules],
                         "script": [INSTALL, MERGE],
                         "artifacts": {"when": "always",
                                       "paths": ["dist/index.json", "dist/index.html"]}}
    pipeline["compare"] = {"stage": "compare", "rules": [{"if": GL_MR}], "needs": ["index"],
                           "script": [INSTALL, GL_BASELINE, DIFF]}
    return _dump(pipeline)


def workflow_commands(text: str) -> list[list[str]]:
    """Every ``edgec ...`` line of the workflow's ``run:`` / ``script:`` entries, split with
    shlex (only lines that start with ``edgec``, after indentation)."""
    commands = []
    for script in _scripts(yaml.safe_load(text)):
        for line in script.splitlines():
            if line.strip().startswith("edgec "):
                commands.append(shlex.split(line, comments=True))
    return commands


def _gl_cell(target: str) -> dict[str, str]:
    """One cell of the build matrix; a board's job names the same cell in its ``needs``."""
    return {"TARGET": target, "EXTRAS": target_extras(target)}


# ----- GitHub jobs --------------------------------------------------------------------------
def _gh_setup(extras: str | None = None) -> list[dict[str, Any]]:
    return [{"uses": "actions/checkout@v4"},
            {"uses": "actions/setup-python@v5", "with": {"python-version": "3.11"}},
            {"name": "Install edgec", "run": install_script(extras)}]


def _gh_upload(name: str, path: str) -> dict[str, Any]:
    # also after a failed build: the index of an over-budget or failed target is what to read
    return {"name": f"Upload {name}", "if": "${{ !cancelled() }}", "uses": "actions/upload-artifact@v4",
            "with": {"name": name, "path": path, "if-no-files-found": "ignore"}}


def _gh_build(targets: list[str], model: str, budget: float | None) -> dict[str, Any]:
    target = "${{ matrix.target }}"
    return {"name": f"build {target}", "runs-on": "ubuntu-latest",
            "strategy": {"fail-fast": False, "matrix": {"include": [
                {"target": name, "extras": target_extras(name)} for name in targets]}},
            "steps": [*_gh_setup("${{ matrix.extras }}"),
                      {"name": "Build, evaluate and check the budget",
                       "run": _build_command(model, target, f"dist/{target}", budget)},
                      _gh_upload(f"edgec-{target}", f"dist/{target}")]}


def _gh_profile(label: str, target: str, model: str, budget: float | None) -> dict[str, Any]:
    return {"name": f"profile {target} on {label}", "needs": "build",
            "runs-on": ["self-hosted", label],
            "steps": [*_gh_setup(target_extras(target)),
                      {"uses": "actions/download-artifact@v4",
                       "with": {"name": f"edgec-{target}", "path": f"dist/{target}"}},
                      {"name": f"Build and profile on {label}",
                       "run": _build_command(model, target, f"dist/{label}", budget, device=label)},
                      _gh_upload(f"edgec-device-{label}", f"dist/{label}")]}


def _gh_index(needs: list[str]) -> dict[str, Any]:
    # no merge-multiple: each artifact's own index.json lands in dist/<artifact name>/
    return {"name": "merge the indexes and write the report", "needs": needs,
            "if": "${{ !cancelled() }}", "runs-on": "ubuntu-latest",
            "steps": [*_gh_setup(),
                      {"uses": "actions/download-artifact@v4",
                       "with": {"pattern": "edgec-*", "path": "dist"}},
                      {"name": "Merge and report", "run": MERGE},
                      {"uses": "actions/upload-artifact@v4",
                       "with": {"name": "edgec-index", "path": "dist/index.json\ndist/index.html"}}]}


def _gh_compare() -> dict[str, Any]:
    return {"name": "compare with main", "if": "github.event_name == 'pull_request'",
            "needs": "index", "runs-on": "ubuntu-latest",
            "env": {"GH_TOKEN": "${{ github.token }}"},
            "steps": [*_gh_setup(),
                      {"uses": "actions/download-artifact@v4",
                       "with": {"name": "edgec-index", "path": "dist"}},
                      {"name": "Fetch the baseline index from main", "run": GH_BASELINE},
                      {"name": "Diff against main", "run": DIFF}]}


# ----- helpers --------------------------------------------------------------------------------
def _provider_path(provider: str) -> Path:
    if provider not in PROVIDERS:
        raise ConfigError(f"unknown CI provider {provider!r}; choose one of: {', '.join(PROVIDERS)}")
    return PROVIDERS[provider]


def _checked(targets: list[str], boards: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Targets as built-in target names (aliases resolved, duplicates dropped) and boards whose
    names are device names and whose targets are among them."""
    if not targets:
        raise ConfigError("no target for the CI workflow; give at least one, e.g. --targets local")
    names = list(dict.fromkeys(_target_name(t) for t in targets))
    checked, job_ids = {}, {}
    for label, target in boards.items():
        try:
            check_name(label)
        except ValueError as exc:
            raise ConfigError(f"board label: {exc}") from exc
        checked[label] = _target_name(target)
        if checked[label] not in names:
            raise ConfigError(f"board {label!r} serves target {checked[label]!r}, which is not "
                              f"among the workflow's targets ({', '.join(names)}); add it")
        if job_ids.setdefault(_job_id(label), label) != label:
            raise ConfigError(f"boards {job_ids[_job_id(label)]!r} and {label!r} give the same "
                              f"job name {_job_id(label)!r}; rename one")
    return names, checked


def _target_name(target: str) -> str:
    if target.endswith(".toml"):
        raise ConfigError(f"target {target!r}: the CI workflow takes built-in target names (see "
                          f"`edgec targets`), not TOML paths")
    return load_target(target).name


def _job_id(label: str) -> str:
    # GitHub job ids take letters, digits, '-' and '_' only; device names may also hold '.'
    return "profile-" + re.sub(r"[^A-Za-z0-9_-]", "-", label)


def _build_command(model: str, target: str, out: str, budget: float | None,
                   device: str | None = None) -> str:
    words = ["edgec ci build", shlex.quote(model), "--targets", target]
    words += ["--device", shlex.quote(device)] if device else []
    words += ["--out", out]
    words += ["--budget", f"{budget:g}"] if budget is not None else []
    return " ".join(words)


def _scripts(node: Any) -> list[str]:
    """Every string under a ``run``, ``script``, ``before_script`` or ``after_script`` key."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("run", "script", "before_script", "after_script"):
                found += [value] if isinstance(value, str) else list(value)
            else:
                found += _scripts(value)
    elif isinstance(node, list):
        for value in node:
            found += _scripts(value)
    return found


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the scripts) as literal blocks, as a person would write them; a shared
    value written out each time, not as a YAML anchor and alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _dump(document: dict[str, Any]) -> str:
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=1000)
