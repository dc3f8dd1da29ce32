"""fuse: fold BatchNorm into convolutions and shape residual blocks so the backend fuses them.

Block fusion (On the Efficiency of CNNs): a residual block should run as few kernels as
possible so its activations stay in cache. After BatchNorm folding, ONNX Runtime fuses
Conv+bias+ReLU (FusedConv, or an NCHWc Conv with a ReLU activation) and, where the shortcut is
already in its blocked layout, the residual Add+ReLU into the second conv. Zero-padding
shortcuts (ResNet option A: ``F.pad(x[:, :, ::2, ::2])``) break that layout, so they are
rewritten into the equivalent 1×1 strided convolution with a fixed 0/1 weight (exact, and
about 1 % more MACs). ``fused_ops`` counts what ONNX Runtime's optimiser really fused.
"""

from __future__ import annotations

import operator
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx

from edgec.artifact import Artifact
from edgec.batchnorm import fold_batchnorm
from edgec.errors import PassError
from edgec.onnx_export import export_onnx
from edgec.pipeline import Context, Step
from edgec.runner import runner


@dataclass(frozen=True)
class FuseParams:
    """``fold_bn``: fold eval-mode BatchNorm2d into the Conv2d that feeds it;
    ``shortcut_conv``: rewrite zero-padding shortcuts as 1×1 strided convs (exact);
    ``verify``: export once and count the nodes ONNX Runtime's optimiser fused (lineage)."""

    fold_bn: bool = True
    shortcut_conv: bool = True
    verify: bool = True


class FusePass:
    name = "fuse"
    consumes = "torch"
    produces = "torch"
    Params = FuseParams
    target_fields = ()
    exact = True  # the same function: the accuracy budget charges it nothing

    def supports(self, target) -> str | None:
        return None

    def run(self, artifact: Artifact, params: FuseParams, ctx: Context) -> Artifact:
        try:
            graph = fx.symbolic_trace(artifact.payload)
        except Exception as exc:
            raise PassError(f"fuse needs an FX-traceable model: {type(exc).__name__}: {exc}") from exc
        folded = fold_batchnorm(graph) if params.fold_bn else 0
        shortcuts = shortcuts_to_conv(graph, ctx.input_spec) if params.shortcut_conv else 0
        report = {"bn_folded": folded, "shortcuts_as_conv": shortcuts, **count_fusable(graph)}
        if params.verify:
            report["ort_optimized"] = ort_fusion_summary(graph, ctx.input_spec, ctx.workdir)
        ctx.progress(f"fuse: folded {folded} BatchNorm layers")
        return artifact.derive("torch", graph, Step(self, params).lineage(report))


def shortcuts_to_conv(graph: fx.GraphModule, input_spec) -> int:
    """Replace ``pad(x[:, :, ::s, ::s], (0, 0, 0, 0, a, b))`` by an exact 1×1 conv of stride s."""
    from torch.fx.passes.shape_prop import ShapeProp

    candidates = [node for node in graph.graph.nodes if _is_channel_pad(node)]
    if not candidates:
        return 0
    example = torch.zeros((1, *input_spec.shape), dtype=getattr(torch, input_spec.dtype))
    ShapeProp(graph).propagate(example)
    for i, pad in enumerate(candidates):
        sliced = pad.args[0]
        source, index = sliced.args
        stride = index[2].step or 1
        before, after = pad.args[1][4], pad.args[1][5]
        channels = source.meta["tensor_meta"].shape[1]
        conv = torch.nn.Conv2d(channels, channels + before + after, 1, stride=stride, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            for c in range(channels):
                conv.weight[before + c, c, 0, 0] = 1.0
        name = f"shortcut_conv{i}"
        graph.add_submodule(name, conv)
        with graph.graph.inserting_before(pad):
            replacement = graph.graph.call_module(name, (source,))
        pad.replace_all_uses_with(replacement)
        graph.graph.erase_node(pad)
        if not sliced.users:
            graph.graph.erase_node(sliced)
    graph.graph.lint()
    graph.recompile()
    return len(candidates)


def _is_channel_pad(node: fx.Node) -> bool:
    """``F.pad`` of zeros on channels only, applied to a plain ``x[:, :, ::s, ::s]`` slice."""
    if node.op != "call_function" or node.target is not torch.nn.functional.pad:
        return False
    widths = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
    if not (isinstance(widths, tuple | list) and len(widths) == 6 and tuple(widths[:4]) == (0,) * 4
            and mode == "constant" and value in (None, 0, 0.0)):
        return False
    sliced = node.args[0]
    if not (isinstance(sliced, fx.Node) and sliced.op == "call_function"
            and sliced.target is operator.getitem and len(sliced.users) == 1):
        return False
    index = sliced.args[1]
    full = slice(None, None, None)
    return (isinstance(index, tuple) and len(index) == 4 and index[:2] == (full, full)
            and all(isinstance(s, slice) and s.start is None and s.stop is None
                    for s in index[2:]) and index[2].step == index[3].step)


def ort_fusion_summary(model: torch.nn.Module, input_spec, workdir: Path) -> dict[str, Any]:
    """Export ``model``, let ONNX Runtime optimise it (all levels) and count what it fused."""
    with tempfile.TemporaryDirectory(prefix="edgec-fuse-", dir=workdir) as scratch:
        path = Path(scratch) / "model.onnx"
        path.write_bytes(export_onnx(model, input_spec))
        return fused_ops(path)


def optimized_op_counts(path: str | Path, level: str = "all") -> Counter:
    """Node types of the graph ONNX Runtime (CPU) runs after its optimisations at ``level``."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="edgec-ort-") as scratch:
        optimized = Path(scratch) / "optimized.onnx"
        # quiet: the NCHWc "hardware specific" warning is expected
        runner.ort_session(path, optimization=level, optimized_path=optimized, quiet=True)
        graph = onnx.load(str(optimized)).graph
    counts: Counter = Counter()
    for node in graph.node:
        activation = next((a.s.decode() for a in node.attribute if a.name == "activation"), None)
        counts[node.op_type] += 1
        if node.op_type in ("Conv", "FusedConv") and activation:
            # an NCHWc Conv with a 4th input adds the residual ("Sum") before the activation
            adds = node.domain == "com.microsoft.nchwc" and len(node.input) > 3 and node.input[3]
            counts[f"{node.op_type}+Add+{activation}" if adds else
                   f"{node.op_type}+{activation}"] += 1
    return counts


def fused_ops(path: str | Path) -> dict[str, Any]:
    """Summary of :func:`optimized_op_counts`: fused conv/add chains and what stayed unfused."""
    counts = optimized_op_counts(path)
    fused = {k: v for k, v in counts.items() if "+" in k}
    return {"conv_relu_fused": sum(v for k, v in fused.items() if "+Add+" not in k),
            "conv_add_relu_fused": sum(v for k, v in fused.items() if "+Add+" in k),
            "standalone_relu": counts.get("Relu", 0),
            "standalone_add": counts.get("Add", 0) + counts.get("QLinearAdd", 0),
            "nodes": sum(v for k, v in counts.items() if "+" not in k),
            "op_types": dict(sorted((k, v) for k, v in counts.items() if "+" not in k))}


def count_fusable(graph: fx.GraphModule) -> dict[str, int]:
    """Count Conv→ReLU and Add→ReLU pairs the backend can fuse into one kernel."""
    modules = dict(graph.named_modules())

    def is_relu(node):
        return (node.op == "call_function" and node.target in (torch.relu, torch.nn.functional.relu)) or (
            node.op == "call_module" and isinstance(modules.get(node.target), torch.nn.ReLU))

    def is_conv(node):
        return node.op == "call_module" and isinstance(modules.get(node.target), torch.nn.Conv2d)

    def is_add(node):
        return node.op == "call_function" and getattr(node.target, "__name__", "") in ("add", "iadd")

    pairs = {"conv_relu": 0, "add_relu": 0}
    for node in graph.graph.nodes:
        if is_relu(node) and isinstance(node.args[0], fx.Node):
            source = node.args[0]
            pairs["conv_relu"] += is_conv(source)
            pairs["add_relu"] += is_add(source)
    return pairs
