"""The Device protocol shared by LocalDevice and SSHDevice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from edgec.errors import RemoteCommandError
from edgec.measure import Measurement, MeasureSpec
from edgec.stage_timing import StageTimes, StageTimingPlan


class Device(Protocol):
    """Somewhere an artifact's runner can execute."""

    name: str

    def run_runner(self, artifact_dir: Path, args: list[str], timeout_s: float) -> dict[str, Any]:
        """Run ``runner.py ARGS`` of the artifact and return its JSON output."""

    def measure(self, artifact_dir: Path, spec: MeasureSpec) -> Measurement: ...

    def evaluate(self, artifact_dir: Path, data: str, start: int = 0, count: int = 0) -> dict: ...

    def cpu(self) -> dict[str, Any]:
        """The CPU as the runner sees it: arch, model, int8 features and kernel path."""

    def time_stages(self, plan: StageTimingPlan) -> StageTimes:
        """Time a pass's candidate models here (``runner.py time-stages``, see
        edgec.stage_timing): every latency a pass chooses by comes through this."""


def parse_runner_output(stdout: str, stderr: str, device: str) -> dict[str, Any]:
    """The runner prints one JSON object as its last line; anything else is a runner crash."""
    lines = [line for line in stdout.strip().splitlines() if line.startswith("{")]
    if not lines:
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        raise RemoteCommandError(f"runner on {device} printed no result; its last errors:\n{tail}")
    return json.loads(lines[-1])


def eval_args(data: str, start: int, count: int) -> list[str]:
    return ["eval", "--data", data, "--start", str(start), "--count", str(count)]
