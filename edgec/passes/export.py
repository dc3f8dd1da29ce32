"""export: torch model to ONNX with a dynamic batch dimension."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import onnx
import torch

from edgec.artifact import Artifact
from edgec.errors import PassError
from edgec.pipeline import Context, Step

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


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
    search_space: dict = {}

    def supports(self, target) -> str | None:
        return None

    def run(self, artifact: Artifact, params: ExportParams, ctx: Context) -> Artifact:
        path = ctx.workdir / f"{len(artifact.lineage):02d}-export.onnx"
        path.write_bytes(export_onnx(artifact.payload, ctx.input_spec, params))
        report = {"nodes": len(onnx.load(str(path)).graph.node)}
        return artifact.derive("onnx", path, Step(self, params).lineage(report))


def export_onnx(model: torch.nn.Module, input_spec, params: ExportParams = ExportParams()) -> bytes:
    """Serialise ``model`` to ONNX bytes (legacy TorchScript exporter: deterministic, no extras)."""
    dummy = torch.zeros((1, *input_spec.shape), dtype=getattr(torch, input_spec.dtype))
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if params.dynamic_batch else None
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), (dummy,), buffer, dynamo=False,
                              opset_version=params.opset, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_axes=axes)
    except Exception as exc:
        raise PassError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    return buffer.getvalue()
