"""quantize: int8 static post-training quantization (QDQ, per-channel) with onnxruntime."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgec.artifact import Artifact
from edgec.data import preprocess
from edgec.errors import PassError
from edgec.pipeline import Context, Step

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class QuantizeParams:
    """int8 PTQ: ``calibration_count`` images of the calibration split, per-channel weights."""

    per_channel: bool = True
    calibration_count: int = 512
    calibration_method: str = "minmax"
    batch: int = 32

    def __post_init__(self):
        if self.calibration_count < 1:
            raise ValueError(f"calibration_count {self.calibration_count} must be >= 1")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration_method {self.calibration_method!r} unknown; "
                             f"use one of {CALIBRATION_METHODS}")


class QuantizePass:
    name = "quantize"
    consumes = "onnx"
    produces = "onnx"
    Params = QuantizeParams
    search_space = {"calibration_method": list(CALIBRATION_METHODS)}

    def supports(self, target) -> str | None:
        return None if "int8" in target.precisions else f"target has no int8 ({target.precisions})"

    def run(self, artifact: Artifact, params: QuantizeParams, ctx: Context) -> Artifact:
        if ctx.calibration is None:
            raise PassError("quantize needs calibration data: give --data with a [calibration] "
                            "split or use the data-free recipe")
        calibration = ctx.calibration.head(params.calibration_count)
        batches = [preprocess(calibration.images[i:i + params.batch], ctx.input_spec)
                   for i in range(0, len(calibration), params.batch)]
        path = ctx.workdir / f"{len(artifact.lineage):02d}-quantize.onnx"
        quantize_int8(artifact.payload, path, batches, params)
        report = {"calibration": calibration.origin, "calibration_images": len(calibration)}
        ctx.progress(f"quantize: int8 calibrated on {len(calibration)} images")
        return artifact.derive("onnx", path, Step(self, params).lineage(report), precision="int8")


def quantize_int8(source, target, batches: list[np.ndarray], params: QuantizeParams) -> None:
    """quant_pre_process then quantize_static (QDQ, int8 weights and activations)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = target.with_suffix(".pre.onnx")
    quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[params.calibration_method]
    quantize_static(str(pre), str(target), _Reader(batches), quant_format=QuantFormat.QDQ,
                    per_channel=params.per_channel, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=method)
    pre.unlink()


class _Reader:
    """onnxruntime CalibrationDataReader over pre-processed batches."""

    def __init__(self, batches: list[np.ndarray]):
        self._batches = iter(batches)

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {"input": batch}
