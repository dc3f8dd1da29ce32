"""quantize_pt2e: int8 static PTQ of the torch model with PT2E and ExecuTorch's XNNPACKQuantizer.

The torch-stage counterpart of ``quantize`` (which works on ONNX): it calibrates on the
calibration split and produces a torch model with quantize/dequantize ops that the ``executorch``
backend lowers to XNNPACK's int8 kernels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from edgec.artifact import Artifact
from edgec.data import to_batches
from edgec.errors import PassError, require
from edgec.latency.features import layer_table_from_torch
from edgec.pipeline import Context, Step
from edgec.space import boolean


@dataclass(frozen=True)
class QuantizePt2eParams:
    """int8 weights (per-channel or per-tensor, symmetric) and activations; ``calibration_count``
    images of the calibration split in batches of ``batch``."""

    per_channel: bool = field(default=True, metadata=boolean())
    calibration_count: int = 512
    batch: int = 32

    def __post_init__(self):
        if self.calibration_count < 1:
            raise ValueError(f"calibration_count {self.calibration_count} must be >= 1")
        if self.batch < 1:
            raise ValueError(f"batch {self.batch} must be >= 1")


class QuantizePt2ePass:
    name = "quantize_pt2e"
    consumes = "torch"
    produces = "torch"
    Params = QuantizePt2eParams

    def supports(self, target) -> str | None:
        return None if "int8" in target.precisions else f"target has no int8 ({target.precisions})"

    def run(self, artifact: Artifact, params: QuantizePt2eParams, ctx: Context) -> Artifact:
        if ctx.calibration is None:
            raise PassError("quantize_pt2e needs calibration data: give --data with a "
                            "[calibration] split")
        calibration = ctx.calibration.head(params.calibration_count)
        # the lowered graph has no Conv2d modules left: the latency model's layer table
        # (edgec.latency.features) is read from the float model it quantizes
        layers = layer_table_from_torch(artifact.payload, ctx.input_spec, precision="int8",
                                        per_channel=params.per_channel)
        model = quantize_int8_pt2e(artifact.payload,
                                   to_batches(calibration, ctx.input_spec, params.batch),
                                   params.per_channel)
        report = {"calibration": calibration.origin, "calibration_images": len(calibration),
                  "quantizer": "XNNPACKQuantizer"}
        ctx.progress(f"quantize_pt2e: int8 calibrated on {len(calibration)} images")
        return artifact.derive("torch", model, Step(self, params).lineage(report),
                               precision="int8", layers=layers)


def quantize_int8_pt2e(model, batches, per_channel: bool = True):
    """export (dynamic batch) → prepare_pt2e → calibrate on ``batches`` → convert_pt2e."""
    require("executorch", "mobile")
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=per_channel))
    example = torch.from_numpy(batches[0])
    dynamic = ({0: torch.export.Dim.AUTO},)  # calibrate in batches, lower later at batch 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = torch.export.export(model.eval(), (example,), dynamic_shapes=dynamic).module()
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for batch in batches:
                prepared(torch.from_numpy(batch))
        return convert_pt2e(prepared)

