"""Timing candidate models where they will run: what passes that choose by latency measure.

A pass describes what to time as a :class:`StageTimingPlan`: ONNX models (file name →
serialised model), the calls to time alone and the streams of models to time over images, one
image at a time, as a cascade on a board runs them. :func:`time_on` writes the plan as a
timing bundle, a directory the runner reads like an artifact (``runner.py``, the models and a
``manifest.json`` whose hash is the bundle's content hash), and the images as an npz, then has
the Device run ``runner.py time-stages`` there (``Device.time_stages``). LocalDevice runs it
in a subprocess here; SSHDevice on the board, where bundle and images are uploaded once each
and cached by content hash, under the board lock like every measurement.

The statistics are the runner's own (``latency_summary`` and ``percentile``); a pass reads a
call's lower quartile, since other work on the machine only ever adds time, and a stream's level
with the drift between rounds taken out (:func:`edgec.measure_set.interleaved_levels`: the
streams take turns round by round, so a slow spell hits every stream of its round alike).
"""

from __future__ import annotations

import io
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgec.artifact import seal_runner_bundle
from edgec.errors import MeasureError
from edgec.measure_set import interleaved_levels

MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*\.onnx$")
FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the images' npz bytes depend on the images alone


@dataclass(frozen=True)
class StageCall:
    """``model`` run alone on the input it sees when the first image runs through ``feed``."""

    model: str
    feed: tuple[str, ...] = ()


@dataclass(frozen=True)
class CascadeStream:
    """Stage models (each but the last with its head and confidence, as
    :func:`edgec.stages.stage_graphs` cuts them) run as the cascade backend runs them: an image
    leaves at the first stage whose confidence reaches its threshold."""

    models: tuple[str, ...]
    thresholds: tuple[float, ...]

    def __post_init__(self):
        if len(self.thresholds) != len(self.models) - 1:
            raise MeasureError(f"cascade stream: {len(self.models)} stages need "
                               f"{len(self.models) - 1} thresholds, got {len(self.thresholds)}")


def _stream_json(stream) -> list[str] | dict[str, Any]:
    if isinstance(stream, CascadeStream):
        return {"models": list(stream.models), "thresholds": list(stream.thresholds)}
    return list(stream)


def _stream_models(stream) -> tuple[str, ...]:
    return stream.models if isinstance(stream, CascadeStream) else tuple(stream)


@dataclass(frozen=True)
class StageTimingPlan:
    """What to time, batch 1: ``models`` (file name → serialised ONNX), ``calls`` (each timed
    ``repeat`` times after ``warmup``), ``streams`` (chains of models, each fed the previous
    one's first output, or cascades, :class:`CascadeStream`; timed per image over ``images``
    for ``rounds`` rounds after one warm-up round). ``images`` are uint8 N×H×W×C, preprocessed
    by the runner with ``input`` (the model's InputSpec as JSON)."""

    models: dict[str, bytes]
    calls: tuple[StageCall, ...]
    streams: tuple[tuple[str, ...] | CascadeStream, ...]
    images: np.ndarray
    input: dict[str, Any]
    repeat: int = 200
    rounds: int = 5
    warmup: int = 5
    threads: int = 1

    def __post_init__(self):
        bad = sorted(name for name in self.models if not MODEL_NAME.match(name))
        if bad:
            raise MeasureError(f"timing plan: model file names {bad} must be plain '*.onnx' "
                               f"names (letters, digits, '_.+-')")
        named = {c.model for c in self.calls} | {n for c in self.calls for n in c.feed} | {
            n for stream in self.streams for n in _stream_models(stream)}
        if named - set(self.models):
            raise MeasureError(f"timing plan names models {sorted(named - set(self.models))} "
                               f"it does not carry; it has {sorted(self.models)}")
        if min(self.repeat, self.rounds, self.threads, len(self.images)) < 1 or self.warmup < 0:
            raise MeasureError(f"timing plan: need repeat, rounds, threads and images >= 1 and "
                               f"warmup >= 0; got repeat {self.repeat}, rounds {self.rounds}, "
                               f"threads {self.threads}, {len(self.images)} images, warmup "
                               f"{self.warmup}")

    def timing_json(self) -> dict[str, Any]:
        """The plan as the runner reads it from the bundle's manifest (``timing``)."""
        return {"calls": [{"model": c.model, "feed": list(c.feed)} for c in self.calls],
                "streams": [_stream_json(stream) for stream in self.streams]}

    def runner_args(self, data: Path) -> list[str]:
        return ["time-stages", "--data", str(data), "--repeat", str(self.repeat), "--rounds",
                str(self.rounds), "--warmup", str(self.warmup), "--threads", str(self.threads)]


@dataclass(frozen=True)
class StageTimes:
    """Lower-quartile ms of each call, each stream's ms per image with the rounds' drift taken
    out (its level), in the plan's order, and the device that measured them; ``result``: the
    runner's whole JSON (samples, summaries)."""

    calls_ms: tuple[float, ...]
    streams_ms: tuple[float, ...]
    device: str
    result: dict[str, Any]

    @classmethod
    def from_runner(cls, result: dict[str, Any], plan: StageTimingPlan, device: str) -> StageTimes:
        calls, streams = result.get("calls", []), result.get("streams", [])
        if len(calls) != len(plan.calls) or len(streams) != len(plan.streams):
            raise MeasureError(f"the runner on {device} timed {len(calls)} calls and "
                               f"{len(streams)} streams, the plan has {len(plan.calls)} and "
                               f"{len(plan.streams)}; is its runner.py from this edgec?")
        levels = interleaved_levels([s["samples_ms"] for s in streams]) if streams else []
        return cls(tuple(c["summary"]["p25_ms"] for c in calls), tuple(levels), device, result)


def time_on(device, plan: StageTimingPlan) -> StageTimes:
    """Run ``plan`` through ``device``'s runner (``runner.py time-stages``): the one path by
    which LocalDevice and SSHDevice time stage models."""
    with tempfile.TemporaryDirectory(prefix="edgec-timing-") as scratch:
        bundle = write_bundle(plan, Path(scratch) / "bundle")
        images = write_images(plan.images, Path(scratch) / "images.npz")
        result = device.run_runner(bundle, plan.runner_args(images))
    return StageTimes.from_runner(result, plan, device.name)


def write_bundle(plan: StageTimingPlan, directory: Path) -> Path:
    """The timing bundle: runner.py, the models and a manifest with their content hash."""
    directory.mkdir(parents=True)
    for name, model in plan.models.items():
        (directory / name).write_bytes(model)
    return seal_runner_bundle(directory, "stage-timing",
                              {"input": plan.input, "timing": plan.timing_json()})


def write_images(images: np.ndarray, path: Path) -> Path:
    """``images`` (and zero labels, which the runner's reader expects) as an npz whose bytes
    depend on the images alone (np.savez stamps the time), so a board caches it by content."""
    arrays = {"images": np.ascontiguousarray(images), "labels": np.zeros(len(images), np.int64)}
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array, allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", FIXED_ZIP_TIME), buffer.getvalue())
    return path
