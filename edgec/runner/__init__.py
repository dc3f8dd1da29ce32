"""The runner shipped inside every artifact. ``runner.py`` needs only numpy and the runtime."""

from pathlib import Path

RUNNER_PATH = Path(__file__).with_name("runner.py")
