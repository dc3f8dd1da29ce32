"""export: torch model to ONNX with a dynamic batch dimension (:mod:`edgec.onnx_export`)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from edgec.artifact import Artifact
from edgec.onnx_export import export_onnx
from edgec.pipeline import Context, Step


@dataclass(frozen=True)
class ExportParams:
    """``opset``: ONNX opset version; ``dynamic_batch``: leave the batch dimension symbolic."""

    opset: int = 17
    dynamic_batch: bool = True

    def __post_init__(self):
        if not 13 <= self.opset <= 21:
            raise ValueError(f"opset {self.opset} unsupported; use 13..21")


class ExportPass:
    name = "export"
    consumes = "torch"
    produces = "onnx"
    Params = ExportParams
    target_fields = ()
    exact = True  # the same function: the accuracy budget charges it nothing

    def supports(self, target) -> str | None:
        return None

    def run(self, artifact: Artifact, params: ExportParams, ctx: Context) -> Artifact:
        path = ctx.workdir / f"{len(artifact.lineage):02d}-export.onnx"
        path.write_bytes(export_onnx(artifact.payload, ctx.input_spec, params.opset,
                                     params.dynamic_batch))
        report = {"nodes": len(onnx.load(str(path)).graph.node)}
        return artifact.derive("onnx", path, Step(self, params).lineage(report))
