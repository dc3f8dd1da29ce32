"""The latency model (edgec.latency): features of real artifacts, fitting, its JSON, its CLI.

Feature extraction runs on real artifacts built from the digits example (fp32, int8, mixed
int4/int8 and a 30 %-pruned int8 one, built once per module without profiling). The fitting
tests use samples whose feature tables are those real tables with every layer's MACs, bytes and
channels scaled by a width factor, and whose latencies come from a known formula with noise:
they test the fitting, choice, export and file machinery, not how well edgec predicts a board
(that acceptance runs on measured ResNet configurations).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from edgec.errors import ConfigError, DataError, ModelError
from edgec.latency import (
    LatencyKey,
    LatencySample,
    artifact_features,
    evaluate,
    fit,
    layer_table_from_onnx,
    layer_table_from_torch,
    load,
    samples_from_profiles,
    save,
    select_model,
)
from edgec.latency.features import (
    FEATURES_FORMAT,
    KINDS,
    aggregate,
    aggregate_names,
    kind_group,
)
from edgec.latency.fit import boosted_estimator, export_estimator
from edgec.latency.model import (
    MODEL_FORMAT,
    BoostedModel,
    Tree,
    column_matrix,
    configuration_id,
    profile_set_digest,
)
from tests.conftest import EXAMPLES, ROOT

DIGITS = EXAMPLES / "digits" / "model.toml"
KEY = LatencyKey("local", "onnxruntime", "onnxruntime=1.31.1", 1, "performance")
BUILDS = {
    "fp32": ("fp32", {}),
    "int8": ("int8", {}),
    "mixed": ("mixed", {"quantize.holdout_count": 300}),
    "pruned": (ROOT / "passes" / "prune-int8.toml",
               {"prune.ratio": 0.3, "prune.finetune_epochs": 0.0, "prune.budget_points": None,
                "prune.holdout": 200, "budget.holdout": 200, "budget.points": 100.0,
                "budget.view": "plain"}),
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Directories of four real digits artifacts (onnxruntime backend, not profiled)."""
    from edgec.build import BuildRequest, build

    out = tmp_path_factory.mktemp("latency-builds")
    return {name: build(BuildRequest(DIGITS, "local", recipe, out=out / name, profile=False,
                                     overrides=overrides)).directory
            for name, (recipe, overrides) in BUILDS.items()}


@pytest.fixture(scope="module")
def tables(artifacts):
    return {name: artifact_features(directory) for name, directory in artifacts.items()}


# --- features of real artifacts ----------------------------------------------------------------


def test_features_read_precision_kind_and_cost_from_the_onnx_files(artifacts, tables):
    from edgec.analysis import onnx_layer_costs

    precisions = {name: [row["precision"] for row in f["layers"]] for name, f in tables.items()}
    assert precisions["fp32"] == ["fp32"] * 3 and precisions["int8"] == ["int8"] * 3
    assert precisions["mixed"][0] == "int8" and "int4" in precisions["mixed"]  # HAWQ: 2 at 4 bits
    assert [row["kind"] for row in tables["int8"]["layers"]] == ["conv3x3", "conv3x3", "gemm"]
    assert [row["stride"] for row in tables["int8"]["layers"]] == [[1, 1], [2, 2], []]
    costs = onnx_layer_costs(artifacts["int8"] / "model.onnx")
    assert [row["macs"] for row in tables["int8"]["layers"]] == [c.macs for c in costs]
    for fp32, int8, cost in zip(tables["fp32"]["layers"], tables["int8"]["layers"], costs):
        assert fp32["weight_bytes"] == 4 * cost.weight_elements == 4 * int8["weight_bytes"]
        assert int8["activation_bytes"] == cost.input_elements + cost.output_elements
    mixed4 = [r for r in tables["mixed"]["layers"] if r["precision"] == "int4"]
    assert all(r["weight_bytes"] * 2 == r["in_channels"] * r["out_channels"]
               * max(1, np.prod(r["kernel"])) for r in mixed4)
    pruned, full = tables["pruned"]["layers"][0], tables["int8"]["layers"][0]
    assert pruned["out_channels"] < full["out_channels"] and tables["pruned"]["macs"] < \
        tables["int8"]["macs"]
    manifest = json.loads((artifacts["int8"] / "manifest.json").read_text())
    quantize = next(step for step in manifest["lineage"] if step["pass"] == "quantize")
    scheme = quantize["report"]["int8_scheme"]["scheme"]  # this CPU's: u8s8, s8s8-symmetric...
    assert {row["arithmetic"] for row in tables["int8"]["layers"]} == {scheme[:4]}
    assert {row["per_channel"] for row in tables["int8"]["layers"]} == \
        {quantize["params"]["per_channel"]}
    assert {row["arithmetic"] for row in tables["fp32"]["layers"]} == {"fp32"}
    assert not any(row["per_channel"] for row in tables["fp32"]["layers"])
    assert all(isinstance(row["activation_zero_point"], int) for row in tables["int8"]["layers"])
    assert not any("activation_zero_point" in row for row in tables["fp32"]["layers"])
    assert tables["int8"]["size_bytes"] == manifest["size_bytes"]
    assert tables["int8"]["backend"] == "onnxruntime" and tables["int8"]["stages"] == 1
    assert json.loads(json.dumps(tables["mixed"])) == tables["mixed"]  # JSON-able as is
    assert artifact_features(artifacts["int8"], threads=3)["threads"] == 3


def test_int8_macs_count_by_their_activations_zero_point(tmp_path):
    """s8s8 with asymmetric activations (zero point -128 after a ReLU) and with symmetric ones
    (zero point 0) have the same arithmetic but not the same kernels (1.7x apart on the
    emulated arm64 board): the zero point read from each DequantizeLinear tells them apart."""
    from edgec.build import BuildRequest, build
    from edgec.latency.features import ZERO_POINT_COLUMNS, aggregate

    found = {}
    for scheme in ("s8s8", "s8s8-symmetric"):
        directory = build(BuildRequest(DIGITS, "local", "int8", out=tmp_path / scheme,
                                       profile=False,
                                       overrides={"quantize.scheme": scheme})).directory
        found[scheme] = artifact_features(directory)
    zero, nonzero = ZERO_POINT_COLUMNS
    assert {row["arithmetic"] for f in found.values() for row in f["layers"]} == {"s8s8"}
    assert {row["activation_zero_point"] for row in found["s8s8-symmetric"]["layers"]} == {0}
    assert all(row["activation_zero_point"] != 0 for row in found["s8s8"]["layers"])
    macs = found["s8s8"]["macs"]
    assert (aggregate(found["s8s8"])[zero], aggregate(found["s8s8"])[nonzero]) == (0, macs)
    assert aggregate(found["s8s8-symmetric"])[zero] == found["s8s8-symmetric"]["macs"]


def test_torch_layer_table_matches_the_exported_onnx_one(artifacts):
    from edgec.model import load_model_config, load_torch_model

    config = load_model_config(DIGITS)
    torch_table = layer_table_from_torch(load_torch_model(config), config.input)
    onnx_table = layer_table_from_onnx(artifacts["fp32"] / "model.onnx")
    strip = [{k: v for k, v in row.items() if k != "name"} for row in torch_table]
    assert strip == [{k: v for k, v in row.items() if k != "name"} for row in onnx_table]
    int8 = layer_table_from_torch(load_torch_model(config), config.input, precision="int8")
    assert [r["bytes"] for r in int8] == [r["bytes"] / 4 for r in torch_table]
    by_name = layer_table_from_torch(load_torch_model(config), config.input,
                                     precision={"conv2": "int4"})
    assert [r["precision"] for r in by_name] == ["fp32", "int4", "fp32"]


def test_an_artifact_without_onnx_needs_the_manifest_layer_table(artifacts, tmp_path):
    directory = tmp_path / "pte"
    shutil.copytree(artifacts["int8"], directory)
    (directory / "model.onnx").unlink()
    (directory / "model.pte").write_bytes(b"not parsed here")
    manifest = json.loads((directory / "manifest.json").read_text())
    stored = manifest.pop("layers")  # the build stores the table; an older artifact has none
    assert stored == layer_table_from_onnx(artifacts["int8"] / "model.onnx")
    manifest["entry"] = {"backend": "executorch", "files": ["model.pte"]}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=r"pte.*executorch backend: model\.pte.*'layers'"):
        artifact_features(directory)
    layers = layer_table_from_onnx(artifacts["int8"] / "model.onnx")
    (directory / "manifest.json").write_text(json.dumps({**manifest, "layers": layers}))
    features = artifact_features(directory, threads=2)
    assert features["layers"] == layers and features["backend"] == "executorch"
    with pytest.raises(ModelError, match="no manifest.json"):
        artifact_features(tmp_path)


def test_cascade_stages_count_with_the_probability_that_they_run(artifacts, tmp_path):
    """A two-stage cascade of real stage files (the int8 graph twice) exiting 60 % at stage 0."""
    directory = tmp_path / "cascade"
    directory.mkdir()
    for name in ("stage0.onnx", "stage1.onnx"):
        shutil.copy(artifacts["int8"] / "model.onnx", directory / name)
    (directory / "cascade.json").write_text(json.dumps({"stages": ["stage0.onnx", "stage1.onnx"]}))
    manifest = {"hash": "c", "size_bytes": 1, "entry": {"backend": "cascade", "files": [
        "cascade.json", "stage0.onnx", "stage1.onnx"]}, "lineage": [
        {"pass": "early_exit", "report": {"exits": [{"after": "layer1", "rate": 0.6}]}}]}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    features = artifact_features(directory)
    assert features["stages"] == 2 and features["exit_rates"] == [0.6]
    assert [row["stage"] for row in features["layers"]] == [0, 0, 0, 1, 1, 1]
    single = artifact_features(artifacts["int8"])
    totals = aggregate(features)
    assert totals["macs"] == pytest.approx(1.4 * single["macs"])
    assert totals["plain_macs"] == 2 * single["macs"] and totals["stage_calls"] == 1.4
    assert aggregate(artifact_features(directory, exit_rates=[1.0]))["macs"] == single["macs"]
    with pytest.raises(ModelError, match="2 stages but 2 exit rates"):
        artifact_features(directory, exit_rates=[0.5, 0.5])


# --- fitting -----------------------------------------------------------------------------------

COST = {"fp32": (4e-6, 1e-6, 0.004), "int8": (1.5e-6, 2e-6, 0.006), "int4": (2.5e-6, 3e-6, 0.008)}


def widened(features: dict, width: float) -> dict:
    """A real feature table with every layer's MACs, bytes and channels scaled by ``width``."""
    scaled = copy.deepcopy(features)
    for row in scaled["layers"]:
        row["macs"] = int(row["macs"] * width)
        row["bytes"] *= width
        row["out_channels"] = max(1, round(row["out_channels"] * width))
    scaled["macs"] = sum(row["macs"] for row in scaled["layers"])
    return scaled


def additive_latency(features: dict) -> float:
    return 0.02 + sum(COST[r["precision"]][0] * r["macs"] + COST[r["precision"]][1] * r["bytes"]
                      + COST[r["precision"]][2] for r in features["layers"])


def step_latency(features: dict) -> float:
    """Not additive: a kernel switch at 24 output channels of the first layer."""
    return 0.4 if features["layers"][0]["out_channels"] >= 24 else 0.1


def make_samples(tables, formula, widths, seed=0, noise=0.02) -> list[LatencySample]:
    rng = np.random.default_rng(seed)
    return [LatencySample(f, formula(f) * (1 + noise * rng.standard_normal()), f"synthetic {i}")
            for i, f in enumerate(widened(tables[name], w) for w in widths for name in tables)]


def test_additive_latencies_choose_the_additive_model_and_rank_held_out_ones(tables):
    train = make_samples(tables, additive_latency, np.linspace(0.5, 4.0, 8))
    model = fit(train, KEY)
    assert model.chosen == "additive" and model.configurations == 32 == model.samples
    assert model.loo["additive"]["median_ape"] < 0.04
    assert model.loo["additive"]["median_ape"] < model.loo["boosted"]["median_ape"]
    held_out = make_samples(tables, additive_latency, np.linspace(0.7, 3.7, 5), seed=1)
    report = evaluate(model, held_out)
    assert report["n"] == 20 and report["median_ape"] < 0.05 and report["within_10"] >= 0.9
    assert report["kendall_tau"] > 0.9
    assert all(c >= 0 for c in model.additive.coefficients)


def test_a_step_in_latency_chooses_the_boosted_model(tables):
    model = fit(make_samples(tables, step_latency, np.linspace(0.5, 4.0, 10), noise=0.01), KEY)
    assert model.chosen == "boosted"
    assert model.loo["boosted"]["median_ape"] < 0.05 < model.loo["additive"]["median_ape"]


def test_too_few_configurations_and_foreign_samples_are_refused(tables):
    few = make_samples({"int8": tables["int8"]}, additive_latency, [1.0, 2.0, 3.0])
    with pytest.raises(DataError, match="3 distinct configurations.*at least 4"):
        fit(few + few, KEY)
    samples = make_samples(tables, additive_latency, [1.0, 2.0])
    with pytest.raises(DataError, match="threads 1 in a fit for .*2 thread"):
        fit(samples, replace(KEY, threads=2))
    model = fit(samples, KEY)  # 8 configurations: both candidates
    assert set(model.loo) == {"additive", "boosted"} and model.boosted is not None
    assert fit(samples[:6], KEY).loo["boosted"] is None  # 6: the additive one only


def test_exported_trees_reproduce_sklearn_on_raw_values_with_nan_and_infinite_thresholds():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((120, 5))
    x[rng.random(x.shape) < 0.15] = np.nan  # missing values: missing_go_to_left, inf thresholds
    y = np.nan_to_num(x[:, 0]) * 2 + np.isnan(x[:, 1]) + rng.standard_normal(120) * 0.1
    estimator = boosted_estimator(x, y)
    exported = export_estimator(estimator, tuple(f"c{i}" for i in range(5)))
    loaded = BoostedModel.from_json(json.loads(json.dumps(exported.to_json(), allow_nan=False)))
    on_edges = np.repeat(np.nan_to_num(x[:1]), 2 * len(exported.trees), axis=0)
    for i, tree in enumerate(exported.trees):  # values exactly on a split threshold go left
        split = np.flatnonzero(~tree.is_leaf & np.isfinite(tree.num_threshold))[0]
        on_edges[2 * i:2 * i + 2, tree.feature_idx[split]] = tree.num_threshold[split]
        on_edges[2 * i + 1] = np.nextafter(on_edges[2 * i + 1], np.inf)
    fresh = np.vstack([x, rng.standard_normal((50, 5)), on_edges])
    fresh[120:130, 2] = np.nan
    expected = estimator.predict(fresh)
    for model in (exported, loaded):
        assert np.allclose(model.raw_predict(fresh), expected, rtol=1e-9, atol=0)
    thresholds = [t for tree in exported.trees for t in tree.num_threshold]
    assert any(np.isinf(thresholds)) and any(bool(t.missing_go_to_left.any()) for t in
                                             exported.trees)


def test_exported_trees_reproduce_sklearn_on_the_training_samples(tables):
    samples = make_samples(tables, step_latency, np.linspace(0.5, 4.0, 10))
    x = column_matrix([aggregate(s.features) for s in samples], aggregate_names())
    estimator = boosted_estimator(x, np.log([s.latency_ms for s in samples]))
    exported = export_estimator(estimator, aggregate_names())
    assert np.allclose(exported.raw_predict(x), estimator.predict(x), rtol=1e-9, atol=0)
    assert isinstance(exported.trees[0], Tree) and len(exported.trees) == estimator.n_iter_


# --- the JSON file -----------------------------------------------------------------------------


def test_the_json_file_is_versioned_by_its_profile_set_and_written_atomically(tables, tmp_path):
    samples = make_samples(tables, additive_latency, np.linspace(0.5, 3.0, 3))
    model = fit(samples, KEY)
    path = save(tmp_path / "latency" / "local.json", [model])
    assert sorted(p.name for p in path.parent.iterdir()) == ["local.json"]  # no temp file left
    data = json.loads(path.read_text())
    entry = data["models"][0]
    assert data["format"] == MODEL_FORMAT and entry["samples"] == 12 and entry["key"] == KEY.to_json()
    assert entry["profile_set"] == profile_set_digest(samples[::-1]) != \
        profile_set_digest(samples[1:])
    loaded = load(path)[0]
    assert loaded.predict(samples[0].features, KEY) == model.predict(samples[0].features, KEY)
    path.write_text(json.dumps({"format": 1, "models": [{**entry, "format": 99}]}))
    with pytest.raises(ConfigError, match="format 99.*edgec latency fit"):
        load(path)


BLOCKED = """
import json, sys
BLOCKED = {"sklearn", "scipy", "torch", "onnxruntime", "onnx", "threadpoolctl"}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
from edgec.latency.model import load
features = json.load(open(sys.argv[2]))
print(json.dumps({"predictions": [m.predict(features, m.key) for m in load(sys.argv[1])],
                  "loaded": sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)}))
"""


def test_a_saved_model_loads_and_predicts_with_numpy_only(tables, tmp_path):
    model = fit(make_samples(tables, step_latency, np.linspace(0.5, 4.0, 10)), KEY)
    other = "additive" if model.chosen == "boosted" else "boosted"
    models = [model, replace(model, chosen=other)]
    save(tmp_path / "m.json", models)
    features = widened(tables["mixed"], 1.7)
    (tmp_path / "f.json").write_text(json.dumps(features))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", BLOCKED, str(tmp_path / "m.json"),
                           str(tmp_path / "f.json")], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["loaded"] == []
    expected = [m.predict(features, KEY) for m in models]
    assert result["predictions"] == pytest.approx(expected, rel=1e-12)
    assert expected[0] != pytest.approx(expected[1], rel=1e-6)  # both candidates were used


def test_a_model_refuses_another_key_and_layer_kinds_it_never_saw(tables):
    int8_only = {k: v for k, v in tables.items() if k in ("int8", "pruned")}
    model = fit(make_samples(int8_only, additive_latency, np.linspace(0.5, 3.0, 4)), KEY)
    features = tables["int8"]
    newer = replace(KEY, runtime="onnxruntime=1.32.0")
    with pytest.raises(ConfigError, match=r"runtime 'onnxruntime=1\.31\.1', not "
                                          r"'onnxruntime=1\.32\.0'.*edgec latency fit --device "
                                          r"local"):
        model.predict(features, newer)
    with pytest.raises(ConfigError, match="governor 'performance', not 'ondemand'"):
        model.predict(features, replace(KEY, governor="ondemand"))
    with pytest.raises(ConfigError, match="threads 2 given to the latency model"):
        model.predict({**features, "threads": 2}, KEY)
    with pytest.raises(DataError, match="saw no fp32 conv3x3, fp32 gemm layers"):
        model.predict(tables["fp32"], KEY)
    # which layers the mixed pass gives 4 bits depends on the sensitivities this CPU measured
    int4 = [f"int4 {kind}" for kind in KINDS
            if any(layer["arithmetic"] == "int4" and kind_group(layer["kind"]) == kind
                   for layer in tables["mixed"]["layers"])]
    assert int4 and model.unseen(tables["mixed"]) == int4
    assert select_model([model], "local", "onnxruntime", 1) is model
    with pytest.raises(ConfigError, match="no latency model for .*threads 4.*holds: device local"):
        select_model([model], "local", "onnxruntime", 4)
    with pytest.raises(ConfigError, match="2 latency models fit.*--runtime"):
        select_model([model, replace(model, key=newer)], "local", "onnxruntime", 1)


# --- the profile database ----------------------------------------------------------------------


def record(features, mean_ms, runtime="1.31.1", threads=1, **extra) -> str:
    return json.dumps({"device": "pi", "runtime": {"onnxruntime": runtime},
                       "protocol": {"threads": threads, "repeat": 50}, "summary":
                       {"mean_ms": mean_ms, "p50_ms": mean_ms * 0.9}, "features": features,
                       **extra})


def test_samples_from_profiles_group_records_by_key(tables, tmp_path):
    folder = tmp_path / "profiles" / "pi"
    folder.mkdir(parents=True)
    int8 = tables["int8"]
    (folder / "2025-01-01.jsonl").write_text("\n".join([
        record(int8, 1.5), record(int8, 1.7, governor="performance"),
        json.dumps({"device": "pi", "summary": {"mean_ms": 3.0}}),  # older: no features
        record(int8, 2.5, runtime="1.30.0"), ""]) + "\n")
    (folder / "2025-01-02.jsonl").write_text(record({**int8, "threads": 4}, 0.9, threads=4) + "\n")
    grouped = samples_from_profiles(tmp_path / "profiles", "pi")
    key = LatencyKey("pi", "onnxruntime", "onnxruntime=1.31.1", 1, "unknown")
    assert {k: [s.latency_ms for s in v] for k, v in grouped.items()} == {
        key: [1.5], replace(key, governor="performance"): [1.7],
        replace(key, runtime="onnxruntime=1.30.0"): [2.5], replace(key, threads=4): [0.9]}
    assert grouped[key][0].features == int8 and grouped[key][0].origin.endswith(
        "2025-01-01.jsonl:1")
    (folder / "2025-01-03.jsonl").write_text(record(int8, 1.0) + "\n{half a line\n")
    with pytest.raises(DataError, match=r"2025-01-03\.jsonl:2 is not a JSON record"):
        samples_from_profiles(tmp_path / "profiles", "pi")
    (folder / "2025-01-03.jsonl").write_text(record({**int8, "format": 0}, 1.0) + "\n")
    with pytest.raises(DataError, match="jsonl:1: latency features of format 0"):
        samples_from_profiles(tmp_path / "profiles", "pi")
    older = {**int8, "format": FEATURES_FORMAT - 1}  # an earlier edgec's: measured again
    (folder / "2025-01-03.jsonl").write_text(record(older, 1.0) + "\n")
    stale: list[str] = []
    again = samples_from_profiles(tmp_path / "profiles", "pi", stale)
    assert {k: [s.latency_ms for s in v] for k, v in again.items()} == \
        {k: [s.latency_ms for s in v] for k, v in grouped.items()}  # the older one left out
    assert stale == [f"{folder / '2025-01-03.jsonl'}:1"]


# --- the command line --------------------------------------------------------------------------


def test_cli_fits_every_key_of_a_device_and_predicts_an_artifact(tables, artifacts, tmp_path,
                                                                 monkeypatch):
    from typer.testing import CliRunner

    from edgec.cli import app

    folder = tmp_path / "profiles" / "pi"
    folder.mkdir(parents=True)
    lines = [record(s.features, s.latency_ms) for s in
             make_samples(tables, additive_latency, np.linspace(0.5, 4.0, 3))]
    lines.append(record(tables["int8"], 1.0, runtime="1.30.0"))  # one configuration: skipped
    (folder / "2025-01-01.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "120")
    runner = CliRunner()
    fitted = runner.invoke(app, ["latency", "fit", "--device", "pi"])
    assert fitted.exit_code == 0, fitted.output
    assert "LOO MAPE" in fitted.output and "Kendall τ" in fitted.output
    assert "12 samples, 12 configurations" in fitted.output
    assert "skipped: 1 distinct configurations" in fitted.output
    assert "wrote 1 model(s) to latency/pi.json" in fitted.output
    assert "repeatability: fewer than 2 configurations measured twice" in fitted.output
    assert [m.key.runtime for m in load(tmp_path / "latency" / "pi.json")] == [
        "onnxruntime=1.31.1"]
    predicted = runner.invoke(app, ["latency", "predict", str(artifacts["int8"]), "--device",
                                    "pi"])
    assert predicted.exit_code == 0, predicted.output
    expected = load(tmp_path / "latency" / "pi.json")[0].predict(
        tables["int8"], LatencyKey("pi", "onnxruntime", "onnxruntime=1.31.1", 1))
    assert f"{expected:.4f} ms predicted" in predicted.output
    assert "by the additive model of device pi" in predicted.output
    failed = runner.invoke(app, ["latency", "predict", str(artifacts["int8"]), "--device", "pi",
                                 "--threads", "2"])
    assert failed.exit_code == 2 and "Traceback" not in failed.output
    assert failed.output.startswith("error: ConfigError: no latency model for device pi")
    missing = runner.invoke(app, ["latency", "fit", "--device", "nobody"])
    assert missing.exit_code == 2 and "no profile of nobody" in missing.output
    held = runner.invoke(app, ["latency", "fit", "--device", "pi", "--holdout", "4"])
    assert held.exit_code == 0, held.output
    assert "8 samples, 8 configurations" in held.output  # fit without the 4 held out
    assert "held out (draw 0): 4 configurations, MAPE" in held.output and "Kendall τ" in held.output
    first_draw = (tmp_path / "latency" / "pi.json").read_text()
    drawn = runner.invoke(app, ["latency", "fit", "--device", "pi", "--holdout", "4",
                                "--draws", "3"])
    assert drawn.exit_code == 0, drawn.output
    assert "over 3 hold-out draws of 4 configurations: median error median" in drawn.output
    assert (tmp_path / "latency" / "pi.json").read_text() == first_draw  # draw 0: the model
    undrawn = runner.invoke(app, ["latency", "fit", "--device", "pi", "--draws", "2"])
    assert undrawn.exit_code == 2 and "more than 1 only with --holdout N" in undrawn.output
    too_many = runner.invoke(app, ["latency", "fit", "--device", "pi", "--holdout", "10"])
    assert too_many.exit_code == 2 and "cannot hold out 10 of 12" in too_many.output


def test_held_out_configurations_leave_with_all_their_measurements(tables):
    from edgec.latency.fit import hold_out

    samples = make_samples(tables, additive_latency, np.linspace(0.5, 4.0, 5))
    twice = samples + [replace(s, latency_ms=s.latency_ms * 1.01) for s in samples]
    train, held = hold_out(twice, 6, seed=3)
    ids = {configuration_id(s.features) for s in held}
    assert len(held) == 12 and len(ids) == 6
    assert not ids & {configuration_id(s.features) for s in train}
    assert hold_out(twice, 6, seed=3) == (train, held)  # the same draw every time


def test_repeatability_is_what_the_boards_own_measurements_pin_down(tables):
    """The floor for any model's error: the standard error of each configuration's mean, and
    alternate measurements (rounds 1, 3 against 2, 4) as predictions of each other; the
    configurations measured once do not count."""
    from edgec.latency.fit import error_metrics, repeatability

    once = make_samples(tables, additive_latency, np.linspace(0.5, 4.0, 5))
    assert repeatability(once) is None
    slowdown = np.random.default_rng(2).uniform(1.0, 1.5, (4, len(once)))
    rounds = [[replace(s, latency_ms=s.latency_ms * slowdown[r, i]) for i, s in enumerate(once)]
              for r in range(4)]
    extra = make_samples({"fp32": tables["fp32"]}, additive_latency, [9.0])  # measured once
    found = repeatability([s for samples in rounds for s in samples] + extra)
    assert found["n"] == len(once)
    se = np.median(slowdown.std(axis=0, ddof=1) / 2 / slowdown.mean(axis=0))
    assert found["mean_se"] == pytest.approx(se) and 0.01 < se < 0.2
    assert found["floor_median_ape"] == pytest.approx(0.674 * se)
    base = np.array([s.latency_ms for s in once])
    expected = error_metrics(base * slowdown[[0, 2]].mean(axis=0),
                             base * slowdown[[1, 3]].mean(axis=0))
    assert found["halves"] == pytest.approx(expected)
    ratio = slowdown[[0, 2]].mean(axis=0) / slowdown[[1, 3]].mean(axis=0)
    assert found["halves_factor"] == pytest.approx(np.median(ratio))
    assert found["halves_scaled"] == pytest.approx(error_metrics(
        base * slowdown[[0, 2]].mean(axis=0) / np.median(ratio),
        base * slowdown[[1, 3]].mean(axis=0)))
    steady = repeatability(once + once)
    assert steady["mean_se"] == 0 and steady["halves"]["kendall_tau"] == 1.0


def test_a_hold_out_draw_the_model_cannot_predict_is_left_out_with_its_reason(tables):
    """Repeated hold-out: a draw that holds out the only int8 configuration fits a model that
    never saw int8 layers, which refuses to predict it; that draw is left out, saying why, and
    the others are reported."""
    from edgec.latency.fit import held_out_draws

    fp32 = make_samples({"fp32": tables["fp32"]}, additive_latency, np.linspace(0.5, 4.0, 8))
    lone_int8 = make_samples({"int8": tables["int8"]}, additive_latency, [1.0])
    model, reports, refused = held_out_draws(fp32 + lone_int8, KEY, 2, draws=8)
    assert refused and all(" saw no " in reason and "fp32" not in reason for reason in refused)
    assert reports and len(reports) + len(refused) == 8
    assert all(r["n"] == 2 and r["repeatability"] is None for r in reports)
    assert model.configurations == 7  # the first draw's: fit without its 2


def test_sample_measures_structures_records_features_and_resumes(tmp_path):
    """`edgec latency sample` on digits: every configuration is built without training,
    measured here and recorded with its features and configuration; a second run measures
    nothing, and the records fit a model."""
    from edgec.latency.sample import SampleRequest, run_sample
    from edgec.measure import MeasureSpec
    from edgec.profiles import ProfileDB
    from tests.conftest import EXAMPLES

    request = SampleRequest((EXAMPLES / "digits" / "model.toml",), count=6, multiples=(4,),
                            measure=MeasureSpec(warmup=1, repeat=5, min_time_s=0.0),
                            profiles=tmp_path / "profiles", windows=3)
    first = run_sample(request)
    assert len(first.measured) + len(first.unbuildable) == 6 and not first.skipped
    records = ProfileDB(tmp_path / "profiles").records("local")
    assert len(records) == len(first.measured) >= 4
    for record in records:
        assert record["sample"]["scheme"] in ("fp32", "u8s8", "u8u8", "s8s8", "s8s8-symmetric")
        assert record["features"]["layers"] and record["features"]["threads"] == 1
        precisions = {layer["precision"] for layer in record["features"]["layers"]}
        assert precisions == ({"fp32"} if record["sample"]["scheme"] == "fp32" else {"int8"})
        # the kernel the scheme selects, which the precision alone does not tell
        arithmetic = {layer["arithmetic"] for layer in record["features"]["layers"]}
        assert arithmetic == {record["sample"]["scheme"][:4]}
    again = run_sample(request)
    assert not again.measured and len(again.skipped) == len(first.measured)
    twice = run_sample(replace(request, rounds=2))  # one more round: each measured once more
    assert sorted(map(str, twice.measured)) == sorted(map(str, first.measured))
    assert not run_sample(replace(request, rounds=2)).measured
    grouped = samples_from_profiles(tmp_path / "profiles", "local")
    assert sum(len(samples) for samples in grouped.values()) == 2 * len(records)


def test_sample_measures_the_structures_of_several_models_in_one_set(tmp_path):
    """With two models, each gets its configurations and all are measured in one set: every
    record says how many structures its set held."""
    from edgec.latency.sample import SampleRequest, run_sample
    from edgec.measure import MeasureSpec
    from edgec.profiles import ProfileDB
    from tests.conftest import EXAMPLES

    digits = EXAMPLES / "digits"
    twin = tmp_path / "twin.toml"
    twin.write_text((digits / "model.toml").read_text()
                    .replace('"digits-cnn"', '"digits-twin"')
                    .replace('"digits.py:', f'"{digits / "digits.py"}:')
                    .replace('"data.toml"', f'"{digits / "data.toml"}"'))
    outcome = run_sample(SampleRequest((digits / "model.toml", twin), count=3, multiples=(4,),
                                       measure=MeasureSpec(warmup=1, repeat=3, min_time_s=0.0),
                                       profiles=tmp_path / "profiles", windows=2))
    records = ProfileDB(tmp_path / "profiles").records("local")
    assert len(records) == len(outcome.measured) == 2 * 3 - len(outcome.unbuildable)
    assert {r["model"] for r in records} == {"digits-cnn", "digits-twin"}
    assert {r["summary"]["set_size"] for r in records} == {len(records)}
    assert {r["summary"]["windows"] for r in records} == {2}
    with pytest.raises(ConfigError, match="no model to sample"):
        run_sample(SampleRequest((), profiles=tmp_path / "profiles"))
    with pytest.raises(ConfigError, match="windows 0 and rounds 1 must be >= 1"):
        SampleRequest((twin,), windows=0)


def test_sample_grids_extend_and_take_backends_in_turns():
    from edgec.latency.sample import sample_configs

    ort = sample_configs(30, (8, 16), (1,))
    both = sample_configs(30, (8, 16), (1,), backends=("onnxruntime", "executorch"))
    assert [c for c in both if c.backend == "onnxruntime"] == ort  # adding a backend keeps these
    assert [c.backend for c in both[:4]] == ["onnxruntime", "executorch"] * 2
    executorch = [c for c in both if c.backend == "executorch"]
    assert {c.scheme for c in executorch} == {"s8s8"} and len(set(executorch)) == len(executorch)
    assert len(executorch) == 22  # 1 unpruned + 5 cuts x 2 multiples, per channel or not
    assert sample_configs(5, (8, 16), (1,)) == ort[:5]  # a larger n extends a smaller one
    with pytest.raises(ConfigError, match="backend 'tvm' has no sampled structures"):
        sample_configs(3, (8,), (1,), backends=("tvm",))


def test_sample_builds_executorch_structures_and_refuses_a_target_without_the_backend(tmp_path):
    """ExecuTorch configurations are PT2E-quantized .pte programs measured here; their records
    carry the layer table of the structure, in XNNPACK's arithmetic, under their own key."""
    from edgec.latency.sample import SampleRequest, run_sample
    from edgec.measure import MeasureSpec
    from edgec.profiles import ProfileDB
    from tests.conftest import EXAMPLES

    request = SampleRequest((EXAMPLES / "digits" / "model.toml",), count=2, multiples=(4,),
                            measure=MeasureSpec(warmup=1, repeat=5, min_time_s=0.0),
                            profiles=tmp_path / "profiles",
                            backends=("onnxruntime", "executorch"), windows=3)
    outcome = run_sample(request)
    built = [c for c in outcome.measured if c.backend == "executorch"]
    assert len(built) == 2 and not [c for c, _ in outcome.unbuildable if c.backend == "executorch"]
    records = [r for r in ProfileDB(tmp_path / "profiles").records("local")
               if r["sample"].get("backend") == "executorch"]
    assert len(records) == 2
    for record in records:
        assert record["features"]["backend"] == "executorch"
        assert "executorch" in record["build_versions"]
        layers = record["features"]["layers"]
        assert {layer["arithmetic"] for layer in layers} == {"s8s8"}
        assert {layer["per_channel"] for layer in layers} == {record["sample"]["per_channel"]}
    keys = {key.backend for key in samples_from_profiles(tmp_path / "profiles", "local")}
    assert keys == {"onnxruntime", "executorch"}
    with pytest.raises(ConfigError, match="target 'pynq-z2' has no backend onnxruntime"):
        run_sample(replace(request, target="pynq-z2"))
