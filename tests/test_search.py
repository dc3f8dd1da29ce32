"""``edgec search`` end to end on the digits example: a real study (Optuna, SQLite), real builds
through the step cache, real measurements on this host, the report files read back."""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import EXAMPLES

DIGITS = EXAMPLES / "digits" / "model.toml"
HOLDOUT = {"budget.holdout": 250}  # digits' calibration split has 1,297 images


def _request(out: Path, **changes):
    from edgec.measure import MeasureSpec
    from edgec.search.study import SearchRequest

    request = SearchRequest(DIGITS, trials=4, out=out, overrides=dict(HOLDOUT),
                            measure=MeasureSpec(repeat=20, min_time_s=0.05))
    return replace(request, **changes)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A 4-trial search over the default recipes in a fresh cache, and its wall time."""
    from edgec.search.study import run_search

    root = tmp_path_factory.mktemp("search")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEC_CACHE", str(root / "cache"))
        started = time.monotonic()
        outcome = run_search(_request(root / "out"))
        seconds = time.monotonic() - started
        yield outcome, seconds, root


def test_four_trials_end_to_end_with_a_real_plot(searched):
    from matplotlib import image

    outcome, seconds, _ = searched
    assert seconds < 150, f"a 4-trial digits search took {seconds:.0f} s"
    built = [r for r in outcome.records if r.counts]
    assert len(built) == 4 and len(outcome.new_trials) == 4
    assert [(r.recipe, r.baseline) for r in built[:2]] == [("fp32", True), ("int8", True)]
    assert {path.name for path in outcome.reports} == {"pareto.png", "report.md", "report.html"}
    picture = image.imread(outcome.plan.out / "pareto.png")
    height, width = picture.shape[:2]
    assert height >= 400 and width >= 600
    colours = np.unique((picture[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50  # markers, error bars, text, the front: not a blank canvas
    inked = (picture[..., :3] < 0.9).any(axis=-1).mean()
    assert 0.01 < inked < 0.6
    orange = np.abs(picture[..., :3] - np.array([1.0, 0.624, 0.11])).max(axis=-1) < 0.05
    assert orange.sum() > 50  # the pick's star
    report = (outcome.plan.out / "report.md").read_text()
    trials = report.split("## Trials", 1)[1].split("\n## ", 1)[0]  # not the re-measurement
    rows = [line for line in trials.splitlines() if line[:4].strip("| ").isdigit()]
    assert len([row for row in rows if "repeat of trial" not in row]) == 4
    page = (outcome.plan.out / "report.html").read_text()
    assert "data:image/png;base64," in page and "src='http" not in page


def test_trials_store_what_they_measured(searched):
    outcome, _, _ = searched
    complete = [r for r in outcome.records if r.state == "complete"]
    assert complete
    for record in complete:
        attrs = record.attrs
        assert Path(attrs["artifact"], "manifest.json").is_file()
        manifest = json.loads(Path(attrs["artifact"], "manifest.json").read_text())
        assert attrs["manifest_hash"] == manifest["hash"]
        assert attrs["heldout_top1"] == pytest.approx(attrs["reference_top1"]
                                                      - attrs["heldout_drop"], abs=1e-3)
        assert record.values == (attrs["latency_mean_ms"], attrs["heldout_top1"],
                                 attrs["size_bytes"])
        assert attrs["test_top1"] is None  # nothing chooses by it: only the pick is evaluated
        assert attrs["latency_ci95_ms"] >= 0 and "skipped" in manifest["accuracy"]
        assert [step[0] for step in attrs["steps"]] == [s["pass"] for s in manifest["lineage"]]
        # one budget for every recipe: one view, one held-out slice, a re-check tail after it
        assert manifest["budget"]["view"] == "plain"  # 8x8 digits: 'auto' is plain
        assert manifest["budget"]["holdout"]["images"] == 250
        if attrs["recheck_drop"] is not None:
            assert attrs["recheck_images"] == 250
        if "repeat_of" in attrs:
            continue  # told an earlier trial's result, not built
        phases = attrs["phases_s"]
        assert set(phases) == {"fine-tune", "build", "evaluate", "measure"}
        assert phases["evaluate"] > 0 and phases["measure"] > 0
        assert sum(phases.values()) <= attrs["seconds"] + 0.5


def test_only_the_picks_candidates_are_rechecked_and_the_study_keeps_it(searched):
    """Trials defer the re-check; the pick runs it on the fastest feasible front trials until
    one passes and on that one's rivals, and stores it in the study (trials are finished)."""
    import optuna

    from edgec.search.study import trial_records

    outcome, _, _ = searched
    rechecked = {r.number: r.attrs["recheck_drop"] for r in outcome.records
                 if r.attrs.get("recheck_drop") is not None}
    assert outcome.pick.number in rechecked
    assert set(rechecked) <= set(outcome.front)
    slower = [r for r in outcome.records if r.feasible and r.number in outcome.front
              and r.latency_ms > 2 * outcome.pick.record.latency_ms]
    assert all(r.number not in rechecked for r in slower)  # no rival of the pick: not re-run
    study = optuna.load_study(study_name=outcome.plan.study_name, storage=outcome.plan.storage)
    stored = {r.number: r.attrs.get("recheck_drop") for r in trial_records(study)}
    assert {n: stored[n] for n in rechecked} == rechecked


def test_a_pick_that_fails_the_recheck_gives_way_to_the_next(searched):
    from edgec.search.pick import choose

    outcome, _, _ = searched
    feasible = sorted((r for r in outcome.records if r.feasible and "repeat_of" not in r.attrs),
                      key=lambda r: r.latency_ms)
    distinct = list({r.attrs["manifest_hash"]: r for r in reversed(feasible)}.values())[::-1]
    assert len(distinct) >= 2, "the 4-trial search needs two feasible artifacts"
    first, second = distinct[:2]
    over = first.attrs["budget_points"] + 0.5
    failed = replace(first, attrs={**first.attrs, "recheck_drop": over})
    apart = replace(second, attrs={**second.attrs, "latency_ci95_ms": 0.0})
    pick = choose((failed, apart), (first.number, second.number))
    assert pick.number == second.number
    assert f"trial {first.number}" in pick.decision and "re-check" in pick.decision
    assert choose((failed,), (first.number,)) is None


def test_pick_is_feasible_and_its_rebuild_command_parses_and_hits_the_cache(searched):
    from typer.main import get_command
    from typer.testing import CliRunner

    from edgec.cli import app, parse_overrides

    outcome, _, root = searched
    pick = outcome.pick
    assert pick is not None and pick.record.feasible
    assert pick.number in outcome.front
    assert pick.record.attrs["heldout_drop"] <= outcome.plan.request.budget
    assert 80 < pick.test_top1 <= 100  # the pick, rebuilt through the cache, evaluated
    assert f"{pick.test_top1:.2f} %" in (outcome.plan.out / "report.md").read_text()
    if not pick.finalists:  # no re-measurement: the fastest feasible trial on the front
        assert pick.record.latency_ms == min(r.latency_ms for r in outcome.records
                                             if r.feasible and r.number in outcome.front)
    args = list(outcome.command)
    assert args[:2] == ["edgec", "build"] and shlex.split(shlex.join(args)) == args
    group = get_command(app)
    build = group.get_command(group.make_context("edgec", args[1:]), "build")
    params = build.make_context("build", args[2:]).params
    assert params["recipe"] == pick.record.attrs["recipe_ref"]
    assert parse_overrides(params["set_"]) == pick.record.overrides
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEC_CACHE", str(root / "cache"))
        result = CliRunner().invoke(app, args[1:])
    assert result.exit_code == 0, result.output
    assert result.output.count("cache hit") == len(pick.record.attrs["steps"])
    profile = json.loads(Path(pick.record.attrs["artifact"], "profile.json").read_text())
    assert profile["from_cache"] is True


def test_build_from_study_rebuilds_the_pick_from_the_cache(searched, tmp_path):
    from typer.testing import CliRunner

    from edgec.cli import app

    outcome, _, root = searched
    plan, pick = outcome.plan, outcome.pick
    args = ["build", str(plan.request.model), "--from-study", plan.study_name, "--storage",
            plan.storage, "--out", str(plan.build_root), "--repeat", "20", "--min-time", "0.05"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEC_CACHE", str(root / "cache"))
        result = CliRunner().invoke(app, args)
        missing = CliRunner().invoke(app, ["build", str(plan.request.model), "--from-study",
                                           "nope", "--storage", f"sqlite:///{tmp_path}/x.db"])
    assert result.exit_code == 0, result.output
    assert f"building trial {pick.number} ({pick.record.attrs['recipe_ref']})" in result.output
    assert result.output.count("cache hit") == len(pick.record.attrs["steps"])
    assert missing.exit_code != 0 and "no study database" in missing.output


def test_ci_build_from_study_publishes_the_pick_for_every_target(searched, tmp_path):
    from edgec.ci.build import CiRequest, run_ci
    from edgec.measure import MeasureSpec

    outcome, _, root = searched
    plan, pick = outcome.plan, outcome.pick
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEC_CACHE", str(root / "cache"))
        index = run_ci(CiRequest(plan.request.model, ("local", "rpi4"),
                                 from_study=plan.study_name, storage=plan.storage,
                                 out=tmp_path / "dist", rounds=1,
                                 measure=MeasureSpec(repeat=20, min_time_s=0.05)))
    local, rpi4 = index["entries"]
    assert index["from_study"] == f"study {plan.study_name}, trial {pick.number}"
    assert local["status"] == rpi4["status"] == "ok"
    assert local["recipe"] == pick.record.attrs["recipe_ref"] == rpi4["recipe"]
    assert local["hash"] == pick.record.attrs["manifest_hash"]  # the very artifact it picked
    assert rpi4["hash"] != local["hash"] and rpi4["latency"] is None


def test_overlapping_finalists_are_remeasured_interleaved(searched):
    from edgec.search.pick import Remeasure, choose

    outcome, _, _ = searched
    distinct = {r.attrs["manifest_hash"]: r for r in outcome.records if r.state == "complete"}
    first, second = list(distinct.values())[:2]
    wide = [replace(r, attrs={**r.attrs, "latency_ci95_ms": 1.0}) for r in (first, second)]
    spec = outcome.plan.request.measure
    pick = choose(tuple(wide), (first.number, second.number), Remeasure("local", spec, 3))
    assert pick.finalists == (min(wide, key=lambda r: r.latency_ms).number,
                              max(wide, key=lambda r: r.latency_ms).number)
    assert len(pick.rounds) == 3 and all(len(r) == 2 and min(r) > 0 for r in pick.rounds)
    assert "re-measured interleaved over 3 rounds" in pick.decision
    assert pick.number in (first.number, second.number)


def test_finalists_within_the_drift_are_remeasured_together(searched):
    """Three distinct artifacts whose means lie within 25 % of each other, each with a tight
    interval of its own: all three are measured again, interleaved, and one of them wins."""
    from edgec.search.pick import Remeasure, choose

    outcome, _, _ = searched
    distinct = list({r.attrs["manifest_hash"]: r for r in outcome.records
                     if r.state == "complete" and "repeat_of" not in r.attrs}.values())
    assert len(distinct) >= 3, "the 4-trial search built fewer than 3 distinct artifacts"
    close = [replace(r, attrs={**r.attrs, "latency_mean_ms": 1.0 + 0.05 * i,
                               "latency_ci95_ms": 0.001})
             for i, r in enumerate(distinct[:3])]
    spec = outcome.plan.request.measure
    pick = choose(tuple(close), tuple(r.number for r in close), Remeasure("local", spec, 2))
    assert pick.finalists == tuple(r.number for r in close)
    assert len(pick.rounds) == 2 and all(len(r) == 3 and min(r) > 0 for r in pick.rounds)
    assert pick.number in pick.finalists and "re-measured interleaved" in pick.decision


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path, monkeypatch):
    import optuna

    from edgec.search.study import run_search

    monkeypatch.setenv("EDGEC_CACHE", str(tmp_path / "cache"))
    # mixed precision needs 2,512 calibration images; digits has 1,297: a DataError at build time
    request = _request(tmp_path / "out", recipes=("int8", "fp32"), backends=("onnxruntime",),
                       trials=3, overrides={**HOLDOUT, "quantize.mode": "mixed"})
    outcome = run_search(request)
    first, second = outcome.records[:2]
    assert (first.recipe, first.state) == ("int8", "failed")
    assert "DataError" in first.attrs["error"] and "calibration images" in first.attrs["error"]
    assert (second.recipe, second.state) == ("fp32", "complete")
    assert sum(r.counts for r in outcome.records) == 3
    stored = optuna.load_study(study_name=outcome.plan.study_name, storage=outcome.plan.storage)
    failed = stored.trials[0]
    assert failed.state == optuna.trial.TrialState.FAIL
    assert failed.user_attrs["error"] == first.attrs["error"]
    assert outcome.pick is not None and outcome.pick.record.state == "complete"


def test_a_bad_fixed_override_fails_before_any_trial(tmp_path):
    from edgec.errors import ConfigError
    from edgec.search.study import plan_search

    with pytest.raises(ConfigError, match="int3"):
        plan_search(_request(tmp_path, recipes=("int8",),
                             overrides={**HOLDOUT, "quantize.mode": "int3"}))


def test_resume_runs_only_the_missing_trials_and_rebuilds_nothing(tmp_path, monkeypatch):
    from edgec.search.study import run_search

    monkeypatch.setenv("EDGEC_CACHE", str(tmp_path / "cache"))
    request = _request(tmp_path / "out", recipes=("fp32", "int8"), backends=("onnxruntime",),
                       trials=3, study="resume")
    first = run_search(request)
    assert len(first.new_trials) == 3
    before = {r.number: (r.attrs, Path(r.attrs["artifact"]).stat().st_ino)
              for r in first.records if r.state == "complete"}
    finished = []
    second = run_search(replace(request, trials=5),
                        lambda status: status.finished and finished.append(status.finished.number))
    assert len(second.new_trials) == 2 and finished == list(second.new_trials)
    assert min(second.new_trials) > max(r.number for r in first.records)
    assert sum(r.counts for r in second.records) == 5
    for number, (attrs, inode) in before.items():  # not re-run, not rewritten
        again = next(r for r in second.records if r.number == number)
        assert again.attrs == attrs and Path(attrs["artifact"]).stat().st_ino == inode
    for record in (r for r in second.records if r.number in second.new_trials and r.attrs.get(
            "steps")):  # a new trial shares the finished trials' prefix through the step cache
        assert record.attrs["steps"][0] == ["fuse", "hit"]
    # the same configurations in another study: every step, evaluation and measurement cached
    again = run_search(replace(request, trials=2, study="again"))
    for record in again.records:
        assert {status for _, status in record.attrs["steps"]} == {"hit"}
        assert record.attrs["latency_from_cache"] is True


def test_cli_search_prints_the_pick_and_the_rebuild_command(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from edgec.cli import app

    monkeypatch.setenv("EDGEC_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, [
        "search", str(DIGITS), "--trials", "1", "--recipe", "fp32", "--backend", "onnxruntime",
        "--holdout", "250", "--out", str(tmp_path / "out"), "--repeat", "20",
        "--min-time", "0.05"])
    assert result.exit_code == 0, result.output
    assert "trial 0 complete: fp32 on onnxruntime" in result.output
    assert "pick" in result.output and "edgec build" in result.output
    assert (tmp_path / "out" / "report.html").is_file()
    bad = CliRunner().invoke(app, ["search", str(DIGITS), "--backend", "tensorrt"])
    assert bad.exit_code == 2 and "SearchError" in bad.output and "tensorrt" in bad.output


KILLED_SEARCH = """
import sys
from pathlib import Path
from edgec.measure import MeasureSpec
from edgec.search.storage import Heartbeat
from edgec.search.study import SearchRequest, run_search

run_search(SearchRequest(Path(sys.argv[1]), trials=5, out=Path(sys.argv[2]), study="killed",
                         recipes=("fp32", "int8"), backends=("onnxruntime",),
                         overrides={"budget.holdout": 250},
                         measure=MeasureSpec(repeat=20, min_time_s=0.05),
                         heartbeat=Heartbeat(interval_s=1, grace_s=3)))
"""


def _schema_ready(path: Path) -> bool:
    """Whether the search has finished creating the study's tables (read-only: a poller that
    created them itself would race the search doing the same)."""
    import sqlite3
    from contextlib import closing

    if not path.is_file():
        return False
    try:
        with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            return db.execute("SELECT count(*) FROM alembic_version").fetchone()[0] > 0
    except sqlite3.Error:
        return False


def _trials(storage: str):
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    if not _schema_ready(Path(storage.removeprefix("sqlite:///"))):
        return []
    try:
        return optuna.load_study(study_name="killed", storage=storage).trials
    except (KeyError, ValueError, RuntimeError, SQLAlchemyError):
        return []  # not created yet


def test_a_killed_search_resumes_without_rebuilding_or_remeasuring(tmp_path, monkeypatch):
    """SIGKILL while a trial builds; the next run fails that trial by its silent heartbeat,
    builds its configuration again and only the trials still missing, and measures nothing that
    was measured before (every measurement of the resumed run is counted by its artifact)."""
    import os
    import signal
    import subprocess
    import sys

    import optuna

    from edgec.devices import LocalDevice
    from edgec.search.storage import Heartbeat
    from edgec.search.study import run_search

    cache, out = tmp_path / "cache", tmp_path / "out"
    monkeypatch.setenv("EDGEC_CACHE", str(cache))
    storage = f"sqlite:///{out / 'killed.db'}"
    process = subprocess.Popen([sys.executable, "-c", KILLED_SEARCH, str(DIGITS), str(out)],
                               env={**os.environ, "EDGEC_CACHE": str(cache)})
    deadline, running = time.monotonic() + 240, None
    while time.monotonic() < deadline and process.poll() is None:
        trials = _trials(storage)
        done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        running = next((t for t in trials if t.state == optuna.trial.TrialState.RUNNING
                        and "recipe" in t.user_attrs), None)
        if done >= 2 and running is not None:
            break
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert running is not None, "the search ended or stalled before a third trial started"
    before = {t.number: (dict(t.user_attrs), Path(t.user_attrs["artifact"]).stat().st_ino)
              for t in _trials(storage) if t.state == optuna.trial.TrialState.COMPLETE}
    time.sleep(4)  # past the grace period: the killed trial's heartbeat is stale
    measured, picking = [], []  # every measurement of the resumed run, by artifact folder
    measure = LocalDevice.measure

    def counted(self, artifact, spec):
        name = Path(artifact).name  # a build measures in its folder's temporary twin, .NAME.xyz
        measured.append((name[1:].rsplit(".", 1)[0] if name.startswith(".") else name,
                         bool(picking)))
        return measure(self, artifact, spec)

    def watch(status) -> None:  # the pick's own interleaved re-measurement is not a trial's
        if status.step.startswith("re-measuring"):
            picking.append(True)

    monkeypatch.setattr(LocalDevice, "measure", counted)
    outcome = run_search(_request(out, recipes=("fp32", "int8"), backends=("onnxruntime",),
                                  trials=5, study="killed",
                                  heartbeat=Heartbeat(interval_s=1, grace_s=3)), watch)
    records = {r.number: r for r in outcome.records}
    assert records[running.number].state == "interrupted"
    retry = next(r for r in outcome.records if r.attrs.get("retry_of") == running.number)
    assert retry.number in outcome.new_trials and retry.state == "complete"
    assert (retry.recipe, retry.overrides) == (running.user_attrs["recipe"],
                                               running.user_attrs["overrides"])
    assert len(outcome.new_trials) == 5 - len(before)  # the missing trials, and no others
    assert sum(r.counts for r in outcome.records) == 5
    for number, (attrs, inode) in before.items():  # not rebuilt, not re-measured, not rewritten
        picked = {"recheck_drop", "recheck_images"}  # the pick's re-check adds them, or not
        assert {k: v for k, v in records[number].attrs.items() if k not in picked} \
            == {k: v for k, v in attrs.items() if k not in picked}
        assert Path(attrs["artifact"]).stat().st_ino == inode
    fresh = [records[n] for n in outcome.new_trials if not records[n].attrs["latency_from_cache"]]
    in_trials = [name for name, pick in measured if not pick]  # no fp32 reference row: a trial
    finished = {Path(attrs["artifact"]).name for attrs, _ in before.values()}
    assert not finished & set(in_trials)  # nothing finished was measured again
    assert sorted(in_trials) == sorted(Path(r.attrs["artifact"]).name for r in fresh)


def test_a_fixed_override_is_no_longer_searched(tmp_path):
    from edgec.search.study import plan_search

    plan = plan_search(_request(tmp_path, recipes=("int8", "prune-int8"),
                                overrides={**HOLDOUT, "prune.channel_multiple": 16,
                                           "quantize.mode": "int8"}))
    for name in ("int8", "prune-int8"):
        names = [dim.name for dim in plan.candidates[name].space.dimensions]
        assert "quantize.mode" not in names and "quantize.scheme" in names
        assert "quantize.per_channel" in names  # its condition (mode = int8) reads the fixed value
    prune = plan.candidates["prune-int8"].space
    assert "prune.channel_multiple" not in [dim.name for dim in prune.dimensions]
    assert prune.recipe["prune.channel_multiple"] == 16


def test_int8_recipes_are_not_offered_to_a_backend_that_refuses_int8(tmp_path):
    from edgec.search.study import plan_search

    plan = plan_search(_request(tmp_path, recipes=("fp32", "int8", "prune-int8")))
    assert "tvm" in plan.candidates["fp32"].backends  # local lists tvm; it compiles float
    assert "tvm" not in plan.candidates["int8"].backends  # QDQ would run as fake-quant float
    assert "tvm" not in plan.candidates["prune-int8"].backends


def _finetune_epochs(record) -> float:
    manifest = json.loads((Path(record.attrs["artifact"]) / "manifest.json").read_text())
    return next(step["params"]["finetune_epochs"] for step in manifest["lineage"]
                if step["pass"] == "prune")


def test_screened_trials_fine_tune_briefly_and_only_the_promoted_one_can_be_picked(
        tmp_path, monkeypatch):
    """Successive halving over fine-tune epochs: trials of a recipe that fine-tunes are built
    with a share of its epochs, never picked; the fastest inside the budget is rebuilt in full
    at the end, once, as the last of ``trials`` (a resumed study does not promote it again)."""
    from edgec.search.study import run_search

    monkeypatch.setenv("EDGEC_CACHE", str(tmp_path / "cache"))
    # digits' CNN survives pruning only lightly cut, on plain images, with a wide budget
    overrides = {**HOLDOUT, "prune.finetune_augment": "", "prune.ratios": [0.1, 0.2],
                 "prune.budget_points": 4.0}
    request = _request(tmp_path / "out", recipes=("prune-int8",), backends=("onnxruntime",),
                       trials=3, screen=0.4, promote=1, study="halving", budget=5.0,
                       overrides=overrides)
    outcome = run_search(request)
    screened = [r for r in outcome.records if r.counts and r.fidelity == 0.4]
    assert len(screened) == 2 and all(r.screened for r in screened)
    measured = [r for r in screened if r.measured]
    assert measured and {r.state for r in measured} == {"screened"}
    assert {_finetune_epochs(r) for r in measured} == {2.0}  # 0.4 of the recipe's 5
    assert not any(r.feasible for r in screened)  # never on the front, never picked
    promoted = [r for r in outcome.records if "promoted_from" in r.attrs]
    fastest = min((r for r in measured if r.within_budget), key=lambda r: r.latency_ms)
    assert len(promoted) == 1 and promoted[0].attrs["promoted_from"] == fastest.number
    assert promoted[0].overrides == fastest.overrides and promoted[0].fidelity == 1.0
    assert promoted[0].number in outcome.new_trials and promoted[0].state == "complete"
    assert _finetune_epochs(promoted[0]) == 5.0
    assert sum(r.counts for r in outcome.records) == 3  # --trials counts the promotion
    assert outcome.pick is not None and outcome.pick.number == promoted[0].number
    assert "screened" in (outcome.plan.out / "report.md").read_text()
    again = run_search(request)
    assert again.new_trials == () and len(again.records) == len(outcome.records)


EXIT_RECIPE = """
name = "exit-int8-small"
[[step]]
pass = "fuse"
[[step]]
pass = "early_exit"
after = ["layer2.2", "layer3.0"]
head = "mlp"
train_count = 1000
threshold_count = 500
cache_count = 1000
epochs = 20
lr = 0.01
cost_precision = "int8"  # cost_repeats at its default: 20 timings chose no exit once in four
[[step]]
pass = "quantize"
calibration_count = 128
[search]  # the exits' dimensions only
early_exit.head = ["mlp"]
early_exit.budget = [2.0]
quantize.mode = ["int8"]
quantize.scheme = ["u8s8"]
quantize.per_channel = [true]
quantize.calibration = ["data"]
quantize.calibration_method = ["minmax"]
"""


def test_exits_are_a_search_dimension_kept_only_where_the_stream_pays(tmp_path, monkeypatch):
    """An early-exit recipe in the study (ResNet-20, 2,000 training images): its number of
    exits and exit budget are searched, and every trial's cascade was streamed on the search's
    device, its exits kept only with a positive measured saving (the others dropped), which the
    trial's row reports."""
    from edgec.search.study import run_search
    from tests.conftest import cifar10_data_toml

    recipe = tmp_path / "exit.toml"
    recipe.write_text(EXIT_RECIPE)
    data = cifar10_data_toml(tmp_path / "data.toml", evaluation=100)
    monkeypatch.setenv("EDGEC_CACHE", str(tmp_path / "cache"))
    outcome = run_search(_request(tmp_path / "out", model=EXAMPLES / "resnet20_cifar10" /
                                  "model.toml", data=data, recipes=(str(recipe),), trials=2,
                                  budget=2.0))
    names = {d.name for d in outcome.plan.candidates["exit-int8-small"].space.dimensions}
    assert {"early_exit.budget", "early_exit.max_exits"} <= names
    built = [r for r in outcome.records if r.scored and "repeat_of" not in r.attrs]
    assert built
    report = (outcome.plan.out / "report.md").read_text()
    for record in built:
        exits, overrides = record.attrs["exits"], record.overrides
        assert {"early_exit.budget", "early_exit.max_exits"} <= set(overrides)
        assert len(exits["kept"]) <= overrides["early_exit.max_exits"]
        if exits["kept"]:
            assert exits["measured_on"] == "local" and exits["stream_saving"] > 0
            assert all(0 < rate <= 1 for _, rate in exits["kept"])
        assert set(exits["dropped"]) <= {"layer2.2", "layer3.0"}
        kept = ", ".join(f"{after} ({rate * 100:.0f} %)" for after, rate in exits["kept"])
        assert f"exits {kept or 'none'}" in report
    assert any(r.attrs["exits"]["stream_saving"] is not None for r in built), \
        "the cost model chose no exit in any trial: nothing was streamed"
