"""Backends turn the pipeline's final artifact into files a runner can execute on the target."""

from edgec.backends.onnxruntime import OnnxRuntimeBackend

BACKENDS = {
    "onnxruntime": OnnxRuntimeBackend,
}
