"""ONNX → ONNX Runtime mobile format (``.ort``), byte-identical run to run where Linux allows.

ONNX Runtime's converter orders some flatbuffer tables by the heap addresses of its graph
objects, so two conversions of one model differ in ~3 % of their bytes (all offsets) when the
address space is randomised. With randomisation off (Linux ``personality(ADDR_NO_RANDOMIZE)``,
what ``setarch -R`` does) one process's allocations land at the same addresses every run and the
output is identical. :func:`convert` therefore converts in a child process that turns
randomisation off for itself and re-executes; where that is refused (not Linux, or a seccomp
profile that denies the flag, as Docker's default does) the conversion still runs and reports
``deterministic: false``.

The addresses also depend on what the process allocated before converting, so the child starts
the same way from every parent: this file's text as ``python -I -c``, a fixed minimal
environment, run in a folder that holds ``model.onnx`` and receives ``model.ort``. It therefore
imports nothing from edgec. It prints one JSON line.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ADDR_NO_RANDOMIZE = 0x0040000
QUERY_PERSONALITY = 0xFFFFFFFF
REEXEC_MARK = "EDGEC_ORT_FORMAT_REEXEC"  # re-execute at most once, even if the flag did not hold
CHILD_ENV = {"PATH": os.defpath, "LC_ALL": "C"}


def convert(source: Path, out: Path) -> dict:
    """Convert ``source`` (ONNX) to ``out`` (.ort, optimisation style "Runtime") in a child
    process; returns ``{"deterministic": bool}``. Raises CompileError with the converter's
    message when it fails."""
    from edgec.errors import CompileError

    with tempfile.TemporaryDirectory(prefix="edgec-ort-") as tmp:
        shutil.copyfile(source, Path(tmp) / "model.onnx")
        done = subprocess.run([sys.executable, "-I", "-c", Path(__file__).read_text()],
                              cwd=tmp, env=CHILD_ENV, capture_output=True, text=True, check=False)
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise CompileError(f"ONNX Runtime could not convert the model to .ort: {reason}")
        shutil.copyfile(Path(tmp) / "model.ort", out)
    return json.loads(lines[-1])


def _personality(flags: int) -> int:
    import ctypes

    return ctypes.CDLL(None, use_errno=True).personality(flags)


def _randomisation_off() -> bool:
    return sys.platform == "linux" and _personality(QUERY_PERSONALITY) & ADDR_NO_RANDOMIZE != 0


def _turn_randomisation_off() -> bool:
    """Set the flag for the next exec; False where the platform or a seccomp profile refuses."""
    if sys.platform != "linux":
        return False
    current = _personality(QUERY_PERSONALITY)
    return current != -1 and _personality(current | ADDR_NO_RANDOMIZE) != -1


def _convert_here() -> None:
    """``model.onnx`` in the current folder → ``model.ort`` next to it."""
    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    # its module logger is set to DEBUG with a handler on the root logger: keep it quiet
    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints progress
        convert_onnx_models_to_ort(Path("model.onnx"), Path("out"),
                                   optimization_styles=[OptimizationStyle.Runtime])
    converted = sorted(Path("out").glob("*.ort"))
    if not converted:
        raise RuntimeError("ONNX Runtime's converter wrote no .ort file")
    shutil.move(converted[0], "model.ort")


def main() -> int:
    if not _randomisation_off() and REEXEC_MARK not in os.environ and _turn_randomisation_off():
        os.environ[REEXEC_MARK] = "1"
        os.execv(sys.executable, sys.orig_argv)  # the flag takes effect at exec
    try:
        _convert_here()
    except Exception as exc:  # the parent raises CompileError with this line
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"deterministic": _randomisation_off()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
