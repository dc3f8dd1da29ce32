"""early_exit pass, cascade backend and runner: real digits CNN and real ResNet-20 / CIFAR-10."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgec import exits as ee
from edgec.accuracy import top1, torch_logits
from edgec.artifact import Artifact
from edgec.build import BuildRequest, build, write_artifact
from edgec.config import from_dict
from edgec.data import Dataset, preprocess
from edgec.devices import LocalDevice
from edgec.errors import BudgetError, CompileError, ConfigError, PassError
from edgec.onnx_export import export_onnx
from edgec.passes.early_exit import EarlyExitParams, EarlyExitPass, costs_from_report, run_graph
from edgec.passes.fuse import FuseParams, FusePass
from edgec.passes.quantize import QuantizeParams, QuantizePass
from edgec.pipeline import Context, Pipeline, Step
from edgec.stages import auto_points, cascade_graph, split_segments, stage_graphs, trace

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits" / "model.toml"
DIGITS_EXIT = {"after": ("conv1",), "train_count": 800, "threshold_count": 400, "epochs": 3,
               "cost_repeats": 20}


@pytest.fixture(scope="module")
def digits_data(digits_config):
    from edgec.data import load_data_config

    data = load_data_config(digits_config.resolve(digits_config.data))
    return data.load("calibration"), data.load("evaluation")


def _run(model, spec, calibration, tmp_path, params, quantize=False, target=None, fold_bn=True):
    from edgec.targets import load_target

    steps = [Step(FusePass(), FuseParams(fold_bn=fold_bn)), Step(EarlyExitPass(), params)]
    if quantize:
        steps.append(Step(QuantizePass(), QuantizeParams(calibration_count=128)))
    ctx = Context(target or load_target("local"), spec, calibration, tmp_path, baseline=model)
    return Pipeline(steps).run(Artifact("torch", model), ctx)


def _deploy(artifact, config, tmp_path, evaluation):
    from edgec.targets import load_target

    directory = tmp_path / "artifact"
    directory.mkdir()
    write_artifact(artifact, config, load_target("local"), [], directory)
    npz = tmp_path / "eval.npz"
    np.savez(npz, images=evaluation.images, labels=evaluation.labels)
    return directory, npz


def _cascade(directory):
    """The artifact's own runner classes, loaded in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("artifact_runner", directory / "runner.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    files = json.loads((directory / "manifest.json").read_text())["entry"]["files"]
    return runner.load_cascade(directory, files, 1)[0]


def test_heads_train_deterministically(digits_model, digits_config, digits_data):
    calibration = digits_data[0]
    segments = split_segments(trace(digits_model), ["conv1"])
    x = torch.from_numpy(preprocess(calibration.images, digits_config.input))
    with torch.no_grad():
        features = segments[0](x).numpy().astype(np.float16)
        teacher = digits_model(x).numpy()

    def trained(seed):
        torch.manual_seed(123)  # the head's initial weights; training must not depend on more
        head = ee.make_head("mlp", features.shape[1:], 10, 2, 32)
        settings = ee.TrainSettings(epochs=2, seed=seed)
        return ee.train_head(head, features, teacher, calibration.labels, settings).state_dict()

    first, again, other = trained(0), trained(0), trained(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_thresholds_above_one_equal_the_plain_model(digits_model, digits_config, digits_data,
                                                     tmp_path):
    calibration, evaluation = digits_data
    params = EarlyExitParams(**DIGITS_EXIT, thresholds=(1.5,))
    built = _run(digits_model, digits_config.input, calibration, tmp_path, params)
    directory, _ = _deploy(built, digits_config, tmp_path, evaluation)
    cascade = _cascade(directory)
    x = preprocess(evaluation.images, digits_config.input)
    logits = cascade(x)
    with torch.no_grad():
        plain = digits_model(torch.from_numpy(x)).numpy()
    assert cascade.exits == [0, len(x)]
    assert np.array_equal(np.argmax(logits, 1), np.argmax(plain, 1))
    assert np.abs(logits - plain).max() < 1e-4


def test_thresholds_of_zero_leave_at_the_first_exit(digits_model, digits_config, digits_data,
                                                     tmp_path):
    calibration, evaluation = digits_data
    params = EarlyExitParams(**DIGITS_EXIT, thresholds=(0.0,))
    built = _run(digits_model, digits_config.input, calibration, tmp_path, params, quantize=True)
    directory, npz = _deploy(built, digits_config, tmp_path, evaluation)
    result = LocalDevice().evaluate(directory, str(npz))
    assert result["exits"] == [len(evaluation), 0]
    graph = onnx.load(str(built.payload)).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)  # int8 stages
    heads = [n for n in graph.node if n.name in built.extras["float_nodes"]]
    assert {n.op_type for n in heads} >= {"Gemm"}  # the exit head stays float
    producers = {out: n.op_type for n in graph.node for out in n.output}
    weights = [n.input[1] for n in heads if n.op_type == "Gemm"]
    assert all(producers.get(w) != "DequantizeLinear" for w in weights)
    assert built.lineage[-1].report["float_nodes"] == len(built.extras["float_nodes"])


def test_budget_zero_keeps_threshold_split_accuracy(resnet20, resnet20_config, cifar_train_slice,
                                                    tmp_path):
    params = EarlyExitParams(after=("layer2.2", "layer3.1"), budget=0.0, train_count=1200,
                             threshold_count=800, epochs=2, cost_repeats=20)
    built = _run(resnet20, resnet20_config.input, cifar_train_slice, tmp_path, params)
    report = built.lineage[-1].report
    split = report["threshold_split"]
    assert split["cascade_top1"] >= split["plain_top1"]
    assert sum(split["histogram"]) == 800
    assert split["predicted_drop_points"] <= 0.0
    assert report["expected_saving"] >= 0.0
    kept = [c["after"] for c in report["candidates"] if c["kept"]]
    assert [e["after"] for e in built.extras["cascade"]["exits"]] == kept
    assert [e["after"] for e in report["exits"]] == kept
    assert all(e["rate"] > 0 for e in report["exits"])  # a ramp that never fires is dropped


def test_stage_graphs_chain_to_the_original_logits(resnet20, resnet20_config, cifar_train_slice):
    graph = trace(resnet20)
    points = ["layer1.2", "layer2.2", "layer3.0"]
    segments = split_segments(graph, points)
    heads = [ee.make_head("linear", shape, 10, 1, 0) for shape in
             ((16, 32, 32), (32, 16, 16), (64, 8, 8))]
    model = ee.ExitModel(segments, heads).eval()
    combined = onnx.load_from_string(export_onnx(model, resnet20_config.input,
                                                 output_names=model.output_names()))
    sessions = [_session(s) for s in stage_graphs(combined, len(points))]
    images = Dataset(cifar_train_slice.images[:64], cifar_train_slice.labels[:64], "slice")
    x = preprocess(images.images, resnet20_config.input)
    for session in sessions[:-1]:
        x, _, confidence = session.run(None, {session.get_inputs()[0].name: x})
        assert confidence.shape == (64,) and np.all((confidence > 0) & (confidence <= 1))
    chained = sessions[-1].run(None, {sessions[-1].get_inputs()[0].name: x})[0]
    with torch.no_grad():
        original = resnet20(torch.from_numpy(preprocess(images.images,
                                                        resnet20_config.input))).numpy()
    assert np.abs(chained - original).max() < 1e-4
    whole = run_graph(combined, images, resnet20_config.input, len(points), features=False)[0]
    assert np.abs(whole - original).max() < 1e-4


def test_int8_stages_hand_over_uint8_channels_last_exactly(digits_model, digits_config,
                                                            digits_data, tmp_path):
    calibration, evaluation = digits_data
    params = EarlyExitParams(**DIGITS_EXIT, thresholds=(1.5,))
    built = _run(digits_model, digits_config.input, calibration, tmp_path, params, quantize=True)
    combined = onnx.load(str(built.payload))
    first, second = [_session(s) for s in stage_graphs(combined, 1)]
    x = preprocess(evaluation.images, digits_config.input)
    feature = first.run(None, {first.get_inputs()[0].name: x})[0]
    whole_feature = _session(combined).run(["feature_0"], {"input": x})[0]
    assert feature.dtype == np.uint8
    assert feature.shape == tuple(np.array(whole_feature.shape)[[0, 2, 3, 1]])  # NHWC
    chained = second.run(None, {second.get_inputs()[0].name: feature})[0]
    whole = _session(combined).run(["logits"], {"input": x})[0]
    assert np.array_equal(chained, whole)


@pytest.mark.parametrize("quantize", [False, True], ids=["fp32", "int8"])
def test_the_cascade_as_one_graph_equals_its_stages_run_in_turn(digits_model, digits_config,
                                                                 digits_data, tmp_path, quantize):
    """cascade_graph (the stages in one graph, an If per exit) gives each image the logits and
    the exit that the runner's Cascade gives running the stage graphs one by one: at mixed
    thresholds, above 1 (the plain model) and at 0 (all at the first exit)."""
    from edgec.runner import runner

    calibration, evaluation = digits_data
    params = EarlyExitParams(**{**DIGITS_EXIT, "after": ("conv1", "conv2")}, thresholds=(0.9, 0.5))
    built = _run(digits_model, digits_config.input, calibration, tmp_path, params,
                 quantize=quantize)
    stages = stage_graphs(onnx.load(str(built.payload)), 2)
    x = preprocess(evaluation.images, digits_config.input)
    for thresholds in ([0.9, 0.5], [1.5, 1.5], [0.0, 0.0]):
        graph = cascade_graph(stages, thresholds)
        onnx.checker.check_model(graph, full_check=True)
        whole = _session(graph)
        found = [whole.run(None, {"input": x[i:i + 1]}) for i in range(len(x))]
        staged = runner.Cascade([_session(s) for s in stages], thresholds)
        expected = staged(x)
        assert np.bincount([int(f[1][0]) for f in found], minlength=3).tolist() == staged.exits
        assert np.abs(np.concatenate([f[0] for f in found]) - expected).max() < 1e-5
    assert staged.exits == [len(x), 0, 0]
    with pytest.raises(CompileError, match="2 thresholds"):
        cascade_graph(stages, [0.5])


def _session(model):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_build_reports_what_the_runner_reproduces(tmp_path):
    recipe = tmp_path / "exit.toml"
    recipe.write_text('name = "exit-int8-digits"\n[[step]]\npass = "fuse"\n'
                      '[[step]]\npass = "early_exit"\nafter = ["conv1"]\nthresholds = [0.9]\n'
                      'train_count = 800\nthreshold_count = 400\nepochs = 2\ncost_repeats = 20\n'
                      '[[step]]\npass = "quantize"\ncalibration_count = 128\n')
    result = build(BuildRequest(DIGITS, "local", recipe, out=tmp_path / "out", profile=False))
    manifest = json.loads((result.directory / "manifest.json").read_text())
    assert manifest["entry"]["backend"] == "cascade"
    accuracy = manifest["accuracy"]
    assert len(accuracy["exits"]) == 2 and sum(accuracy["exits"]) == accuracy["total"]
    npz = tmp_path / "eval.npz"
    from edgec.data import load_data_config
    from edgec.model import load_model_config

    config = load_model_config(DIGITS)
    evaluation = load_data_config(config.resolve(config.data)).load("evaluation")
    np.savez(npz, images=evaluation.images, labels=evaluation.labels)
    again = LocalDevice().evaluate(result.directory, str(npz))
    assert (again["correct"], again["exits"], again["predictions_sha256"]) == (
        accuracy["correct"], accuracy["exits"], accuracy["predictions_sha256"])
    stream = LocalDevice().run_runner(result.directory, ["measure", "--data", str(npz),
                                                         "--warmup", "3", "--repeat", "500",
                                                         "--min-time", "0"])
    assert stream["exits"] == accuracy["exits"] and len(stream["samples_ms"]) == 500
    report = next(step["report"] for step in manifest["lineage"] if step["pass"] == "early_exit")
    costs, kept = costs_from_report(report)  # the cost model read back gives the report's figure
    histogram = report["threshold_split"]["histogram"]
    exit_at = np.repeat(np.arange(len(histogram)), histogram)
    assert kept == [0] and len(costs.segments) == 2
    assert costs.subset(kept).expected(exit_at, kept) == pytest.approx(report["expected_ms"],
                                                                       abs=3e-4)


def test_the_stream_check_drops_an_exit_that_does_not_pay(digits_model, digits_config,
                                                          digits_data, tmp_path):
    """A cascade whose exit never fires (threshold above 1) streams slower than the plain model
    on this machine's runner: the check measures that and drops the exit; a threshold of 0
    sends every image out at the exit (the runner's own histogram)."""
    from edgec.passes import early_exit as pass_module
    from edgec.targets import load_target

    calibration = digits_data[0]
    params = EarlyExitParams(**DIGITS_EXIT)
    ctx = Context(load_target("local"), digits_config.input, calibration, tmp_path,
                  baseline=digits_model)
    model, _ = pass_module._build(trace(digits_model), ["conv1"], params, ctx)
    deploy, data = model.deployable(), calibration.slice(0, 400)
    [always] = pass_module.stream_savings(deploy, [([0], [0.0])], data, params, ctx)
    assert always["histogram"] == [400, 0]
    combined = onnx.load_from_string(pass_module._export(deploy, params, ctx))
    outputs = run_graph(combined, data, digits_config.input, 1, features=False)
    costs = pass_module.measure_costs(combined, 1, params, ctx)
    kept, thresholds, record = pass_module.check_on_stream(
        deploy, ["conv1"], outputs, data, costs, 1.0, ([0], [1.5]), params, ctx)
    assert (kept, thresholds, record["dropped"]) == ([], [], ["conv1"])
    [check] = record["checks"]
    assert check["histogram"] == [0, 400] and check["measured_saving"] < 0
    assert check["cascade_ms"] > check["plain_ms"] > 0 and record["measured_saving"] == 0.0


def test_the_stream_check_measures_the_cascade_without_each_exit(digits_model, digits_config,
                                                                  digits_data, tmp_path):
    """Two kept exits: the check streams the cascade and, in the same rounds, the cascade
    without each exit (thresholds chosen again among the rest), and keeps the fastest that
    pays; an exit whose threshold is above 1 streams as pure overhead."""
    from edgec.passes import early_exit as pass_module
    from edgec.targets import load_target

    calibration = digits_data[0]
    params = EarlyExitParams(**{**DIGITS_EXIT, "after": ("conv1", "bn1"), "budget": 100.0})
    ctx = Context(load_target("local"), digits_config.input, calibration, tmp_path,
                  baseline=digits_model)
    points = ["conv1", "bn1"]
    model, _ = pass_module._build(trace(digits_model), points, params, ctx)
    deploy, data = model.deployable(), calibration.slice(0, 400)
    combined = onnx.load_from_string(pass_module._export(deploy, params, ctx))
    outputs = run_graph(combined, data, digits_config.input, 2, features=False)
    costs = pass_module.measure_costs(combined, 2, params, ctx)
    kept, thresholds, record = pass_module.check_on_stream(
        deploy, points, outputs, data, costs, 0.0, ([0, 1], [1.5, 0.0]), params, ctx)
    first = record["checks"][0]
    assert first["exits"] == points and first["histogram"] == [0, 400, 0]
    without = [c for c in record["checks"][1:len(points) + 1] if len(c["exits"]) < 2]
    assert without and all(set(c["exits"]) < set(points) for c in without)
    chosen = [c for c in record["checks"] if c.get("chosen")]
    if kept:  # the fastest check of its round, faster than the plain model
        [pick] = chosen
        assert (pick["exits"], pick["thresholds"]) == (
            [points[k] for k in kept], [round(t, 6) for t in thresholds])
        assert record["measured_saving"] == pick["measured_saving"] > 0
        assert set(record["dropped"]) == set(points) - set(pick["exits"])
    else:
        assert not chosen and record["measured_saving"] == 0.0
        assert all(c["measured_saving"] <= 0 for c in record["checks"])


def test_agreement_thresholds_do_not_read_labels_and_bound_the_drop(digits_model, digits_config,
                                                                    digits_data, tmp_path):
    """threshold_target = "agreement" judges every output against the final output's class:
    the same exits and thresholds with the split's labels shuffled, and the cascade's true top-1
    falls by at most the budget (a cascade loses top-1 only where it disagrees)."""
    from edgec.passes import early_exit as pass_module
    from edgec.targets import load_target

    calibration = digits_data[0]
    params = EarlyExitParams(**{**DIGITS_EXIT, "threshold_target": "agreement", "budget": 2.0,
                                "epochs": 20, "lr": 0.01})  # a head that is sure of some images
    ctx = Context(load_target("local"), digits_config.input, calibration, tmp_path,
                  baseline=digits_model)
    model, _ = pass_module._build(trace(digits_model), ["conv1"], params, ctx)
    pass_module._train_heads(model, calibration.slice(0, 800), params.epochs, params, ctx)
    data = calibration.slice(800, 1200)
    combined = onnx.load_from_string(pass_module._export(model.deployable(), params, ctx))
    outputs = run_graph(combined, data, digits_config.input, 1, features=False)
    costs = ee.CostModel(segments=(0.01, 0.03), heads=(0.001,), call=0.001)
    shuffled = Dataset(data.images, np.random.default_rng(0).permutation(data.labels), "shuffled")
    choices = []
    for split in (data, shuffled):
        judged = pass_module.threshold_targets(split, outputs[0], "agreement")
        assert (judged.labels == outputs[0].argmax(1)).all() and "agreement" in judged.origin
        choices.append(pass_module._choose(outputs, judged.labels, costs, 1.0, params))  # 100 %
    assert choices[0] == choices[1]
    kept, thresholds = choices[0]
    assert kept == [0] and 0.0 < thresholds[0] <= 1.0  # the head is good enough to fire
    exit_at = ee.cascade_exits([ee.confidence(outputs[1])], thresholds)
    cascade = ee.cascade_correct(exit_at, [outputs[1].argmax(1) == data.labels],
                                 outputs[0].argmax(1) == data.labels)
    assert 0 < (exit_at == 0).sum() < len(data)
    assert cascade.mean() >= top1(outputs[0], data.labels) - 0.02
    by_labels = dataclasses.replace(params, threshold_target="labels")  # these read labels
    assert (pass_module._choose(outputs, data.labels, costs, top1(outputs[0], data.labels),
                                by_labels) !=
            pass_module._choose(outputs, shuffled.labels, costs,
                                top1(outputs[0], shuffled.labels), by_labels))


def test_bad_exit_point_names_the_known_blocks(digits_model, digits_config, digits_data, tmp_path):
    params = EarlyExitParams(**{**DIGITS_EXIT, "after": ("conv9",)})
    with pytest.raises(PassError, match="conv9.*known: .*conv1"):
        _run(digits_model, digits_config.input, digits_data[0], tmp_path, params)


def test_too_little_calibration_data_is_one_clear_error(digits_model, digits_config, digits_data,
                                                       tmp_path):
    params = EarlyExitParams(**{**DIGITS_EXIT, "train_count": 5000})
    with pytest.raises(PassError, match="train_count \\+ threshold_count = 5400"):
        _run(digits_model, digits_config.input, digits_data[0], tmp_path, params)


@pytest.mark.parametrize("table, message", [
    ({"head": "resnet"}, "head 'resnet' unknown"),
    ({"after": "everywhere"}, "block names or 'auto'"),
    ({"budget": -1}, "budget -1"),
    ({"cost_precision": "int4"}, "cost_precision 'int4'"),
    ({"finetune_cost_view": "rotated"}, "finetune_cost_view 'rotated'"),
    ({"finetune_heads": -1}, "finetune_heads = -1 must be >= 0"),
    ({"refit_epochs": -2}, "refit_epochs = -2 must be >= 0"),
    ({"threshold_target": "teacher"}, "threshold_target 'teacher'"),
    ({"tresholds": [0.9]}, "did you mean 'thresholds'"),
])
def test_params_errors(table, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(EarlyExitParams, table, "recipe.toml step 2 (early_exit)")


def test_auto_candidates_are_every_block_but_the_last(resnet20):
    assert auto_points(trace(resnet20)) == [f"layer{s}.{b}" for s in (1, 2, 3)
                                                  for b in range(3)][:-1]


def _synthetic_exits(seed=0, n=4000):
    """Labels, a final output right on 95 %, and three exits right on 60, 80 and 93 % whose
    confidence is high exactly when they are right (so they can leave early at no cost)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)

    def logits(accuracy):
        right = rng.random(n) < accuracy
        guess = np.where(right, labels, (labels + 1 + rng.integers(0, 9, n)) % 10)
        z = rng.normal(0, 0.1, (n, 10)).astype(np.float32)
        z[np.arange(n), guess] += np.where(right, 8.0, 1.0)
        return z

    return labels, logits(0.95), [logits(a) for a in (0.6, 0.8, 0.93)]


def test_exit_selection_keeps_the_exits_that_pay():
    labels, final, exits = _synthetic_exits()
    costs = ee.CostModel(segments=(1.0, 1.0, 1.0, 1.0), heads=(0.05, 0.05, 0.05), call=0.01)
    chosen, thresholds = ee.select_exits(exits, final, labels, costs, budget_points=1.0,
                                         max_exits=3)
    assert chosen[0] == 0 and chosen == sorted(chosen)  # the early exit saves the most
    assert all(t <= 1.0 for t in thresholds)
    only_one, _ = ee.select_exits(exits, final, labels, costs, 1.0, max_exits=1)
    assert only_one == [0]
    expensive = ee.CostModel(segments=(1.0, 1.0, 1.0, 1.0), heads=(5.0, 5.0, 5.0), call=0.01)
    assert ee.select_exits(exits, final, labels, expensive, 1.0, 3) == ([], [])


def test_cost_subset_merges_the_segments_between_kept_exits():
    costs = ee.CostModel(segments=(1.0, 2.0, 3.0, 4.0), heads=(0.1, 0.2, 0.3), call=0.5)
    assert costs.subset([1]) == ee.CostModel(segments=(3.0, 7.0), heads=(0.2,), call=0.5)
    assert costs.subset([]).plain() == costs.plain()


def test_joint_finetune_runs_within_its_budget(digits_model, digits_config, digits_data, tmp_path):
    before = {k: v.clone() for k, v in digits_model.state_dict().items()}
    params = EarlyExitParams(**DIGITS_EXIT, thresholds=(0.95,), finetune_epochs=0.5,
                             finetune_seconds=30)
    built = _run(digits_model, digits_config.input, digits_data[0], tmp_path, params)
    done = built.lineage[-1].report["finetune"]
    # half of 800 images at batch 128: ceil(0.5 * 7) = 4 steps
    assert done["steps"] == 4 and done["stopped_by"] == "epochs" and done["seconds"] <= 31
    after = digits_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the input model is untouched


def test_joint_finetune_spends_the_same_budget(digits_model, digits_config, digits_data,
                                               tmp_path):
    settings = {**DIGITS_EXIT, "finetune_epochs": 1.0, "budget": 5.0}
    (tmp_path / "gentle").mkdir()
    (tmp_path / "harsh").mkdir()
    built = _run(digits_model, digits_config.input, digits_data[0], tmp_path / "gentle",
                 EarlyExitParams(**settings, finetune_lr=1e-4))
    split = built.lineage[-1].report["threshold_split"]
    choice = digits_data[0].slice(800, 1200)
    assert split["reference_top1"] == top1(torch_logits(digits_model, choice,
                                                        digits_config.input), choice.labels)
    assert split["cascade_top1"] >= split["reference_top1"] - 0.05
    with pytest.raises(BudgetError, match="joint fine-tuning alone cost the final output"):
        _run(digits_model, digits_config.input, digits_data[0], tmp_path / "harsh",
             EarlyExitParams(**settings, finetune_lr=20.0))


def test_finetune_cost_counts_in_the_chosen_view(digits_model, digits_config, digits_data,
                                                tmp_path):
    settings = {**DIGITS_EXIT, "finetune_epochs": 1.0, "budget": 5.0,
                "finetune_cost_view": "shifted"}
    built = _run(digits_model, digits_config.input, digits_data[0], tmp_path,
                 EarlyExitParams(**settings, finetune_lr=1e-4))
    report = built.lineage[-1].report
    split, finetune = report["threshold_split"], report["finetune"]
    assert finetune["cost_view"] == "shifted" and finetune["cost_points"] <= 5.0
    # the budget counts from the fine-tuned final output plus what the fine-tune cost it
    assert split["reference_top1"] == pytest.approx(split["plain_top1"]
                                                    + max(finetune["cost_points"], 0) / 100,
                                                    abs=1e-5)  # cost_points has 3 decimals
    assert split["cascade_top1"] >= split["reference_top1"] - 0.05 - 1e-9


def test_finetune_heads_keeps_the_promising_candidates(digits_model, digits_config, digits_data,
                                                       tmp_path):
    settings = {**DIGITS_EXIT, "after": ("conv1", "conv2"), "finetune_epochs": 0.5,
                "budget": 5.0, "finetune_heads": 1}
    built = _run(digits_model, digits_config.input, digits_data[0], tmp_path,
                 EarlyExitParams(**settings), fold_bn=False)
    report = built.lineage[-1].report
    assert [c["after"] for c in report["candidates"]] == ["conv2"]  # past the first stage
    assert report["finetune"]["steps"] > 0


def test_refit_trains_fresh_heads_on_the_finetuned_features(digits_model, digits_config,
                                                            digits_data, tmp_path):
    settings = {**DIGITS_EXIT, "thresholds": (0.95,), "finetune_epochs": 0.5}
    runs = {}
    for refit in (0, 2):
        (tmp_path / str(refit)).mkdir()
        built = _run(digits_model, digits_config.input, digits_data[0], tmp_path / str(refit),
                     EarlyExitParams(**settings, refit_epochs=refit))
        graph = onnx.load(str(built.payload))
        runs[refit] = (built.lineage[-1].report, {i.name: onnx.numpy_helper.to_array(i)
                                                  for i in graph.graph.initializer})
    (plain, plain_weights), (refit, refit_weights) = runs[0], runs[2]
    assert plain["refit"] == {} and refit["refit"]["epochs"] == 2
    assert refit["refit"]["images"] == 800  # every training image, not only cache_count
    heads = [name for name in plain_weights if "heads" in name]
    assert heads and all(not np.array_equal(plain_weights[n], refit_weights[n]) for n in heads)
    backbone = [name for name in plain_weights if "heads" not in name]
    assert all(np.array_equal(plain_weights[n], refit_weights[n]) for n in backbone)


def test_backbone_finetuned_with_batchnorm_deploys_folded(digits_model, digits_config,
                                                          digits_data, tmp_path):
    settings = {**DIGITS_EXIT, "after": ("bn1",)}  # conv1 and bn1 in one stage: foldable
    params = EarlyExitParams(**settings, thresholds=(0.95,), finetune_epochs=0.5)
    built = _run(digits_model, digits_config.input, digits_data[0], tmp_path, params,
                 fold_bn=False)
    ops = {node.op_type for node in onnx.load(str(built.payload)).graph.node}
    assert "Conv" in ops and "BatchNormalization" not in ops


def test_cut_inside_a_residual_block_is_refused(resnet20):
    with pytest.raises(PassError, match="cannot cut after layer1.0.conv1.*skip connection"):
        split_segments(trace(resnet20), ["layer1.0.conv1"])
    with pytest.raises(PassError, match="not in execution order"):
        split_segments(trace(resnet20), ["layer2.2", "layer1.2"])
