"""Backends turn the pipeline's final artifact into files a runner can execute on the target."""

from edgec.backends.cascade import CascadeBackend
from edgec.backends.hls import Hls4mlBackend
from edgec.backends.jetson import TensorRTBackend
from edgec.backends.mobile import ExecuTorchBackend, LiteRtBackend, OrtMobileBackend
from edgec.backends.onnxruntime import OnnxRuntimeBackend
from edgec.backends.tvm import TvmBackend

BACKENDS = {
    "onnxruntime": OnnxRuntimeBackend,
    "tvm": TvmBackend,
    "tensorrt": TensorRTBackend,
    "cascade": CascadeBackend,
    "ort-mobile": OrtMobileBackend,
    "executorch": ExecuTorchBackend,
    "litert": LiteRtBackend,
    "hls4ml": Hls4mlBackend,
}

# The pyproject optional dependencies (`pip install "edgec[EXTRA]"`) a backend needs; the others
# need only the core install (onnxruntime) or a toolchain outside pip (TensorRT on the Jetson).
BACKEND_EXTRAS = {"tvm": "tvm", "executorch": "mobile", "hls4ml": "fpga", "litert": "litert"}
