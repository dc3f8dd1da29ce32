"""Mobile backends: ONNX Runtime mobile format (.ort), ExecuTorch (.pte, XNNPACK), LiteRT (.tflite).

- ``ort-mobile`` consumes the ONNX stage (fp32 or the quantize pass's int8 QDQ) and converts it
  with ONNX Runtime's own converter. Optimisation style "Runtime": "Fixed" bakes in fused ops of
  this x86 build that a phone's ORT build may lack; "Runtime" leaves them to the phone. The
  conversion runs in a child process without address-space randomisation, which makes it
  byte-identical run to run (see :mod:`edgec.ort_format`).
- ``executorch`` consumes the torch stage: ``torch.export`` at batch 1 → XNNPACK-delegated
  ``.pte``. An int8 model comes from the ``quantize_pt2e`` pass (PT2E with XNNPACKQuantizer,
  calibrated there), because calibration data lives in passes, not backends.
- ``litert`` consumes the torch stage and converts with litert-torch (optional, heavy extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgec.artifact import Artifact
from edgec.errors import CompileError, require


def _example_input(artifact: Artifact, target):
    import torch

    shape = artifact.extras.get("input_shape")
    if shape is None:
        raise CompileError("the torch model carries no input shape; build it through edgec.build")
    return (torch.zeros((1, *shape)),)


class OrtMobileBackend:
    """ONNX → ONNX Runtime mobile format ``model.ort`` (runs with any onnxruntime build)."""

    name = "ort-mobile"
    consumes = "onnx"

    def supports(self, target) -> str | None:
        return None

    def versions(self) -> dict[str, str]:
        import onnxruntime

        return {"onnxruntime": onnxruntime.__version__}

    def compile(self, artifact: Artifact, target, out_dir: Path) -> dict[str, Any]:
        from edgec.ort_format import convert

        converted = convert(Path(artifact.payload), out_dir / "model.ort")
        return {"backend": self.name, "files": ["model.ort"],
                "optimization_style": "Runtime",
                "precision": artifact.extras.get("precision", "fp32"),
                "deterministic": converted["deterministic"]}


class ExecuTorchBackend:
    """torch → ``torch.export`` (batch 1) → XNNPACK-delegated ExecuTorch program ``model.pte``."""

    name = "executorch"
    consumes = "torch"

    def supports(self, target) -> str | None:
        return None

    def versions(self) -> dict[str, str]:
        from importlib.metadata import version

        require("executorch", "mobile")
        return {"executorch": version("executorch")}

    def compile(self, artifact: Artifact, target, out_dir: Path) -> dict[str, Any]:
        require("executorch", "mobile")
        from edgec.forward import lower_to_xnnpack

        try:
            (example,) = _example_input(artifact, target)
            program = lower_to_xnnpack(artifact.payload, example)
        except CompileError:
            raise
        except Exception as exc:
            raise CompileError(f"ExecuTorch could not lower the model: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}; run `edgec check`"
                               ) from exc
        (out_dir / "model.pte").write_bytes(program)
        return {"backend": self.name, "files": ["model.pte"], "delegate": "xnnpack", "batch": 1,
                "precision": artifact.extras.get("precision", "fp32")}


class LiteRtBackend:
    """torch → litert-torch → ``model.tflite`` (run with ai-edge-litert's interpreter)."""

    name = "litert"
    consumes = "torch"

    def supports(self, target) -> str | None:
        return None

    def versions(self) -> dict[str, str]:
        from importlib.metadata import version

        require("litert_torch", "litert")
        return {"litert-torch": version("litert-torch")}

    def compile(self, artifact: Artifact, target, out_dir: Path) -> dict[str, Any]:
        litert_torch = require("litert_torch", "litert")
        if artifact.extras.get("precision") == "int8":
            raise CompileError("backend litert converts float models only; use executorch for "
                               "the quantize_pt2e recipe")
        try:
            converted = litert_torch.convert(artifact.payload.eval(),
                                             _example_input(artifact, target))
            converted.export(str(out_dir / "model.tflite"))
        except Exception as exc:
            raise CompileError(f"litert-torch could not convert the model: "
                               f"{type(exc).__name__}: {exc}") from exc
        return {"backend": self.name, "files": ["model.tflite"], "batch": 1, "precision": "fp32"}
