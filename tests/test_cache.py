"""The step cache: content keys that miss on any keyed change, hits that run no pass, entries
that are whole or absent, and the evaluation/measurement caches of a build."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgec import cache as cache_module
from edgec.accuracy import onnx_logits
from edgec.artifact import Artifact
from edgec.cache import Cache
from edgec.data import load_data_config
from edgec.passes.export import ExportParams, ExportPass
from edgec.passes.fuse import FuseParams, FusePass
from edgec.passes.prune import PruneParams, PrunePass
from edgec.passes.quantize import QuantizeParams, QuantizePass
from edgec.pipeline import Context, Pipeline, Step
from edgec.targets import load_target
from tests.conftest import EXAMPLES


@pytest.fixture(scope="module")
def digits_data():
    config = load_data_config(EXAMPLES / "digits" / "data.toml")
    return config.load("calibration"), config.load("evaluation")


def _pipeline(prune: bool = False, per_channel: bool = True, opset: int = 17) -> Pipeline:
    steps = [Step(FusePass(), FuseParams(verify=False)), Step(ExportPass(), ExportParams(opset)),
             Step(QuantizePass(), QuantizeParams(per_channel=per_channel, calibration_count=64))]
    if prune:
        steps.insert(0, Step(PrunePass(), PruneParams(ratio=0.5, finetune_epochs=0.0)))
    return Pipeline(steps, "cache-test")


def _ctx(tmp_path, digits_config, data, cache, **changes) -> Context:
    calibration, evaluation = data
    ctx = Context(load_target("local"), digits_config.input, calibration, tmp_path,
                  evaluation=evaluation, cache=cache)
    return replace(ctx, **changes)


def _statuses(artifact: Artifact) -> list[str]:
    return [step.cache for step in artifact.lineage]


def _never_runs(self, artifact, params, ctx):
    raise AssertionError(f"{self.name} ran although its output is cached")


def test_second_run_executes_no_pass(tmp_path, digits_model, digits_config, digits_data,
                                     monkeypatch):
    cache = Cache(tmp_path / "cache")
    source = Artifact("torch", digits_model)
    first = _pipeline().run(source, _ctx(tmp_path, digits_config, digits_data, cache))
    assert _statuses(first) == ["run", "run", "run"]
    for pass_ in (FusePass, ExportPass, QuantizePass):
        monkeypatch.setattr(pass_, "run", _never_runs)
    second = _pipeline().run(source, _ctx(tmp_path, digits_config, digits_data, cache))
    assert _statuses(second) == ["hit", "hit", "hit"]
    assert Path(first.payload).read_bytes() == Path(second.payload).read_bytes()
    assert second.extras == first.extras
    assert [s.report for s in second.lineage] == [s.report for s in first.lineage]


def test_changed_params_reuse_the_prefix(tmp_path, digits_model, digits_config, digits_data,
                                         monkeypatch):
    cache = Cache(tmp_path / "cache")
    source = Artifact("torch", digits_model)
    _pipeline().run(source, _ctx(tmp_path, digits_config, digits_data, cache))
    monkeypatch.setattr(FusePass, "run", _never_runs)
    monkeypatch.setattr(ExportPass, "run", _never_runs)
    changed = _pipeline(per_channel=False).run(source, _ctx(tmp_path, digits_config,
                                                            digits_data, cache))
    assert _statuses(changed) == ["hit", "hit", "run"]
    assert changed.lineage[-1].params["per_channel"] is False


@pytest.mark.parametrize("change", ["params", "target", "data", "seed", "version", "model"])
def test_any_keyed_input_misses(change, tmp_path, digits_model, digits_config, digits_data,
                                monkeypatch):
    cache = Cache(tmp_path / "cache")
    source = Artifact("torch", digits_model)
    baseline = _ctx(tmp_path, digits_config, digits_data, cache)
    _pipeline().run(source, baseline)
    pipeline, ctx = _pipeline(), baseline
    if change == "params":
        pipeline = pipeline.with_overrides({"quantize.calibration_count": 32})
    elif change == "target":
        ctx = replace(ctx, target=load_target("rpi4"))
    elif change == "data":
        calibration, evaluation = digits_data
        ctx = replace(ctx, calibration=calibration.slice(0, len(calibration) - 1))
    elif change == "seed":
        ctx = replace(ctx, seed=1)
    elif change == "version":
        real = cache_module.library_versions()
        monkeypatch.setattr("edgec.step_outputs.library_versions",
                            lambda: {**real, "onnxruntime": "0.0.0"})
    elif change == "model":
        import copy

        import torch

        model = copy.deepcopy(digits_model)
        with torch.no_grad():
            model.fc.bias[0] += 1e-3
        source = Artifact("torch", model)
    rerun = pipeline.run(source, ctx)
    # the quantize step reads the whole target; fuse and export read no target field
    expected = {"params": ["hit", "hit", "run"], "target": ["hit", "hit", "run"]}
    assert _statuses(rerun) == expected.get(change, ["run", "run", "run"])


def test_pruned_output_restores_from_widths(tmp_path, digits_model, digits_config, digits_data):
    """prune's output is stored as widths and weights; fuse (an FX rewrite, not stored) is
    re-run on it when a later step misses, and the result equals an uncached build's."""
    cache = Cache(tmp_path / "cache")
    source = Artifact("torch", digits_model)
    ctx = _ctx(tmp_path, digits_config, digits_data, cache)
    _pipeline(prune=True).run(source, ctx)
    changed = _pipeline(prune=True, opset=18)
    cached = changed.run(source, ctx)
    assert _statuses(cached) == ["hit", "re-run", "run", "run"]
    fresh = changed.run(source, replace(ctx, cache=None))
    images = digits_data[1]
    np.testing.assert_array_equal(onnx_logits(cached.payload, images, digits_config.input),
                                  onnx_logits(fresh.payload, images, digits_config.input))
    assert cached.lineage[0].report["widths"] == fresh.lineage[0].report["widths"]


def test_corrupt_entries_are_misses(tmp_path):
    cache = Cache(tmp_path)
    payload = tmp_path / "model.onnx"
    payload.write_bytes(b"abc")
    cache.store("steps", "ab" * 32, {"value": 1}, {"model.onnx": payload})
    entry = cache.load("steps", "ab" * 32)
    assert entry.meta["value"] == 1 and entry.file("model.onnx").read_bytes() == b"abc"
    entry.file("model.onnx").write_bytes(b"abd")  # a file that no longer matches its digest
    assert cache.load("steps", "ab" * 32) is None
    assert not (tmp_path / "steps" / "ab" / ("ab" * 32)).exists()
    cache.store_json("evaluations", "cd" * 32, {"top1": 0.5})
    (tmp_path / "evaluations" / "cd" / ("cd" * 32) / "entry.json").write_text("{not json")
    assert cache.load_json("evaluations", "cd" * 32) is None
    cache.store_json("evaluations", "cd" * 32, {"top1": 0.5})
    assert cache.load_json("evaluations", "cd" * 32) == {"top1": 0.5}
    leftovers = [p for p in tmp_path.rglob(".*") if p.is_dir()]
    assert leftovers == []  # nothing half-written stays behind


def test_disabled_cache_neither_reads_nor_writes(tmp_path):
    cache = Cache(tmp_path, enabled=False)
    cache.store_json("measurements", "ef" * 32, {"x": 1})
    assert cache.load_json("measurements", "ef" * 32) is None
    assert not any(tmp_path.iterdir())


def test_cache_info_and_clear_cli(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from edgec.cli import app

    monkeypatch.setenv("EDGEC_CACHE", str(tmp_path))
    Cache().store_json("evaluations", "12" * 32, {"top1": 0.9})
    runner = CliRunner()
    shown = runner.invoke(app, ["cache", "info"], terminal_width=120)
    assert shown.exit_code == 0 and str(tmp_path) in shown.output
    assert "evaluations" in shown.output and "│       1 │" in shown.output
    cleared = runner.invoke(app, ["cache", "clear", "--kind", "evaluations"])
    assert cleared.exit_code == 0 and "removed 1 entries" in cleared.output
    assert Cache().info()["evaluations"]["entries"] == 0
    wrong = runner.invoke(app, ["cache", "clear", "--kind", "bogus"])
    assert wrong.exit_code == 1 and "unknown cache kind 'bogus'" in wrong.output


def test_build_twice_hits_steps_evaluations_and_measurements(tmp_path, monkeypatch):
    from edgec.build import BuildRequest, build
    from edgec.measure import MeasureSpec

    monkeypatch.setenv("EDGEC_CACHE", str(tmp_path / "cache"))
    request = BuildRequest(model=EXAMPLES / "digits" / "model.toml", target="local",
                           recipe="int8", out=tmp_path / "out",
                           measure=MeasureSpec(repeat=20, min_time_s=0.05))
    first = build(request)
    messages = []
    second = build(request, messages.append)
    assert [s["cache"] for s in second.manifest["lineage"]] == ["hit", "hit", "hit"]
    assert any("pass quantize: cache hit" in m for m in messages)
    assert second.manifest["hash"] == first.manifest["hash"]
    assert second.manifest["accuracy"] == first.manifest["accuracy"]
    profile = json.loads((second.directory / "profile.json").read_text())
    assert profile["from_cache"] is True and profile["mean_ms"] == first.rows[1].latency.mean
    uncached = build(replace(request, cache=False, out=tmp_path / "fresh"))
    assert all("cache" not in step for step in uncached.manifest["lineage"])


def test_a_pass_is_keyed_on_the_target_fields_it_reads(tmp_path, digits_model, digits_config,
                                                       digits_data):
    """prune reads only the target's channel_multiple; fuse and export read no field; quantize
    reads the whole target."""
    cache = Cache(tmp_path / "cache")
    source = Artifact("torch", digits_model)
    ctx = _ctx(tmp_path, digits_config, digits_data, cache)
    _pipeline(prune=True).run(source, ctx)
    renamed = replace(ctx, target=replace(ctx.target, name="local-renamed"))
    assert _statuses(_pipeline(prune=True).run(source, renamed)) == ["hit", "hit", "hit", "run"]
    wider = replace(ctx, target=replace(ctx.target, channel_multiple=16))
    assert _statuses(_pipeline(prune=True).run(source, wider)) == ["run", "run", "run", "run"]
