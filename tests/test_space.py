"""Search spaces declared in Params field metadata: what `edgec space` prints, what a target and
a recipe's [search] table leave of them, and a point of a space built for real."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import subprocess
import sys

import pytest

from edgec.config import from_dict
from edgec.errors import ConfigError
from edgec.passes import PASSES
from edgec.recipes import load_recipe, recipe_search
from edgec.space import Categorical, FloatRange, IntRange, declared_dimensions, pipeline_space
from edgec.targets import load_target
from tests.conftest import EXAMPLES

PRUNE_INT8_RPI4 = {  # pass.param → (kind, choices or range, condition, the recipe's value)
    # the recipe's [search] fixes the prune step but its channel multiple (one fine-tune each)
    "prune.scope": ("choice", "global", "", "global"),
    "prune.importance": ("choice", "l1", "", "l1"),
    "prune.budget_points": ("choice", "1.0", "", "1.0"),
    "prune.ratio": ("choice", "0.0, 0.1, 0.2, 0.3, 0.4, 0.5", "budget_points = none", "0.2"),
    "prune.ratio_of": ("choice", "macs", "", "macs"),
    "prune.channel_multiple": ("choice", "8, 16", "", "0"),
    "prune.reconstruct": ("bool", "true", "", "true"),
    "prune.finetune_epochs": ("choice", "5.0", "", "5.0"),
    "quantize.mode": ("choice", "int8", "", "int8"),
    "quantize.scheme": ("choice", "auto, u8s8, u8s8-reduce-range, u8u8, s8s8, s8s8-symmetric",
                        "", "auto"),
    "quantize.per_channel": ("bool", "true, false", "mode = int8", "true"),
    "quantize.calibration": ("choice", "data", "mode = int8", "auto"),
    "quantize.calibration_method": ("choice", "minmax, entropy, percentile", "", "minmax"),
    "quantize.accuracy_budget": ("float", "0.25 … 3.0", "mode = mixed", "1.0"),
    "quantize.weight_bytes_budget": ("float", "0.5 … 1.0", "mode = mixed", "0.7"),
}

NARROWED_RECIPE = """
name = "narrowed"

[[step]]
pass = "prune"
ratio_of = "macs"
budget_points = 1.0

[[step]]
pass = "fuse"

[[step]]
pass = "export"

[[step]]
pass = "quantize"

[search]
"prune.budget_points" = ["none"]
"prune.ratio" = [0.0, 0.3, 0.1]
prune.scope = ["global"]
quantize.accuracy_budget = { low = 0.5, high = 1.5 }
"""


def edgec(*args: str, columns: int = 80) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run([sys.executable, "-m", "edgec.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def space_of(recipe, target="rpi4", narrow=None):
    return pipeline_space(load_recipe(recipe), load_target(target), narrow)


def test_edgec_space_prints_the_declared_space_of_prune_int8_for_rpi4():
    done = edgec("space", "prune-int8", "--target", "rpi4")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "search space of prune-int8 for rpi4" in lines[0]
    assert lines[1].split() == ["pass.param", "kind", "range", "condition", "recipe"]
    names = [line.split()[0] for line in lines if re.match(r"(prune|quantize)\.", line)]
    assert names == list(PRUNE_INT8_RPI4)  # every parameter a condition reads comes first
    assert lines[-1] == "no declared ranges: fuse, export"
    wide = edgec("space", "prune-int8", "--target", "rpi4", columns=160).stdout.splitlines()
    rows = {cells[0]: tuple(cells[1:]) for line in wide
            if len(cells := re.split(r"\s{2,}", line.strip())) > 1 and "." in cells[0]}
    for name, (kind, values, condition, recipe) in PRUNE_INT8_RPI4.items():
        assert rows[name] == tuple(c for c in (kind, values, condition, recipe) if c), name


def test_to_table_and_default_are_the_recipes_values():
    space = space_of("prune-int8", narrow=recipe_search("prune-int8"))
    table = {row["pass.param"]: row for row in space.to_table()}
    for name, (kind, values, condition, recipe) in PRUNE_INT8_RPI4.items():
        assert (table[name]["kind"], table[name]["range"], table[name]["condition"],
                table[name]["recipe"]) == (kind, values, condition, recipe)
    default = space.default()
    assert default["prune.budget_points"] == 1.0 and default["prune.ratio_of"] == "macs"
    assert default["quantize.calibration"] == "auto"  # the recipe's, even outside the choices
    assert load_recipe("prune-int8").with_overrides(default).config() == \
        load_recipe("prune-int8").config()


def test_targets_drop_choices_they_cannot_take():
    jetson = {d.name: d for d in space_of("prune-exit-int8", "jetson").dimensions}
    assert jetson["quantize.scheme"].choices == ("auto", "s8s8-symmetric")  # TensorRT: s8 only
    assert jetson["prune.channel_multiple"].choices == (0, 16, 32)
    assert "early_exit.max_exits" in jetson
    haswell = dataclasses.replace(load_target("rpi4"), name="haswell", isa="x86_64",
                                  cpu="haswell", cpu_features=("avx2", "fma"))
    schemes = {d.name: d for d in pipeline_space(load_recipe("int8"), haswell).dimensions}
    assert "u8s8" not in schemes["quantize.scheme"].choices  # its int16 pair sums saturate
    assert "u8s8-reduce-range" in schemes["quantize.scheme"].choices
    fp32_only = dataclasses.replace(load_target("rpi4"), precisions=("fp32",),
                                    peak_gmacs={"fp32": 48.0})
    space = pipeline_space(load_recipe("prune-int8"), fp32_only)
    assert not [d for d in space.dimensions if d.pass_name == "quantize"]
    assert dict(space.skipped) == {"quantize": "target has no int8 (('fp32',))"}
    no_exits = dataclasses.replace(load_target("jetson"), backends=("tensorrt",))
    assert "early_exit" in dict(pipeline_space(load_recipe("exit-int8"), no_exits).skipped)


def test_every_declared_value_is_a_valid_parameter():
    for name, pass_class in PASSES.items():
        for dim in declared_dimensions(pass_class()):
            values = dim.choices if isinstance(dim, Categorical) else (dim.low, dim.high)
            for value in values:
                params = from_dict(pass_class.Params, {dim.param: value}, f"{dim.name}")
                assert getattr(params, dim.param) == value, (name, dim.name, value)


def test_a_search_table_narrows_the_space(tmp_path):
    recipe = tmp_path / "narrowed.toml"
    recipe.write_text(NARROWED_RECIPE)
    assert recipe_search(recipe)["quantize.accuracy_budget"] == {"low": 0.5, "high": 1.5}
    space = pipeline_space(load_recipe(recipe), load_target("rpi4"), recipe_search(recipe))
    dims = {d.name: d for d in space.dimensions}
    assert dims["prune.budget_points"].choices == (None,)
    assert dims["prune.ratio"].choices == (0.0, 0.3, 0.1)
    assert dims["prune.scope"].choices == ("global",)
    assert dims["quantize.accuracy_budget"] == FloatRange(0.5, 1.5, when=(("mode", ("mixed",)),),
                                                          name="quantize.accuracy_budget")
    rng = random.Random(0)
    for point in (space.sample(rng) for _ in range(50)):
        assert point["prune.budget_points"] is None and point["prune.ratio"] in (0.0, 0.3, 0.1)
        mixed = point["quantize.mode"] == "mixed"
        assert ("quantize.accuracy_budget" in point) == mixed  # active only with its condition
        assert ("quantize.per_channel" in point) != mixed
        assert not mixed or 0.5 <= point["quantize.accuracy_budget"] <= 1.5
        load_recipe(recipe).with_overrides(point)  # every point is a valid pipeline
    printed = edgec("space", str(recipe), "--target", "rpi4", columns=160).stdout
    assert re.search(r"prune\.ratio\s+choice\s+0\.0, 0\.3, 0\.1\s+budget_points = none", printed)


def test_grid_visits_the_active_combinations_only(tmp_path):
    recipe = tmp_path / "quantize.toml"
    recipe.write_text('[[step]]\npass = "quantize"\n[search]\nquantize.scheme = ["auto", "u8u8"]\n'
                      'quantize.calibration_method = ["minmax"]\n')
    space = pipeline_space(load_recipe(recipe), load_target("rpi4"), recipe_search(recipe))
    grid = list(space.grid(points=3))
    # int8: 2 schemes x 2 per_channel x 2 calibrations; mixed: 2 schemes x 3 x 3 budgets
    assert len(grid) == 2 * 2 * 2 + 2 * 3 * 3
    assert {p["quantize.accuracy_budget"] for p in grid if "quantize.accuracy_budget" in p} == \
        {0.25, 1.625, 3.0}
    assert len({json.dumps(p, sort_keys=True) for p in grid}) == len(grid)
    assert IntRange(1, 4).values(3) == (1, 3, 4) and IntRange(1, 4).values(5) == (1, 2, 3, 4)


def test_optuna_trials_ask_the_active_dimensions_only():
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = space_of("prune-int8")
    pipeline = load_recipe("prune-int8")
    points = []

    def objective(trial):
        points.append(space.suggest(trial))
        pipeline.with_overrides(points[-1])
        return 0.0

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    study.optimize(objective, n_trials=12)
    assert [trial.params for trial in study.trials] == points
    assert all(("prune.ratio" in p) == (p["prune.budget_points"] is None) for p in points)


@pytest.mark.parametrize("narrow, message", [
    ({"quantise.mode": ["int8"]}, "has no pass 'quantise'; did you mean 'quantize'"),
    ({"prune.ratoi": [0.1]}, "has no parameter 'ratoi'; did you mean 'ratio'"),
    ({"prune.lr": [0.1]}, "declares no search range for 'lr' on target 'rpi4'; searchable: "),
    ({"quantize": ["int8"]}, "is not 'pass.param'"),
    ({"prune.ratio": [0.1, 0.7]}, r"0\.7 is outside the declared choice range 0\.0, 0\.1, 0\.2, "
                                  r"0\.3, 0\.4, 0\.5"),
    ({"quantize.accuracy_budget": {"low": 0.1}}, r"0\.1 is outside the declared float range "
                                                 r"0\.25 … 3\.0"),
    ({"quantize.accuracy_budget": {"lo": 0.5}}, "unknown key 'lo'; did you mean 'low'"),
    ({"quantize.per_channel": [1]}, "1 is outside the declared bool range true, false"),
    ({"quantize.mode": []}, "the list is empty"),
    ({"quantize.mode": "int8"}, "neither a list of values"),
    ({"quantize.mode": {"low": 1}}, "choices int8, mixed are not numbers; narrow them with a list"),
    ({"prune.ratio": {"low": 0.55}}, r"\{low = 0\.55\} keeps none of the declared choices 0\.0"),
])
def test_bad_narrowing_is_a_config_error_that_names_the_fix(narrow, message):
    with pytest.raises(ConfigError, match=message):
        space_of("prune-int8", narrow=narrow)


def test_a_target_narrows_before_the_recipe_does(tmp_path):
    with pytest.raises(ConfigError, match=r"u8s8 is outside .* auto, s8s8-symmetric"):
        space_of("int8", "jetson", {"quantize.scheme": ["u8s8"]})
    recipe = tmp_path / "typo.toml"
    recipe.write_text('[[step]]\npass = "quantize"\n[search]\n"quantize.sheme" = ["auto"]\n')
    done = edgec("space", str(recipe), "--target", "rpi4")
    assert done.returncode == 2 and done.stdout == ""
    assert "ConfigError: [search] quantize.sheme: pass 'quantize' has no parameter 'sheme'; " \
           "did you mean 'scheme'?" in " ".join(done.stderr.split())


def test_one_point_of_a_space_builds(tmp_path, monkeypatch):
    """A non-default point of the int8 recipe's space over the digits example, built for real:
    the manifest's lineage carries exactly the point's values."""
    from edgec.build import BuildRequest, build

    monkeypatch.setenv("EDGEC_CACHE", str(tmp_path / "cache"))
    narrow = {"quantize.mode": ["int8"], "quantize.calibration": ["data"],
              "quantize.calibration_method": ["minmax", "percentile"]}
    space = space_of("int8", "local", narrow)
    point = next(p for seed in range(100) if (p := space.sample(random.Random(seed)))
                 ["quantize.scheme"] not in ("auto", "u8s8") and not p["quantize.per_channel"])
    assert point != space.default()
    result = build(BuildRequest(EXAMPLES / "digits" / "model.toml", "local", "int8", profile=False,
                                out=tmp_path / "build", overrides=point))
    manifest = json.loads((result.directory / "manifest.json").read_text())
    [quantize] = [step for step in manifest["lineage"] if step["pass"] == "quantize"]
    assert {key: quantize["params"][key.partition(".")[2]] for key in point} == point
    assert manifest["int8"]["scheme"] == point["quantize.scheme"]
    assert manifest["accuracy"]["top1"] > 0.8


def test_a_point_of_the_prune_int8_space_for_rpi4_builds(tmp_path):
    """The space `edgec space prune-int8 --target rpi4` prints, narrowed to cheap values (no
    fine-tuning), sampled and built on the digits example for rpi4."""
    from edgec.build import BuildRequest, build

    narrow = {"prune.budget_points": ["none"], "prune.finetune_epochs": [0.0],
              "prune.ratio": [0.2, 0.3], "prune.importance": ["l1"], "prune.reconstruct": [False],
              "quantize.mode": ["int8"]}
    space = pipeline_space(load_recipe("prune-int8"), load_target("rpi4"), narrow)
    point = space.sample(random.Random(3))
    assert point["prune.budget_points"] is None and point["prune.ratio"] in (0.2, 0.3)
    result = build(BuildRequest(model=EXAMPLES / "digits" / "model.toml", target="rpi4",
                                recipe="prune-int8", budget=100.0,
                                overrides={**point, "budget.holdout": 250},
                                profile=False, out=tmp_path))
    built = {f"{step['pass']}.{name}": value for step in result.manifest["lineage"]
             for name, value in step["params"].items()}
    for key, value in point.items():
        assert built[key] == (list(value) if isinstance(value, tuple) else value), key
    assert result.manifest["target"]["name"] == "rpi4"
    assert result.manifest["lineage"][0]["report"]["macs_after"] < \
        result.manifest["lineage"][0]["report"]["macs_before"]


def test_the_declared_channel_multiples_fit_the_target():
    declared = pipeline_space(load_recipe("prune-int8"), load_target("rpi4"))
    multiple = next(d for d in declared.dimensions if d.name == "prune.channel_multiple")
    assert tuple(multiple.choices) == (0, 8, 16, 32)  # 4 is no multiple of rpi4's 8
