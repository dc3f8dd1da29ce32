"""Backend ``cascade``: an early-exit model lowered to one ONNX graph per stage.

The ``early_exit`` pass produces one ONNX graph (fp32, or QDQ int8 after ``quantize``) with
outputs ``logits``, ``exit_k`` and ``feature_k``, and describes the cascade in
``artifact.extras['cascade']``. This backend cuts that graph at the ``feature_k`` tensors
(:func:`edgec.stages.stage_graphs`): stage k maps the input (or feature k-1) to
``[feature_k, exit_k, confidence_k]``, the last stage to ``[logits]``; int8 features pass
between stages as uint8 NHWC tensors. The artifact's runner runs stage 0, returns when the
confidence reaches the stage's threshold, else feeds the features to the next stage
(edgec/runner/runner.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx

from edgec.artifact import Artifact
from edgec.errors import CompileError
from edgec.stages import stage_graphs

CASCADE_FILE = "cascade.json"


class CascadeBackend:
    name = "cascade"
    consumes = "onnx"

    def supports(self, target) -> str | None:
        if "onnxruntime" not in target.backends:
            return f"the cascade runs on onnxruntime, which target {target.name!r} does not list"
        return None

    def versions(self) -> dict[str, str]:
        import onnxruntime

        return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}

    def compile(self, artifact: Artifact, target, out_dir: Path) -> dict[str, Any]:
        """Write ``stage<k>.onnx`` files and ``cascade.json``; return the manifest's entry."""
        cascade = artifact.extras.get("cascade")
        if artifact.stage != "onnx" or not cascade:
            raise CompileError("backend cascade needs an early-exit ONNX model; put the "
                               "'early_exit' pass in the recipe")
        stages = write_stages(onnx.load(str(artifact.payload)), len(cascade["exits"]), out_dir)
        thresholds = [e["threshold"] for e in cascade["exits"]]
        spec = {"stages": stages, "thresholds": thresholds,
                "exits": [e["after"] for e in cascade["exits"]]}
        (out_dir / CASCADE_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        return {"backend": self.name, "files": [CASCADE_FILE, *stages],
                "thresholds": thresholds, "exits": spec["exits"]}


def write_stages(model: onnx.ModelProto, exits: int, out_dir: Path) -> list[str]:
    """Write the stage graphs as ``stage0.onnx`` ... and return their file names."""
    names = []
    for k, stage in enumerate(stage_graphs(model, exits)):
        name = f"stage{k}.onnx"
        onnx.save(stage, str(out_dir / name))
        names.append(name)
    return names
