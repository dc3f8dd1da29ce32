"""fuse: fold BatchNorm into the preceding convolution, leaving Conv→ReLU / Add→ReLU chains."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch.nn.utils.fusion import fuse_conv_bn_eval

from edgec.artifact import Artifact
from edgec.errors import PassError
from edgec.pipeline import Context, Step


@dataclass(frozen=True)
class FuseParams:
    """``fold_bn``: fold eval-mode BatchNorm2d into the Conv2d that feeds it."""

    fold_bn: bool = True


class FusePass:
    name = "fuse"
    consumes = "torch"
    produces = "torch"
    Params = FuseParams
    search_space: dict = {}

    def supports(self, target) -> str | None:
        return None

    def run(self, artifact: Artifact, params: FuseParams, ctx: Context) -> Artifact:
        try:
            graph = fx.symbolic_trace(artifact.payload)
        except Exception as exc:
            raise PassError(f"fuse needs an FX-traceable model: {type(exc).__name__}: {exc}") from exc
        folded = fold_batchnorm(graph) if params.fold_bn else 0
        report = {"bn_folded": folded, **count_fusable(graph)}
        ctx.progress(f"fuse: folded {folded} BatchNorm layers")
        return artifact.derive("torch", graph, Step(self, params).lineage(report))


def fold_batchnorm(graph: fx.GraphModule) -> int:
    """Fold every BatchNorm2d whose only input is a Conv2d used nowhere else. Returns the count."""
    modules = dict(graph.named_modules())
    folded = 0
    for node in list(graph.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], torch.nn.BatchNorm2d):
            continue
        conv_node = node.args[0]
        if not (isinstance(conv_node, fx.Node) and conv_node.op == "call_module"
                and isinstance(modules[conv_node.target], torch.nn.Conv2d)
                and len(conv_node.users) == 1):
            continue
        fused = fuse_conv_bn_eval(modules[conv_node.target].eval(), modules[node.target].eval())
        _set_module(graph, conv_node.target, fused)
        node.replace_all_uses_with(conv_node)
        graph.graph.erase_node(node)
        folded += 1
    graph.graph.lint()
    graph.delete_all_unused_submodules()
    graph.recompile()
    return folded


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


def _set_module(graph: fx.GraphModule, target: str, module: torch.nn.Module) -> None:
    parent_name, _, leaf = target.rpartition(".")
    parent = graph.get_submodule(parent_name) if parent_name else graph
    setattr(parent, leaf, module)
