"""`edgec ci build` and `edgec ci diff`: one reproducible artifact per target, an index, and a
regression gate that fires on a real slower or less accurate build and not on a rebuild."""

from __future__ import annotations

import filecmp
import json
import math
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgec.ci.build import CiRequest, failures, run_ci
from edgec.ci.diff import Thresholds, compare, parse_fraction
from edgec.ci.index import load_index, merge_indexes
from edgec.cli import app
from edgec.errors import ConfigError
from edgec.measure import MeasureSpec
from tests.conftest import EXAMPLES, cifar10_data_toml, shared_file

DIGITS = EXAMPLES / "digits" / "model.toml"
QUICK = MeasureSpec(repeat=50, min_time_s=0.3)
RESNET20_TARGETS = ("local", "rpi4", "rpi5", "jetson-orin-nano", "android-arm64")


@pytest.fixture(scope="module")
def digits_twice(tmp_path_factory):
    """The digits model for local, rpi4 (TVM) and android-arm64 (.ort), built twice: once
    through the step cache, once with it off (every pass and toolchain run again)."""
    root = tmp_path_factory.mktemp("ci")
    request = CiRequest(DIGITS, ("local", "rpi4", "android-arm64"), out=root / "first",
                        measure=QUICK)
    first = run_ci(request)
    os.environ["EDGEC_UNRELATED"] = "x" * 5000  # the parent's environment must not matter
    try:
        second = run_ci(replace(request, out=root / "second", cache=False))
    finally:
        del os.environ["EDGEC_UNRELATED"]
    return first, second, root


def test_ci_build_publishes_one_artifact_per_target_and_an_index(digits_twice):
    first, _, root = digits_twice
    index = load_index(root / "first")
    assert index == first and not failures(index)
    by_target = {entry["target"]: entry for entry in index["entries"]}
    assert set(by_target) == {"local", "rpi4", "android-arm64"}
    local, rpi4 = by_target["local"], by_target["rpi4"]
    assert local["latency"]["source"] == "measured" and local["latency"]["rounds"] == 3
    assert local["latency"]["ci95_ms"] > 0 and local["peak_rss_mb"] > 0
    assert rpi4["latency"] is None  # no board: this host is not a Raspberry Pi
    for entry in by_target.values():
        assert entry["accuracy"]["top1"] > 0.9 and entry["accuracy"]["on"] == "local"
        folder = root / "first" / entry["artifact"]
        assert entry["artifact"] == f"digits-cnn-{entry['target']}-{entry['hash'][:12]}"
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["hash"] == entry["hash"] and entry["versions"]["onnxruntime"]
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [*manifest["files"], "manifest.json"])


def test_two_builds_from_the_same_inputs_publish_identical_bytes(digits_twice):
    """Every target, .ort included where this machine lets its converter run without
    address-space randomisation (a seccomp profile may refuse it: then only that one differs)."""
    first, second, root = digits_twice
    host, scratch = socket.gethostname(), str(root)
    for entry, again in zip(first["entries"], second["entries"], strict=True):
        a, b = root / "first" / entry["artifact"], root / "second" / again["artifact"]
        compiled = json.loads((a / "manifest.json").read_text())["entry"]
        if not compiled.get("deterministic", True):
            assert entry["target"] == "android-arm64", compiled
            continue
        assert entry["hash"] == again["hash"], entry["target"]
        names = sorted(p.name for p in a.iterdir())
        assert names == sorted(p.name for p in b.iterdir())
        match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
        assert not mismatch and not errors, f"{entry['target']}: {mismatch} differ"
        text = (a / "manifest.json").read_text()
        assert scratch not in text and "/tmp/" not in text and f'"{host}"' not in text


def test_the_gate_stays_quiet_on_a_rebuild(digits_twice):
    _, _, root = digits_twice
    result = CliRunner().invoke(app, ["ci", "diff", str(root / "first" / "index.json"),
                                      str(root / "second" / "index.json")])
    assert result.exit_code == 0, result.output
    assert "no regression" in result.output


def test_the_gate_fires_on_lower_accuracy(digits_twice, tmp_path):
    """A real build that lost accuracy: half the MACs pruned without fine-tuning."""
    _, _, root = digits_twice
    pruned = run_ci(CiRequest(
        DIGITS, ("local", "rpi4"), recipe="prune-int8", budget=100.0, out=tmp_path / "pruned",
        measure=QUICK, rounds=1, overrides={
            "prune.budget_points": None, "prune.ratio": 0.5, "prune.finetune_epochs": 0.0,
            "budget.holdout": 300, "budget.recheck": 0}))
    changes = [c for c in compare(load_index(root / "first"), pruned, Thresholds()) if c.new]
    assert [c.target for c in changes] == ["local", "rpi4"]
    for change in changes:
        assert change.accuracy_change < -1.0
        assert any("top-1" in why for why in change.regressions), change
    result = CliRunner().invoke(app, ["ci", "diff", str(root / "first"),
                                      str(tmp_path / "pruned")])
    assert result.exit_code == 1 and "regression: local" in result.output


def test_the_gate_fires_on_a_slower_artifact_and_weighs_the_noise(tmp_path):
    """ResNet-20 on this host: the fp32 build after the int8 one is a real slowdown (+56 to
    +82 % in three quiet runs here, each beyond the noise by at least 0.17 ms); the gate fires
    on it exactly when it is beyond the noise, and always on the int8 index planted 50 % slower
    at its own noise."""
    data = cifar10_data_toml(tmp_path / "data.toml", evaluation=500)
    model = EXAMPLES / "resnet20_cifar10" / "model.toml"
    base = CiRequest(model, ("local",), data=data, measure=QUICK)
    fast = run_ci(replace(base, recipe="int8", out=tmp_path / "int8"))
    slow = run_ci(replace(base, recipe="fp32", out=tmp_path / "fp32"))
    [change] = compare(fast, slow, Thresholds())
    print(f"fp32 after int8: {change.latency_change:+.1%}")  # +56 to +82 % on a quiet machine
    old, new = fast["entries"][0]["latency"], slow["entries"][0]["latency"]
    beyond = new["mean_ms"] - old["mean_ms"] - math.hypot(old["ci95_ms"], new["ci95_ms"])
    # a VM's noisy window can widen the rounds' interval past the slowdown (CI saw it twice):
    # then the gate must stay quiet, and otherwise fire
    assert any("latency" in why for why in change.regressions) == (
        beyond > Thresholds().max_latency_regress * old["mean_ms"])
    planted = json.loads(json.dumps(fast))  # the int8 artifact, 50 % slower at the same noise
    planted["entries"][0]["latency"]["mean_ms"] *= 1.5 + 2 * old["ci95_ms"] / old["mean_ms"]
    assert any("latency" in why for why in compare(fast, planted, Thresholds())[0].regressions)
    # the other way round is an improvement, and a slowdown inside the noise is none
    assert not compare(slow, fast, Thresholds())[0].regressions
    noisy = json.loads(json.dumps(fast))
    latency = noisy["entries"][0]["latency"]
    latency["ci95_ms"] = latency["mean_ms"] * 0.2
    inflated = json.loads(json.dumps(noisy))
    inflated["entries"][0]["latency"]["mean_ms"] *= 1.2
    assert not compare(noisy, inflated, Thresholds())[0].regressions


def test_a_failed_or_vanished_target_regresses_and_bad_input_is_refused(digits_twice):
    first, _, root = digits_twice
    failed = json.loads(json.dumps(first))
    failed["entries"][1].update(status="failed", error="CompileError: planted")
    gone = {**first, "entries": first["entries"][:1]}
    planted, vanished = failed["entries"][1]["target"], first["entries"][1]["target"]
    assert _change(compare(first, failed, Thresholds()), planted).regressions == (
        "failed: CompileError: planted",)
    assert _change(compare(first, gone, Thresholds()), vanished).regressions == (
        "gone from the new index",)
    assert parse_fraction("5%", "--x") == pytest.approx(0.05) == parse_fraction("0.05", "--x")
    with pytest.raises(ConfigError, match="--max-latency-regress 'five'"):
        parse_fraction("five", "--max-latency-regress")
    with pytest.raises(ConfigError, match="needs --targets"):
        run_ci(CiRequest(DIGITS, out=root / "none"))
    with pytest.raises(ConfigError, match="unknown target"):
        run_ci(CiRequest(DIGITS, ("nosuchboard",), out=root / "none"))
    assert not (root / "none").exists()
    with pytest.raises(ConfigError, match="both hold local"):
        merge_indexes([root / "first" / "index.json", root / "second" / "index.json"])
    merged = merge_indexes([root / "first" / "index.json"])
    assert [e["target"] for e in merged["entries"]] == ["android-arm64", "local", "rpi4"]


def _change(changes, target: str):
    return next(change for change in changes if change.target == target)


def test_boards_of_the_inventory_evaluate_and_measure_and_an_unreachable_one_is_noted(
        ssh_server, tmp_path):
    """A real sshd board serving `local`, and an `rpi4` board nobody answers for."""
    from edgec.devices.inventory import save_device
    from tests import sshd

    devices = tmp_path / "devices"
    save_device(sshd.board_config(ssh_server, tmp_path / "board"), devices)
    save_device(sshd.board_config(ssh_server, tmp_path / "gone", name="gone", target="rpi4",
                                  port=1, retries=0, connect_timeout_s=2.0), devices)
    index = run_ci(CiRequest(DIGITS, devices=devices, out=tmp_path / "dist", measure=sshd.QUICK,
                             eval_count=200, rounds=2))
    board, gone = index["entries"]
    assert (board["target"], board["device"], gone["target"], gone["device"]) == (
        "local", "loopback", "rpi4", "gone")
    assert board["accuracy"] == {**board["accuracy"], "on": "loopback", "images": 200}
    assert board["latency"]["on"] == "loopback" and board["latency"]["rounds"] == 2
    assert board["status"] == gone["status"] == "ok" and not failures(index)
    assert gone["latency"] is None and gone["accuracy"]["on"] == "local"
    assert gone["note"].startswith("board gone not reached")
    only = run_ci(CiRequest(DIGITS, devices=devices, only_device="loopback",
                            out=tmp_path / "one", measure=sshd.QUICK, eval_count=200, rounds=1))
    assert [(e["target"], e["device"]) for e in only["entries"]] == [("local", "loopback")]
    assert only["entries"][0]["hash"] == board["hash"]


@pytest.mark.skipif(not os.environ.get("EDGEC_CI_RESNET20"),
                    reason="opt-in (EDGEC_CI_RESNET20=1): ResNet-20 over five targets, twice, "
                           "on the full test split (~15 min on 2 cores)")
def test_resnet20_over_five_targets_twice_gives_identical_hashes(tmp_path):
    model = EXAMPLES / "resnet20_cifar10" / "model.toml"
    shared_file("resnet20-12fca82f.th")
    request = CiRequest(model, RESNET20_TARGETS, out=tmp_path / "a")
    first = run_ci(request)
    second = run_ci(replace(request, out=tmp_path / "b", cache=False))
    print(json.dumps(first, indent=1))
    assert [e["target"] for e in first["entries"]] == list(RESNET20_TARGETS)
    assert not failures(first) and not failures(second)
    assert [e["hash"] for e in first["entries"]] == [e["hash"] for e in second["entries"]]
    for entry in first["entries"]:
        a, b = tmp_path / "a" / entry["artifact"], tmp_path / "b" / entry["artifact"]
        names = [str(p.relative_to(a)) for p in sorted(a.rglob("*")) if p.is_file()]
        assert not filecmp.cmpfiles(a, b, names, shallow=False)[1]
    assert Path(tmp_path / "a" / "index.json").is_file()


def test_the_ort_conversion_says_whether_it_is_deterministic_and_why_it_failed(
        digits_twice, tmp_path):
    """The .ort of both builds above is byte-identical where the converter could run without
    address-space randomisation (the second build ran with a 5,000-character variable more in
    its environment); a failing conversion is one CompileError naming the converter's
    complaint, and writes nothing."""
    from edgec.errors import CompileError
    from edgec.ort_format import convert

    first, second, root = digits_twice
    [a, b] = [next(e for e in index["entries"] if e["target"] == "android-arm64")
              for index in (first, second)]
    compiled = json.loads((root / "first" / a["artifact"] / "manifest.json").read_text())["entry"]
    if not compiled["deterministic"]:
        pytest.skip("this machine refuses personality(ADDR_NO_RANDOMIZE) (a seccomp profile)")
    assert a["hash"] == b["hash"]
    assert (root / "first" / a["artifact"] / "model.ort").read_bytes() == (
        root / "second" / b["artifact"] / "model.ort").read_bytes()
    (tmp_path / "bad.onnx").write_text("not a model")
    with pytest.raises(CompileError, match="could not convert the model to .ort: .*Protobuf"):
        convert(tmp_path / "bad.onnx", tmp_path / "bad.ort")
    assert not (tmp_path / "bad.ort").exists()
