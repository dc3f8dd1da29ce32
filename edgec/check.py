"""``edgec check``: a lowering preflight, before any build.

For each candidate backend of a target, list the model's ops in the graph that backend lowers
(ONNX nodes for onnxruntime / tvm / tensorrt / ort-mobile, FX nodes of the torch model for
hls4ml, ATen ops of ``torch.export`` for executorch) and say for each op whether the backend runs
it natively, falls back to a slower path, needs a rewrite pass, or cannot run it at all.

A backend may provide its own table through a class attribute ``op_support(ops) -> dict``; else
the tables below apply. TVM's verdicts come from the installed Relax ONNX frontend itself.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

NATIVE, FALLBACK, REWRITE, UNSUPPORTED = "native", "fallback", "rewrite", "unsupported"

# TensorRT 10's ONNX parser (onnx-tensorrt operators.md), the ops CNN exports use.
TENSORRT_OPS = frozenset({
    "Abs", "Add", "ArgMax", "AveragePool", "BatchNormalization", "Cast", "Ceil", "Clip", "Concat",
    "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "DequantizeLinear", "Div", "Dropout",
    "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "Flatten", "Floor", "Gather", "Gemm",
    "GlobalAveragePool", "GlobalMaxPool", "Greater", "HardSigmoid", "HardSwish", "Identity",
    "InstanceNormalization", "LayerNormalization", "LeakyRelu", "Less", "Log", "MatMul", "Max",
    "MaxPool", "Mean", "Min", "Mul", "Neg", "Not", "Pad", "Pow", "PRelu", "QuantizeLinear",
    "Range", "Reciprocal", "ReduceMax", "ReduceMean", "ReduceSum", "Relu", "Reshape", "Resize",
    "Shape", "Sigmoid", "Sign", "Sin", "Slice", "Softmax", "Softplus", "Split", "Sqrt", "Squeeze",
    "Sub", "Sum", "Tanh", "Tile", "TopK", "Transpose", "Unsqueeze", "Where",
})
# ONNX Runtime's XNNPACK execution provider (mobile); other ops run on the CPU provider.
XNNPACK_ONNX_OPS = frozenset({
    "AveragePool", "Clip", "Conv", "ConvTranspose", "Gemm", "GlobalAveragePool", "MatMul",
    "MaxPool", "Resize", "Softmax", "Add", "Sub", "Mul", "Div", "QLinearConv", "QuantizeLinear",
    "DequantizeLinear", "Relu", "Sigmoid", "Tanh",
})
# ExecuTorch's XNNPACK partitioner (ATen ops after torch.export); others use portable kernels.
XNNPACK_ATEN_OPS = frozenset({
    "convolution", "conv2d", "linear", "addmm", "mm", "relu", "relu_", "add", "add_", "mul",
    "sub", "div", "hardtanh", "avg_pool2d", "max_pool2d", "mean", "adaptive_avg_pool2d",
    "constant_pad_nd", "cat", "clamp", "sigmoid", "softmax", "_softmax", "permute_copy", "view",
    "view_copy", "flatten", "reshape", "hardswish", "leaky_relu", "batch_norm",
    "_native_batch_norm_legit_no_training", "upsample_bilinear2d",
})
# hls4ml 1.3's PyTorch frontend (FX level); plus what a pass must rewrite first.
HLS4ML_OPS = frozenset({
    "Conv1d", "Conv2d", "Linear", "BatchNorm1d", "BatchNorm2d", "ReLU", "LeakyReLU", "ReLU6",
    "Sigmoid", "Softmax", "Tanh", "ELU", "MaxPool1d", "MaxPool2d", "AvgPool1d", "AvgPool2d",
    "Flatten", "Dropout", "Identity", "Upsample", "add", "relu", "sigmoid", "tanh", "softmax",
    "flatten", "cat", "concatenate", "max_pool2d", "avg_pool2d", "mul",
})
# Ops that only move shapes or constants: no kernel cost on any backend.
SHAPE_OPS = frozenset({
    "Constant", "ConstantOfShape", "Shape", "Reshape", "Flatten", "Identity", "Cast", "Squeeze",
    "Unsqueeze", "Concat", "Gather", "getitem", "view", "flatten",
})
HLS4ML_REWRITES = {
    "AdaptiveAvgPool2d": "rewrite to AvgPool2d with kernel = feature-map size",
    "adaptive_avg_pool2d": "rewrite to AvgPool2d with kernel = feature-map size",
    "getitem": "strided slicing (option-A shortcut): rewrite as a fixed 1x1 strided conv",
    "pad": "channel zero-padding (option-A shortcut): fold into that fixed 1x1 conv",
}


@dataclass(frozen=True)
class BackendCheck:
    """One backend's verdict: op → (status, note), in graph order, with counts."""

    backend: str
    graph: str
    ops: dict[str, tuple[str, str]]
    counts: dict[str, int]
    note: str = ""

    @property
    def verdict(self) -> str:
        statuses = Counter(status for status, _ in self.ops.values())
        if self.note and not self.ops:
            return f"not checked: {self.note}"
        if statuses[UNSUPPORTED]:
            return f"fails: {statuses[UNSUPPORTED]} op type(s) unsupported"
        if statuses[REWRITE]:
            return f"needs rewrites: {statuses[REWRITE]} op type(s)"
        if statuses[FALLBACK]:
            return f"runs, {statuses[FALLBACK]} op type(s) fall back"
        return "ok: every op native"


@dataclass(frozen=True)
class CheckReport:
    model: str
    target: str
    backends: list[BackendCheck] = field(default_factory=list)


def check_model(model_toml: str | Path, target_name: str) -> CheckReport:
    """Build the op views of the model once and judge them for every backend of the target."""
    from edgec.model import load_model_config, load_torch_model
    from edgec.targets import load_target

    target = load_target(target_name)
    config = load_model_config(model_toml)
    model = load_torch_model(config).eval()
    views = ModelViews(model, config.input)
    report = CheckReport(config.name, target.name)
    for name in target.backends:
        report.backends.append(check_backend(name, views))
    return report


class ModelViews:
    """The model as ONNX node types, FX node targets and ATen ops (each computed on demand)."""

    def __init__(self, model, input_spec):
        self.model, self.input_spec = model, input_spec
        self._cache: dict[str, Counter] = {}

    def get(self, graph: str) -> Counter:
        if graph not in self._cache:
            self._cache[graph] = getattr(self, f"_{graph}")()
        return self._cache[graph]

    def _onnx(self) -> Counter:
        import onnx

        from edgec.onnx_export import export_onnx

        proto = onnx.load_from_string(export_onnx(self.model, self.input_spec))
        return Counter(node.op_type for node in proto.graph.node)

    def _onnx_static(self) -> Counter:
        """What the tvm backend imports: batch fixed to 1, shape arithmetic folded."""
        import tempfile

        import onnx

        from edgec.backends.tvm import static_onnx
        from edgec.onnx_export import export_onnx

        with tempfile.TemporaryDirectory(prefix="edgec-check-") as tmp:
            path = Path(tmp) / "model.onnx"
            path.write_bytes(export_onnx(self.model, self.input_spec))
            proto = onnx.load_from_string(static_onnx(path))
        return Counter(node.op_type for node in proto.graph.node)

    def _fx(self) -> Counter:
        from torch import fx

        graph = fx.symbolic_trace(self.model)
        modules = dict(graph.named_modules())
        names = Counter()
        for node in graph.graph.nodes:
            if node.op == "call_module":
                names[type(modules[node.target]).__name__] += 1
            elif node.op in ("call_function", "call_method"):
                names[getattr(node.target, "__name__", str(node.target))] += 1
        return names

    def _aten(self) -> Counter:
        import torch

        x = torch.zeros((1, *self.input_spec.shape))
        program = torch.export.export(self.model, (x,)).run_decompositions({})
        return Counter(node.target.__name__.split(".")[0] for node in program.graph.nodes
                       if node.op == "call_function" and hasattr(node.target, "__name__"))


def check_backend(name: str, views: ModelViews) -> BackendCheck:
    """Judge one backend; an unregistered backend or missing extra is reported, not raised."""
    from edgec.backends import BACKENDS

    graph, judge = JUDGES.get(name, ("onnx", None))
    backend = BACKENDS.get(name)
    custom = getattr(backend, "op_support", None)
    ops = views.get(graph)
    if custom is not None:
        return BackendCheck(name, graph, custom(dict(ops)), dict(ops))
    if judge is None:
        note = "not registered in BACKENDS" if backend is None else "no op table for it"
        return BackendCheck(name, graph, {}, dict(ops), note)
    try:
        verdicts = {op: judge(op) for op in ops}
    except ImportError as exc:
        return BackendCheck(name, graph, {}, dict(ops), f"{exc.name} not installed")
    return BackendCheck(name, graph, verdicts, dict(ops))


def _onnxruntime(op: str) -> tuple[str, str]:
    import onnx

    return (NATIVE, "") if onnx.defs.has(op) else (UNSUPPORTED, "not a standard ONNX op")


def _tvm(op: str) -> tuple[str, str]:
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    if op in ("QuantizeLinear", "DequantizeLinear"):
        return FALLBACK, "imported as float fake-quantisation (int8 goes to onnxruntime)"
    return (NATIVE, "") if op in _get_convert_map() else (UNSUPPORTED, "no Relax ONNX converter")


def _tensorrt(op: str) -> tuple[str, str]:
    return (NATIVE, "") if op in TENSORRT_OPS else (UNSUPPORTED, "not in TensorRT's ONNX parser")


def _ort_mobile(op: str) -> tuple[str, str]:
    if op in SHAPE_OPS:
        return NATIVE, "shape/constant op"
    if op in XNNPACK_ONNX_OPS:
        return NATIVE, "XNNPACK"
    return FALLBACK, "ORT CPU kernel (not XNNPACK)"


def _executorch(op: str) -> tuple[str, str]:
    if op in SHAPE_OPS:
        return NATIVE, "shape/tuple op"
    if op in XNNPACK_ATEN_OPS:
        return NATIVE, "XNNPACK delegate"
    return FALLBACK, "portable kernel (not delegated)"


def _hls4ml(op: str) -> tuple[str, str]:
    if op in HLS4ML_REWRITES:
        return REWRITE, HLS4ML_REWRITES[op]
    return (NATIVE, "") if op in HLS4ML_OPS else (UNSUPPORTED, "no hls4ml PyTorch layer")


JUDGES = {
    "onnxruntime": ("onnx", _onnxruntime),
    "tvm": ("onnx_static", _tvm),
    "tensorrt": ("onnx", _tensorrt),
    "ort-mobile": ("onnx", _ort_mobile),
    "executorch": ("aten", _executorch),
    "hls4ml": ("fx", _hls4ml),
}


def render_check(report: CheckReport) -> str:
    """Plain-text report: one block per backend, one line per op type."""
    lines = [f"edgec check: {report.model} on {report.target}"]
    for check in report.backends:
        lines.append(f"\n[{check.backend}] ({check.graph} graph) {check.verdict}")
        for op, (status, note) in check.ops.items():
            lines.append(f"  {op:<28} x{check.counts[op]:<3} {status:<11} {note}".rstrip())
    return "\n".join(lines)
