"""Backend ``onnxruntime``: ship the ONNX model as is, run with ONNX Runtime's CPU provider."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgec.artifact import Artifact
from edgec.errors import CompileError


class OnnxRuntimeBackend:
    name = "onnxruntime"
    consumes = "onnx"

    def supports(self, target) -> str | None:
        return None

    def versions(self) -> dict[str, str]:
        import onnx
        import onnxruntime

        return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}

    def compile(self, artifact: Artifact, target, out_dir: Path) -> dict[str, Any]:
        """Copy the model into ``out_dir``; return the manifest's ``entry``."""
        if artifact.stage != "onnx":
            raise CompileError(f"backend onnxruntime needs an ONNX model, got stage "
                               f"{artifact.stage!r}; end the recipe with the 'export' pass")
        shutil.copyfile(artifact.payload, out_dir / "model.onnx")
        return {"backend": self.name, "files": ["model.onnx"]}
