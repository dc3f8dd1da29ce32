"""Cost analysis: MACs and bytes moved per layer (torch or ONNX), and the efficiency gap.

The efficiency gap (On the Efficiency of CNNs): latency = MACs / (efficiency × peak). For every
convolution / matrix multiply we count MACs and the bytes it must move (input activation, weights,
output activation at the element size of the precision), and, with ONNX Runtime's profiler, the
time it took: achieved GMAC/s and its fraction of the target's peak.

The one place MACs are counted (passes and benchmarks use it): multiply-accumulates of
convolutions and fully connected layers only, so that a torch model and its ONNX graph count
alike, with BatchNorm folded or not.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgec.runner import runner

ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "int8": 1, "int4": 0.5}


@dataclass(frozen=True)
class LayerCost:
    """One compute layer: multiply-accumulates per sample and bytes it reads and writes."""

    name: str
    kind: str
    macs: int
    weight_elements: int
    input_elements: int
    output_elements: int

    def bytes_moved(self, element_bytes: float = 4) -> float:
        return (self.weight_elements + self.input_elements + self.output_elements) * element_bytes


def conv_macs(out_shape, in_channels: int, groups: int, kernel: tuple[int, ...]) -> int:
    """MACs of one convolution for one sample: output elements × (Cin / groups) × kernel area."""
    return int(math.prod(out_shape) * (in_channels // groups) * math.prod(kernel))


def layer_costs(model, x) -> tuple[list[LayerCost], Any]:
    """Costs of every Conv2d and Linear of ``model`` for the first sample of ``x``, in execution
    order, and the model's output on that sample (run in the mode the model is in, without
    gradients)."""
    import torch

    costs: list[LayerCost] = []

    def hook(name):
        def record(module, inputs, output):
            out_shape = tuple(output.shape[1:])
            if isinstance(module, torch.nn.Conv2d):
                macs = conv_macs(out_shape, module.in_channels, module.groups, module.kernel_size)
            else:
                macs = int(math.prod(out_shape) * module.in_features)
            costs.append(LayerCost(name, type(module).__name__, macs, module.weight.numel(),
                                   int(inputs[0][0].numel()), int(math.prod(out_shape))))
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Conv2d | torch.nn.Linear)]
    try:
        with torch.no_grad():
            output = model(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    return costs, output


def torch_layer_costs(model, input_spec) -> list[LayerCost]:
    """Costs of every Conv2d and Linear of ``model`` in eval mode for one sample of
    ``input_spec`` (zeros), in execution order; the model's mode is restored."""
    import torch

    was_training = model.training
    model.eval()
    try:
        return layer_costs(model, torch.zeros((1, *input_spec.shape),
                                              dtype=getattr(torch, input_spec.dtype)))[0]
    finally:
        model.train(was_training)


def total_macs(model, input_spec) -> int:
    """Multiply-accumulates of one forward pass of one sample (convolutions and linears)."""
    return sum(cost.macs for cost in torch_layer_costs(model, input_spec))


def count_macs(model, x) -> tuple[int, Any]:
    """Multiply-accumulates of ``model`` on the first sample of ``x`` (convolutions and linears,
    as :func:`layer_costs` counts them), and its output there: MACs of chained pieces (e.g.
    early-exit segments), each fed the one before's output."""
    costs, output = layer_costs(model, x)
    return sum(cost.macs for cost in costs), output


def onnx_layer_costs(path: str | Path) -> list[LayerCost]:
    """Costs of every Conv / Gemm / MatMul node of an ONNX file (fp32 or QDQ), batch 1."""
    import onnx

    model = onnx.load(str(path))
    shapes = _tensor_shapes(model)
    # in a QDQ model a weight reaches its Conv through DequantizeLinear: look through it
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in shapes:
            shapes.setdefault(node.output[0], shapes[node.input[0]])
    costs = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        x, w, y = (shapes.get(node.input[0]), shapes.get(node.input[1]), shapes.get(node.output[0]))
        if not (x and w and y) or 0 in [*x, *w, *y]:
            continue
        if node.op_type == "Conv":
            groups = next((a.i for a in node.attribute if a.name == "group"), 1)
            macs = conv_macs(y[1:], x[1], groups, tuple(w[2:]))
        else:
            macs = int(math.prod(y[1:]) * x[-1])
        costs.append(LayerCost(node.name, node.op_type, macs, int(math.prod(w)),
                               int(math.prod(x[1:])), int(math.prod(y[1:]))))
    return costs


@dataclass(frozen=True)
class LayerEfficiency:
    """A layer's cost, its measured time and the fraction of the target's peak it reached."""

    name: str
    kind: str
    macs: int
    bytes_moved: float
    time_us: float
    gmacs: float
    efficiency: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def profile_node_times(path: str | Path, input_shape: tuple[int, ...], runs: int = 50,
                       threads: int = 1, seed: int = 0) -> dict[str, float]:
    """Median per-node kernel time (µs) from ONNX Runtime's profiler, batch 1, ``threads``.

    Node names are those of ORT's optimised graph (fused nodes keep a name derived from one
    of the nodes they replaced).
    """
    with tempfile.TemporaryDirectory(prefix="edgec-profile-") as scratch:
        session = runner.ort_session(path, threads, profile_prefix=Path(scratch) / "ort")
        name = session.get_inputs()[0].name
        x = np.random.default_rng(seed).standard_normal((1, *input_shape)).astype(np.float32)
        for _ in range(runs):
            session.run(None, {name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    samples: dict[str, list[float]] = defaultdict(list)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            samples[event["name"][: -len("_kernel_time")]].append(float(event["dur"]))
    # the first runs are warm-up; keep the median of the later half
    return {node: float(np.median(times[len(times) // 2:])) for node, times in samples.items()}


def _tensor_shapes(model) -> dict[str, list[int]]:
    """Shape of every tensor at batch 1, by running the graph once with every output exposed
    (static shape inference cannot follow the Pad/Slice arithmetic of exported shortcuts)."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in node.output
                                  if t and t not in known)
    session = runner.ort_session(probe.SerializeToString(), 1, optimization="disable")
    feeds = {}
    for tensor in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in tensor.shape]
        feeds[tensor.name] = np.zeros(shape, np.float32)
    names = [o.name for o in session.get_outputs()]
    shapes = {name: list(np.shape(v)) for name, v in zip(names, session.run(names, feeds))}
    shapes.update({t.name: list(np.shape(v)) for t, v in zip(session.get_inputs(), feeds.values())})
    shapes.update({init.name: list(init.dims) for init in model.graph.initializer})
    return shapes


def _owner_map(path: str | Path) -> dict[str, str]:
    """Names an optimised node may carry (node names, output tensors of the Conv→(Add)→Relu
    chain, QDQ wrappers) → the source Conv/Gemm node they belong to."""
    import onnx

    graph = onnx.load(str(path)).graph
    consumers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for tensor in node.input:
            consumers[tensor].append(node)
    owners: dict[str, str] = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        owners[node.name] = node.name
        frontier = list(node.output)
        for _ in range(4):  # Conv → QuantizeLinear → DequantizeLinear → Add → Relu
            following = [n for t in frontier for n in consumers[t]
                         if n.op_type in ("Relu", "Add", "QuantizeLinear", "DequantizeLinear",
                                          "Clip")]
            frontier = []
            for n in following:
                owners.setdefault(n.name, node.name)
                for tensor in n.output:
                    owners.setdefault(tensor, node.name)
                    frontier.append(tensor)
        for tensor in node.output:
            owners[tensor] = node.name
    return owners


def _strip(name: str) -> list[str]:
    candidates = [name]
    for suffix in ("_nchwc", "_quant", "_token"):
        if suffix in name:
            candidates.append(name[: name.rindex(suffix)])
    return candidates


def module_names(path: str | Path) -> dict[str, str]:
    """ONNX Conv/Gemm node name → the torch module it came from ('/conv1_1/Conv' →
    'layer1.0.conv1'), read from its weight's initialiser name (through DequantizeLinear)."""
    import onnx

    graph = onnx.load(str(path)).graph
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {init.name for init in graph.initializer}
    names = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        weight = node.input[1]
        source = producers.get(weight)
        if source is not None and source.op_type == "DequantizeLinear":
            weight = source.input[0]
        if weight in initializers:
            names[node.name] = weight.removesuffix("_quantized").removesuffix(".weight")
    return names


def efficiency_report(path: str | Path, input_shape: tuple[int, ...], peak_gmacs: float,
                      element_bytes: float = 4, runs: int = 50,
                      threads: int = 1) -> tuple[list[LayerEfficiency], float]:
    """Per-layer MACs, bytes, measured time and efficiency = achieved GMAC/s / peak.

    Returns the layers (Conv/Gemm of the source graph, each charged with the time of the
    optimised nodes it became) and the time of everything else (µs).
    """
    costs = {cost.name: cost for cost in onnx_layer_costs(path)}
    owners = _owner_map(path)
    times = profile_node_times(path, input_shape, runs=runs, threads=threads)
    charged: dict[str, float] = defaultdict(float)
    other = 0.0
    for node, time_us in times.items():
        owner = next((owners[c] for c in _strip(node) if c in owners), None)
        if owner in costs:
            charged[owner] += time_us
        else:
            other += time_us
    labels = module_names(path)
    layers = []
    for name, cost in costs.items():
        time_us = charged.get(name, 0.0)
        gmacs = cost.macs / (time_us * 1e3) if time_us else float("nan")
        layers.append(LayerEfficiency(labels.get(name, name), cost.kind, cost.macs,
                                      cost.bytes_moved(element_bytes), time_us, gmacs,
                                      gmacs / peak_gmacs))
    return layers, other


def render_efficiency(layers: list[LayerEfficiency], other_us: float, peak_gmacs: float,
                      precision: str) -> str:
    """Markdown table of the efficiency report, with totals."""
    lines = [f"peak {peak_gmacs:g} GMAC/s ({precision}), 1 thread, batch 1, ORT profiler "
             f"median per node", "",
             "| layer | MACs | KiB moved | µs | GMAC/s | % of peak |", "|---|---|---|---|---|---|"]
    for layer in layers:
        lines.append(f"| {layer.name} | {layer.macs:,} | {layer.bytes_moved / 1024:.1f} | "
                     f"{layer.time_us:.1f} | {layer.gmacs:.2f} | {layer.efficiency * 100:.1f} |")
    macs = sum(layer.macs for layer in layers)
    compute_us = sum(layer.time_us for layer in layers)
    overall = macs / (compute_us * 1e3) if compute_us else float("nan")
    lines.append(f"| **total** | {macs:,} | {sum(la.bytes_moved for la in layers) / 1024:.1f} | "
                 f"{compute_us:.1f} | {overall:.2f} | {overall / peak_gmacs * 100:.1f} |")
    lines.append(f"\nother nodes (pooling, reorders, unfused elementwise): {other_us:.1f} µs")
    return "\n".join(lines)


@dataclass(frozen=True)
class Efficiency:
    """An artifact's efficiency report: per-layer rows, other nodes' time, peak and precision."""

    layers: list[LayerEfficiency]
    other_us: float
    peak_gmacs: float
    precision: str

    def markdown(self) -> str:
        return render_efficiency(self.layers, self.other_us, self.peak_gmacs, self.precision)


def artifact_efficiency(directory: str | Path, manifest: dict[str, Any]) -> Efficiency | None:
    """The efficiency report of an ONNX Runtime artifact, profiled on this host (None for other
    backends or a target without a peak rate for the precision)."""
    entry = manifest.get("entry", {})
    if entry.get("backend") != "onnxruntime":
        return None
    precision = "int8" if any(s.get("pass") == "quantize" for s in manifest.get("lineage", [])) \
        else "fp32"
    peak = manifest["target"].get("peak_gmacs", {}).get(precision)
    if not peak:
        return None
    path = Path(directory) / entry["files"][0]
    layers, other = efficiency_report(path, tuple(manifest["input"]["shape"]), peak,
                                      ELEMENT_BYTES[precision])
    return Efficiency(layers, other, peak, precision)


def efficiency_section(directory: str | Path, manifest: dict[str, Any]) -> str:
    """The report.md section for an ONNX Runtime artifact on this host ('' otherwise)."""
    efficiency = artifact_efficiency(directory, manifest)
    if efficiency is None:
        return ""
    return "\n## Efficiency gap per layer (profiled on this host)\n" + efficiency.markdown() + "\n"
