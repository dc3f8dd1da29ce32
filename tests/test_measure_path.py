"""One measurement path: ORT sessions from the runner's ort_session only, and the latencies a
pass chooses by timed on a Device (LocalDevice, or a real sshd on loopback as the board)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgec import exits as ee
from edgec.data import preprocess
from edgec.devices import LocalDevice
from edgec.devices.ssh import SSHDevice
from edgec.errors import MeasureError
from edgec.onnx_export import export_onnx
from edgec.passes.early_exit import EarlyExitParams, cost_device, cost_plan, measure_costs
from edgec.pipeline import Context
from edgec.runner import runner
from edgec.stage_timing import StageCall, StageTimingPlan, write_images
from edgec.stages import split_segments, trace
from tests import sshd

EDGEC = Path(__file__).resolve().parent.parent / "edgec"
COST_PARAMS = EarlyExitParams(after=("conv1",), cost_repeats=20)


def test_no_module_outside_the_runner_makes_an_ort_session():
    makers = re.compile(r"\b(InferenceSession|SessionOptions)\s*\(")
    found = [f"{path.relative_to(EDGEC)}:{number}"
             for path in sorted(EDGEC.rglob("*.py")) if path != EDGEC / "runner" / "runner.py"
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if makers.search(line)]
    assert found == [], f"use edgec.runner.runner.ort_session instead: {found}"


@pytest.fixture(scope="module")
def digits_exit_graph(digits_model, digits_config):
    """The digits CNN with one linear exit head after conv1, as one early-exit ONNX graph."""
    graph = trace(digits_model)
    segments = split_segments(graph, ["conv1"])
    with torch.no_grad():
        x = torch.zeros((1, *digits_config.input.shape))
        shape = tuple(segments[0](x).shape[1:])
    torch.manual_seed(0)
    model = ee.ExitModel(segments, [ee.make_head("linear", shape, 10, 1, 0)]).eval()
    return onnx.load_from_string(export_onnx(model, digits_config.input,
                                             output_names=model.output_names()))


@pytest.fixture(scope="module")
def digits_calibration(digits_config):
    from edgec.data import load_data_config

    return load_data_config(digits_config.resolve(digits_config.data)).load("calibration")


def _context(digits_config, calibration, tmp_path, device):
    from edgec.targets import load_target

    return Context(load_target("local"), digits_config.input, calibration, tmp_path,
                   device=device)


def _well_formed(costs: ee.CostModel, exits: int) -> None:
    assert len(costs.segments) == exits + 1 and len(costs.heads) == exits
    assert all(np.isfinite(t) and t > 0 for t in costs.segments)
    assert all(np.isfinite(t) and t >= 0 for t in (*costs.heads, costs.call))
    assert costs.plain() > 0


def test_cost_model_is_timed_on_the_given_device(ssh_server, digits_exit_graph, digits_config,
                                                 digits_calibration, tmp_path):
    local = measure_costs(digits_exit_graph, 1, COST_PARAMS,
                          _context(digits_config, digits_calibration, tmp_path, LocalDevice()))
    _well_formed(local, 1)
    workdir = tmp_path / "board"
    with SSHDevice(sshd.board_config(ssh_server, workdir)) as board:
        ctx = _context(digits_config, digits_calibration, tmp_path, board)
        first = measure_costs(digits_exit_graph, 1, COST_PARAMS, ctx)
        assert board.uploads == 2  # the timing bundle and the images
        again = measure_costs(digits_exit_graph, 1, COST_PARAMS, ctx)
    _well_formed(first, 1)
    _well_formed(again, 1)
    assert board.uploads == 2  # content-hashed on the board: nothing uploaded twice
    (bundle,) = (workdir / "artifacts").iterdir()
    assert {p.name for p in bundle.iterdir()} == {
        "manifest.json", "runner.py", "uncut.onnx", "stage0.onnx", "stage1.onnx",
        "stage0-head.onnx"}
    assert len(list((workdir / "data").glob("*.npz"))) == 1


def test_a_context_without_a_device_times_on_this_machine(digits_config, tmp_path):
    assert cost_device(_context(digits_config, None, tmp_path, None)).name == "local"


def test_time_stages_reports_the_runner_statistics(digits_exit_graph, digits_config,
                                                   digits_calibration, tmp_path):
    ctx = _context(digits_config, digits_calibration, tmp_path, None)
    plan = cost_plan(digits_exit_graph, 1, COST_PARAMS, ctx)
    times = LocalDevice().time_stages(plan)
    assert times.device == "local" and len(times.calls_ms) == 3 and len(times.streams_ms) == 2
    for record, p25 in zip(times.result["calls"], times.calls_ms):
        samples = record["samples_ms"]
        assert len(samples) == plan.repeat
        assert record["summary"] == {**runner.latency_summary(samples),
                                     "p25_ms": runner.percentile(samples, 25)}
        assert p25 == runner.percentile(samples, 25)
    assert [len(s["samples_ms"]) for s in times.result["streams"]] == [plan.rounds] * 2
    assert [s["models"] for s in times.result["streams"]] == [["uncut.onnx"],
                                                             ["stage0.onnx", "stage1.onnx"]]


def test_cost_plan_feeds_each_stage_what_the_chain_hands_it(digits_exit_graph, digits_config,
                                                           digits_calibration, tmp_path):
    ctx = _context(digits_config, digits_calibration, tmp_path, None)
    plan = cost_plan(digits_exit_graph, 1, COST_PARAMS, ctx)
    x = preprocess(digits_calibration.images[:1], digits_config.input)
    first = runner.ort_session(plan.models["stage0.onnx"])
    feature = first.run(None, {first.get_inputs()[0].name: x})[0]
    second = runner.ort_session(plan.models["stage1.onnx"])
    assert second.get_inputs()[0].shape[1:] == list(feature.shape[1:])
    assert plan.calls[1] == StageCall("stage1.onnx", ("stage0.onnx",))
    assert plan.calls[2] == StageCall("stage0-head.onnx", ())


def test_plan_errors_name_the_problem(digits_config):
    images = np.zeros((2, 8, 8, 1), np.uint8)
    with pytest.raises(MeasureError, match="does not carry"):
        StageTimingPlan({"a.onnx": b""}, (StageCall("b.onnx"),), (), images,
                        digits_config.input.to_json())
    with pytest.raises(MeasureError, match="plain"):
        StageTimingPlan({"../a.onnx": b""}, (), (), images, digits_config.input.to_json())


def test_images_npz_bytes_depend_on_the_images_alone(tmp_path):
    images = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8, 1)
    first = write_images(images, tmp_path / "a.npz").read_bytes()
    assert write_images(images, tmp_path / "b.npz").read_bytes() == first
    with np.load(tmp_path / "a.npz") as npz:
        assert np.array_equal(npz["images"], images) and len(npz["labels"]) == 2
