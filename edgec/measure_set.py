"""Measuring many artifacts together: one runner process, interleaved windows, drift removed.

A latency measured in one window of a few seconds moves with the machine: on a shared VM one
window of a structure sits a factor 0.65-1.5 from its median, and whole rounds of windows move
together (every structure of a round slower or faster alike). Measured one process per
artifact, rounds minutes apart, that noise lands in each configuration's mean; measured
together, it can be taken out.

:func:`measure_set` writes the artifacts as a measurement set, a directory the runner reads
like an artifact (``runner.py``, each artifact under ``m0/``, ``m1/``…, and a ``manifest.json``
whose hash is the set's content hash), and has the Device run ``runner.py measure-set`` there:
``rounds`` rounds, each artifact in turn per round, loaded afresh, warmed up and timed for one
window of :class:`edgec.measure.MeasureSpec`. LocalDevice runs it in a subprocess here;
SSHDevice on the board, uploaded once and cached by content hash, under the board lock.

:func:`interleaved_levels` fits each window mean as artifact level x round factor (medians
of logarithms, so a disturbed window or round moves nothing): each artifact's level is its
latency at the machine's typical speed over the run, the round factors are the drift.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from edgec.artifact import read_manifest, seal_runner_bundle
from edgec.errors import MeasureError
from edgec.measure import Measurement, MeasureSpec

POLISH_STEPS = 20  # median polish converges in a few; this many leaves nothing to change
LOAD_ALLOWANCE_S = 20.0  # per window on the device: loading the artifact (slow under qemu)


def measure_set(device, artifact_dirs: list[Path], spec: MeasureSpec, rounds: int
                ) -> list[Measurement]:
    """One Measurement per artifact, in order: its samples are its windows' means (ms), its
    summary adds ``level_ms`` (its latency with the rounds' drift taken out), ``windows``,
    ``set_size`` and each window's p50 and p90 (``window_p50_ms``, ``window_p90_ms``)."""
    if not artifact_dirs or rounds < 1:
        raise MeasureError(f"measure_set: need at least one artifact and one round; got "
                           f"{len(artifact_dirs)} artifacts, {rounds} rounds")
    timeout_s = 120 + rounds * len(artifact_dirs) * (spec.min_time_s + LOAD_ALLOWANCE_S)
    with tempfile.TemporaryDirectory(prefix="edgec-set-") as scratch:
        bundle = write_set(artifact_dirs, Path(scratch) / "set")
        result = device.run_runner(bundle, [*spec.runner_args("measure-set"), "--rounds",
                                            str(rounds)], timeout_s)
    members = result.get("members", [])
    if len(members) != len(artifact_dirs):
        raise MeasureError(f"the runner on {device.name} measured {len(members)} artifacts of a "
                           f"set of {len(artifact_dirs)}; is its runner.py from this edgec?")
    levels = interleaved_levels([m["window_means_ms"] for m in members])
    return [Measurement(tuple(m["window_means_ms"]), result["peak_rss_mb"], m["runtime"],
                        tuple(result.get("warnings", ())),
                        {"level_ms": level, "windows": rounds, "set_size": len(members),
                         "runs": m["runs"], "window_p50_ms": m["window_p50_ms"],
                         "window_p90_ms": m["window_p90_ms"]})
            for m, level in zip(members, levels)]


def write_set(artifact_dirs: list[Path], directory: Path) -> Path:
    """The measurement set: runner.py, each artifact's files under ``m<i>/`` and a manifest
    naming the members, with their content hash."""
    directory.mkdir(parents=True)
    members = []
    for index, source in enumerate(map(Path, artifact_dirs)):
        member = f"m{index}"
        for name in [*read_manifest(source).get("files", {}), "manifest.json"]:
            (directory / member / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, directory / member / name)
        members.append(member)
    return seal_runner_bundle(directory, "measure-set", {"members": members})


def interleaved_levels(window_means: list[list[float]]) -> list[float]:
    """Each artifact's level (ms) from its window means, one per round for every artifact:
    ``log m[i][r] = level_i + drift_r`` fit by median polish, the drift's median fixed at 0."""
    means = np.asarray(window_means, dtype=float)
    if means.ndim != 2 or not (np.isfinite(means) & (means > 0)).all():
        raise MeasureError("measure-set: every artifact needs one positive window mean per round")
    logs = np.log(means)
    level, drift = np.median(logs, axis=1), np.zeros(logs.shape[1])
    for _ in range(POLISH_STEPS):
        drift = np.median(logs - level[:, None], axis=0)
        drift -= np.median(drift)
        level = np.median(logs - drift[None, :], axis=1)
    return [float(v) for v in np.exp(level)]
