"""One accuracy budget per build: a ledger every pass spends from, against the float model on
one held-out slice that no pass trains on."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgec.artifact import Artifact
from edgec.budget import BudgetSpec, Ledger, onnx_view_top1
from edgec.data import load_data_config
from edgec.errors import BudgetError, ConfigError
from edgec.passes.export import ExportParams, ExportPass
from edgec.passes.fuse import FuseParams, FusePass
from edgec.passes.prune import PruneParams, PrunePass
from edgec.passes.quantize import QuantizeParams, QuantizePass
from edgec.pipeline import Context, Pipeline, Step
from edgec.recipes import load_recipe
from edgec.targets import load_target
from tests.conftest import EXAMPLES


@pytest.fixture(scope="module")
def digits_calibration():
    return load_data_config(EXAMPLES / "digits" / "data.toml").load("calibration")


def _ledger(spec, calibration, digits_config, digits_model, pipeline):
    usable, holdout, _ = spec.split(calibration)
    ledger = Ledger(spec, holdout, digits_config.input, float("nan"),
                    steps=[s.pass_.name for s in pipeline.steps])
    ledger.reference_top1 = ledger.top1(Artifact("torch", digits_model))
    return usable, ledger


def _int8_steps() -> list[Step]:
    return [Step(FusePass(), FuseParams(verify=False)), Step(ExportPass(), ExportParams()),
            Step(QuantizePass(), QuantizeParams(calibration_count=64))]


def test_every_step_is_charged_against_the_float_model(tmp_path, digits_model, digits_config,
                                                        digits_calibration):
    pipeline = Pipeline([Step(PrunePass(), PruneParams(ratio=0.3, finetune_epochs=0.0)),
                         *_int8_steps()])
    spec = BudgetSpec(points=100.0, holdout=300)
    usable, ledger = _ledger(spec, digits_calibration, digits_config, digits_model, pipeline)
    assert len(usable) + len(ledger.holdout) == len(digits_calibration)
    ctx = Context(load_target("local"), digits_config.input, usable, tmp_path, ledger=ledger)
    built = pipeline.run(Artifact("torch", digits_model), ctx)
    spends = {entry["pass"]: entry for entry in ledger.spends}
    assert list(spends) == ["prune", "fuse", "export", "quantize"]
    assert not spends["fuse"]["measured"] and spends["fuse"]["points"] == 0
    assert spends["prune"]["measured"] and spends["quantize"]["measured"]
    final = onnx_view_top1(built.payload, ledger.holdout, digits_config.input) * 100
    assert ledger.spent == pytest.approx(ledger.reference_top1 - final, abs=1e-3)
    assert ledger.to_json()["spent"] == pytest.approx(ledger.spent, abs=1e-3)


def test_a_step_past_the_budget_names_what_each_pass_spent(tmp_path, digits_model,
                                                           digits_config, digits_calibration):
    """A 60 % cut without fine-tuning loses points; a budget of 0 cannot pay for them."""
    pipeline = Pipeline([Step(PrunePass(), PruneParams(ratio=0.6, finetune_epochs=0.0)),
                         *_int8_steps()])
    usable, ledger = _ledger(BudgetSpec(points=0.0, holdout=300), digits_calibration,
                             digits_config, digits_model, pipeline)
    ctx = Context(load_target("local"), digits_config.input, usable, tmp_path, ledger=ledger)
    with pytest.raises(BudgetError, match=r"after 'prune' .* over the budget of 0.0 points; "
                                          r"'prune' spent \+\d+\.\d\d, earlier passes: none"):
        pipeline.run(Artifact("torch", digits_model), ctx)


def test_prune_searches_inside_what_the_ledger_allows(tmp_path, digits_model, digits_config,
                                                      digits_calibration):
    """With a ledger, prune measures on the ledger's slice: its kept step's drop is what the
    ledger then charges, and it never exceeds the allowance (points less later reserves)."""
    pipeline = Pipeline([Step(PrunePass(), PruneParams(budget_points=50.0, ratios=(0.2, 0.6),
                                                       finetune_epochs=0.0)), *_int8_steps()])
    spec = BudgetSpec(points=3.0, holdout=300, reserve={"quantize": 1.0})
    usable, ledger = _ledger(spec, digits_calibration, digits_config, digits_model, pipeline)
    assert ledger.allowance() == pytest.approx(2.0)
    ctx = Context(load_target("local"), digits_config.input, usable, tmp_path, ledger=ledger)
    try:
        pipeline.run(Artifact("torch", digits_model), ctx)
    except BudgetError as exc:  # prune found no step within 2 points: say so, with the number
        assert "within 2.00 points" in str(exc) or "after 'quantize'" in str(exc)
        return
    prune = ledger.spends[0]
    assert prune["points"] <= 2.0 + 1e-9


def test_recipe_budget_table(tmp_path):
    recipe = tmp_path / "r.toml"
    body = '[[step]]\npass = "fuse"\n[[step]]\npass = "export"\n'
    recipe.write_text('budget = 0.5\n' + body)
    assert load_recipe(recipe).budget == BudgetSpec(0.5)
    recipe.write_text('[budget]\npoints = 1.0\nview = "shifted"\nholdout = 2000\n'
                      'reserve = {export = 0.2}\n' + body)
    assert load_recipe(recipe).budget == BudgetSpec(1.0, "shifted", 2000, {"export": 0.2})
    pipeline = load_recipe(recipe).with_overrides({"budget.holdout": 300, "budget.points": 2.0})
    assert pipeline.budget == BudgetSpec(2.0, "shifted", 300, {"export": 0.2})
    with pytest.raises(ConfigError, match="unknown key 'hold'"):
        load_recipe(recipe).with_overrides({"budget.hold": 300})
    recipe.write_text('[budget]\npoints = 1.0\nreserve = {quantise = 0.2}\n' + body)
    with pytest.raises(ConfigError, match="reserve names 'quantise', which the recipe does not"):
        load_recipe(recipe)
    recipe.write_text('[budget]\npoints = 1.0\nview = "sideways"\n' + body)
    with pytest.raises(ConfigError, match="view 'sideways'"):
        load_recipe(recipe)


def test_build_budget_lands_in_the_manifest(tmp_path):
    from edgec.build import BuildRequest, build

    result = build(BuildRequest(model=EXAMPLES / "digits" / "model.toml", recipe="int8",
                                budget=2.0, profile=False, out=tmp_path))
    budget = result.manifest["budget"]
    assert budget["points"] == 2.0 and budget["holdout"]["images"] == 1297 // 5
    assert [entry["pass"] for entry in budget["spends"]] == ["fuse", "export", "quantize"]
    assert budget["spent"] <= 2.0
    with pytest.raises(ConfigError, match="budget points -1.0 must be >= 0"):
        build(BuildRequest(model=EXAMPLES / "digits" / "model.toml", recipe="int8",
                           budget=-1.0, profile=False, out=Path(tmp_path) / "x"))


def test_the_ledger_reads_a_cascade_as_its_runner_does(tmp_path, digits_model, digits_config,
                                                       digits_calibration):
    """An early-exit artifact is charged what its cascade answers (the first exit that is
    confident enough), the same top-1 the artifact's own runner measures; a cascade that kept
    no exit is its final output."""
    import numpy as np

    from edgec.build import write_artifact
    from edgec.devices import LocalDevice
    from edgec.passes.early_exit import EarlyExitParams, EarlyExitPass

    params = EarlyExitParams(after=("conv1",), train_count=600, threshold_count=300, epochs=3,
                             cost_repeats=20,
                             thresholds=(0.15,))  # a weak head (3 epochs): a low bar
    steps = [Step(FusePass(), FuseParams(verify=False)), Step(EarlyExitPass(), params)]
    ctx = Context(load_target("local"), digits_config.input, digits_calibration, tmp_path,
                  baseline=digits_model)
    cascade = Pipeline(steps).run(Artifact("torch", digits_model), ctx)
    holdout = digits_calibration.slice(1000, 1297)
    ledger = Ledger(BudgetSpec(1.0), holdout, digits_config.input, 100.0)
    directory = tmp_path / "artifact"
    directory.mkdir()
    write_artifact(cascade, digits_config, load_target("local"), [], directory)
    npz = tmp_path / "holdout.npz"
    np.savez(npz, images=holdout.images, labels=holdout.labels)
    measured = LocalDevice().evaluate(directory, str(npz))
    assert 0 < measured["exits"][0] < len(holdout)  # the exit answers some images, not all
    assert ledger.top1(cascade) == pytest.approx(measured["top1"] * 100, abs=0.5)
    no_exit = Artifact("onnx", cascade.payload, extras={"cascade": {"exits": []}})
    final_only = onnx_view_top1(cascade.payload, holdout, digits_config.input) * 100
    assert ledger.top1(no_exit) == pytest.approx(final_only)


def test_a_pt2e_quantized_model_is_charged_too(tmp_path, digits_model, digits_config,
                                               digits_calibration):
    """mobile-int8's quantize_pt2e output is an exported graph that refuses .eval()."""
    from edgec.passes.quantize_pt2e import QuantizePt2eParams, QuantizePt2ePass

    pipeline = Pipeline([Step(FusePass(), FuseParams(verify=False)),
                         Step(QuantizePt2ePass(), QuantizePt2eParams(calibration_count=64))])
    usable, ledger = _ledger(BudgetSpec(points=100.0, holdout=300), digits_calibration,
                             digits_config, digits_model, pipeline)
    ctx = Context(load_target("local"), digits_config.input, usable, tmp_path, ledger=ledger)
    pipeline.run(Artifact("torch", digits_model), ctx)
    quantized = ledger.spends[-1]
    assert quantized["pass"] == "quantize_pt2e" and quantized["measured"]
    assert abs(quantized["points"]) < 5  # int8 of a small CNN: a few images at most
