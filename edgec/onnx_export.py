"""A torch model to ONNX bytes: the one exporter every pass and backend uses.

The legacy TorchScript exporter (``dynamo=False``): deterministic bytes, no extras. The input is
named ``input``; the outputs are named by the caller (``logits`` for a classifier, the
early-exit model's ``logits``, ``exit_k`` and ``feature_k``). torch is imported on the first
export, so a backend may read the names without it.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

from edgec.errors import PassError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def export_onnx(model, input_spec, opset: int = 17, dynamic_batch: bool = True,
                output_names: Sequence[str] = (OUTPUT_NAME,)) -> bytes:
    """ONNX bytes of ``model`` (exported in eval mode) for one input of ``input_spec``'s shape
    and dtype, checked by the ONNX checker. ``dynamic_batch`` leaves the batch dimension of
    the input and of every output symbolic ("batch")."""
    import onnx
    import torch

    dummy = torch.zeros((1, *input_spec.shape), dtype=getattr(torch, input_spec.dtype))
    names = list(output_names)
    axes = {name: {0: "batch"} for name in [INPUT_NAME, *names]} if dynamic_batch else None
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), (dummy,), buffer, dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=names, dynamic_axes=axes)
    except Exception as exc:
        raise PassError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
    onnx.checker.check_model(onnx.load_from_string(buffer.getvalue()))
    return buffer.getvalue()
