"""``edgec search --latency-model``: latencies predicted by a model fit on this host's own
profiles (``edgec latency sample`` of the digits example, ``edgec latency fit``), real builds,
real measurements counted where the search still measures."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES

DIGITS = EXAMPLES / "digits" / "model.toml"
SPACE = {"recipes": ("fp32", "int8"), "backends": ("onnxruntime",)}  # what the samples cover


@pytest.fixture(scope="module")
def latency_model(tmp_path_factory):
    """A latency model of ``local`` fit on 16 sampled digits structures (fp32 and int8 schemes,
    pruned and not), measured here."""
    from edgec.cli_latency import fit_device
    from edgec.latency import save
    from edgec.latency.sample import SampleRequest, run_sample
    from edgec.measure import MeasureSpec

    root = tmp_path_factory.mktemp("predicted")
    run_sample(SampleRequest((DIGITS,), count=16, multiples=(4,), profiles=root / "profiles",
                             measure=MeasureSpec(repeat=20, min_time_s=0.05)))
    [fitted] = fit_device("local", root / "profiles")
    return save(root / "local.json", [fitted.model]), root


def _request(out: Path, model_file: Path, mode: str, trials: int):
    from edgec.measure import MeasureSpec
    from edgec.search.study import SearchRequest

    return SearchRequest(DIGITS, trials=trials, out=out, overrides={"budget.holdout": 250},
                         measure=MeasureSpec(repeat=20, min_time_s=0.05),
                         latency_model=model_file, measure_trials=mode, **SPACE)


def _counting(monkeypatch) -> list[str]:
    from edgec.devices import LocalDevice

    measured, measure = [], LocalDevice.measure

    def counted(self, artifact, spec):
        measured.append(Path(artifact).name)
        return measure(self, artifact, spec)

    monkeypatch.setattr(LocalDevice, "measure", counted)
    return measured


def test_with_no_board_every_trial_is_predicted_and_nothing_measured(latency_model, tmp_path,
                                                                    monkeypatch):
    from edgec.search.study import run_search

    model_file, root = latency_model
    monkeypatch.setenv("EDGEC_CACHE", str(root / "cache"))
    measured = _counting(monkeypatch)
    outcome = run_search(_request(tmp_path / "out", model_file, "none", 4))
    built = [r for r in outcome.records if r.counts]
    assert len(built) == 4 and not measured  # not the trials, not the pick: the board is absent
    for record in built:
        assert record.state == "complete" and record.attrs["latency_source"] == "predicted"
        assert record.latency_ms == record.attrs["predicted_ms"] > 0
    assert outcome.pick is not None and outcome.pick.decision.startswith("predicted by the "
                                                                         "latency model")
    report = (outcome.plan.out / "report.md").read_text()
    assert "(none): 0 of 4 trials measured (0%)" in report and " predicted |" in report


def test_promising_trials_are_measured_and_only_measured_ones_are_picked(latency_model, tmp_path,
                                                                        monkeypatch):
    from edgec.search.study import run_search

    model_file, root = latency_model
    monkeypatch.setenv("EDGEC_CACHE", str(root / "cache"))
    measured = _counting(monkeypatch)
    outcome = run_search(replace(_request(tmp_path / "out", model_file, "promising", 6),
                                 remeasure_rounds=2))
    built = [r for r in outcome.records if r.counts and r.scored]
    on_board = [r for r in built if r.attrs["latency_source"] == "measured"]
    assert {r.recipe for r in built if r.baseline} <= {r.recipe for r in on_board}
    for record in built:
        assert record.attrs["predicted_ms"] is not None  # every trial predicted, measured or not
        if record.attrs["latency_source"] == "predicted":
            assert record.state == "predicted" and not record.feasible
            assert record.number not in outcome.front
            assert "over" in record.attrs["measure_why"]
        else:
            assert record.state == "complete"
    pick = outcome.pick
    assert pick is not None and pick.record.attrs["latency_source"] == "measured"
    # a build measures in its folder's temporary twin (.NAME.xyz); the pick's rounds in NAME
    in_builds = {name[1:].rsplit(".", 1)[0] for name in measured if name.startswith(".")}
    assert in_builds == {Path(r.attrs["artifact"]).name for r in on_board
                         if not r.attrs["latency_from_cache"] and "repeat_of" not in r.attrs}
    kept_off = {Path(r.attrs["artifact"]).name for r in built
                if r.attrs["latency_source"] == "predicted"}
    assert not kept_off & (in_builds | set(measured))
    report = (outcome.plan.out / "report.md").read_text()
    assert f"(promising): {len(on_board)} of {len(built)} trials measured" in report
    assert "predicted against measured on" in report


def test_the_gate_measures_baselines_close_calls_and_explores():
    from edgec.search.predict import EXPLORE_EVERY, PROMISING_MARGIN, promising

    assert promising(9.0, 1.0, True, True, 0)[0]  # a baseline: always on the plot
    assert not promising(0.5, 1.0, False, False, 0)[0]  # over the budget: cannot be picked
    assert promising(5.0, None, True, False, 0)[0]  # nothing feasible measured yet
    assert not promising(0.1, None, True, False, 0, screened=True)[0]  # never picked: predicted
    assert promising(1.0 + PROMISING_MARGIN - 1e-9, 1.0, True, False, 0)[0]
    slow = [promising(2.0, 1.0, True, False, n)[0] for n in range(2 * EXPLORE_EVERY)]
    assert sum(slow) == 2 and slow[EXPLORE_EVERY - 1]  # every EXPLORE_EVERY-th passed over


def test_the_gate_reads_predictions_on_the_board_scale_of_the_trials_measured(latency_model):
    from edgec.search.predict import (
        EXPLORE_EVERY,
        MeasureGate,
        Prediction,
        Predictor,
        board_scale,
    )

    assert board_scale([]) == 1.0
    assert board_scale([(1.0, 2.0), (2.0, 4.2), (0.5, 0.9)]) == 2.0  # the median ratio
    assert board_scale([(1.0, 2.0), (1.0, 3.0)]) == 2.5
    # a board running twice as slow as its ONNX Runtime profiles (ExecuTorch's read 3x low): a
    # trial predicted at 0.6 ms is not a contender for the fastest measured 1.0 ms, and its
    # stand-in latency is 1.2 ms
    predictor = Predictor(latency_model[0], (), "local", 1)
    fixed = type("Fixed", (), {"try_predict": lambda self, d: (
        Prediction(0.6, 0.05, "fixed", "onnxruntime"), "")})()
    pairs = {"onnxruntime": [(1.0, 2.0), (0.5, 1.0)], "executorch": [(1.0, 3.0)]}
    within = {"budget": {"spent": 0.1, "points": 1.0}}
    gate = MeasureGate(predictor, "promising", False, 1.0, 0, pairs)
    gate.predictor = fixed
    assert not gate(None, within)
    assert gate.as_measurement().mean == pytest.approx(1.2)
    assert gate.attrs()["predicted_ms"] == 0.6 and gate.attrs()["board_scale"] == 2.0
    assert gate.attrs()["passed_over"]
    unscaled = MeasureGate(predictor, "promising", False, 1.0, 0)
    unscaled.predictor = fixed
    assert unscaled(None, within) and not unscaled.attrs()["passed_over"]
    # a trial explored is still one the margin passed over: the next passed-over ones are not
    # all explored
    explored = MeasureGate(predictor, "promising", False, 1.0, EXPLORE_EVERY - 1, pairs)
    explored.predictor = fixed
    assert explored(None, within) and explored.why.startswith("exploration")
    assert explored.attrs()["passed_over"]


def test_modes_and_models_that_cannot_serve_are_refused(latency_model, tmp_path):
    from edgec.errors import ConfigError
    from edgec.search.predict import Predictor, resolve_mode
    from edgec.search.study import plan_search

    model_file, _ = latency_model
    with pytest.raises(ConfigError, match="--measure-trials promising needs a latency model"):
        resolve_mode("promising", None, True)
    with pytest.raises(ConfigError, match="does not run here and no --device"):
        resolve_mode("all", Predictor(model_file, (), "rpi4", 1), False)
    with pytest.raises(ConfigError, match="choose one of all, promising, none"):
        resolve_mode("some", None, True)
    assert resolve_mode(None, Predictor(model_file, (), "local", 1), True) == "promising"
    assert resolve_mode(None, Predictor(model_file, (), "rpi4", 1), False) == "none"
    with pytest.raises(ConfigError, match="holds no model of local with 2 thread"):
        plan_search(replace(_request(tmp_path, model_file, "promising", 2),
                            measure=replace(_request(tmp_path, model_file, "all", 2).measure,
                                            threads=2)))
    plan = plan_search(_request(tmp_path, model_file, None, 2))
    assert plan.measure_trials == "promising" and plan.predictor.device == "local"


def test_ci_build_predicts_a_board_it_cannot_measure_and_says_why_it_cannot(latency_model,
                                                                           tmp_path):
    """`edgec ci build --latency-model`: rpi4 has no board here, so its entry's latency comes
    from the model, marked predicted. The model is local's, relabelled rpi4 (this host's
    profiles stand in for a board's; the key is all the CI path reads). A model that holds no
    rpi4 leaves the latency empty and says why (the entry's note)."""
    import json

    from edgec.ci.build import CiRequest, plan_jobs, predicted_latency, run_ci
    from edgec.measure import MeasureSpec
    from edgec.search.predict import Predictor

    model_file, _ = latency_model
    data = json.loads(model_file.read_text())
    for model in data["models"]:
        model["key"]["device"] = "rpi4"
    relabelled = tmp_path / "rpi4.json"
    relabelled.write_text(json.dumps(data))
    request = CiRequest(DIGITS, ("rpi4",), out=tmp_path / "dist", latency_model=relabelled,
                        measure=MeasureSpec(repeat=20, min_time_s=0.05), rounds=1)
    [entry] = run_ci(request)["entries"]
    expected = Predictor.load(relabelled, "rpi4", 1).predict(tmp_path / "dist" / entry["artifact"])
    assert entry["latency"]["source"] == "predicted" and entry["latency"]["on"] == "rpi4"
    assert entry["latency"]["mean_ms"] == pytest.approx(expected.latency_ms) and entry["note"] == ""
    job = next(iter(plan_jobs(request)))
    latency, why = predicted_latency(replace(request, latency_model=model_file), job,
                                     tmp_path / "dist" / entry["artifact"])
    assert latency is None and why.startswith("latency not predicted: ")
    assert "holds no model of rpi4" in why
