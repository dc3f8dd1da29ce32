"""LocalDevice: runs the artifact's runner in a subprocess on this machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgec.devices import probe
from edgec.devices.base import eval_args, parse_runner_output
from edgec.devices.probe import STATE_SCRIPT
from edgec.errors import DeviceTimeout
from edgec.measure import Measurement, MeasureSpec, condition_warnings
from edgec.stage_timing import StageTimes, StageTimingPlan, time_on


class LocalDevice:
    """This machine. The runner runs with ``threads`` pinned and passive OpenMP waits."""

    name = "local"

    def __init__(self, python: str = sys.executable):
        self.python = python

    def run_runner(self, artifact_dir: Path, args: list[str],
                   timeout_s: float = 600) -> dict[str, Any]:
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
        try:
            done = subprocess.run([self.python, str(Path(artifact_dir) / "runner.py"), *args],
                                  capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired as exc:
            raise DeviceTimeout(f"runner on local exceeded {timeout_s:.0f} s; raise the timeout "
                                f"or lower --repeat/--min-time") from exc
        return parse_runner_output(done.stdout, done.stderr, "local")

    def measure(self, artifact_dir: Path, spec: MeasureSpec) -> Measurement:
        before = self._state()
        result = self.run_runner(artifact_dir, spec.runner_args())
        return Measurement.from_runner(result, condition_warnings(before, self._state()))

    @staticmethod
    def _state() -> dict[str, Any]:
        done = subprocess.run(["sh", "-c", STATE_SCRIPT], capture_output=True, text=True)
        return probe.parse(done.stdout)

    def cpu(self) -> dict[str, Any]:
        """This machine's CPU as the runner sees it."""
        from edgec.runner.runner import cpu_info

        return cpu_info()

    def evaluate(self, artifact_dir: Path, data: str, start: int = 0, count: int = 0) -> dict:
        return self.run_runner(artifact_dir, eval_args(data, start, count))

    def time_stages(self, plan: StageTimingPlan) -> StageTimes:
        """Time ``plan``'s models with the runner in a subprocess, as a board runs it."""
        return time_on(self, plan)
