"""BatchNorm folding: a Conv2d followed only by a BatchNorm2d becomes one Conv2d (inference).

A mechanism below the passes: ``fuse`` folds whole models, ``edgec.exits`` folds the segments of
an early-exit model it fine-tuned with BatchNorm kept.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.nn.utils.fusion import fuse_conv_bn_eval


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
        set_module(graph, conv_node.target, fused)
        node.replace_all_uses_with(conv_node)
        graph.graph.erase_node(node)
        folded += 1
    graph.graph.lint()
    graph.delete_all_unused_submodules()
    graph.recompile()
    return folded


def set_module(graph: fx.GraphModule, target: str, module: torch.nn.Module) -> None:
    """Replace the submodule at dotted ``target`` of ``graph`` by ``module``."""
    parent_name, _, leaf = target.rpartition(".")
    parent = graph.get_submodule(parent_name) if parent_name else graph
    setattr(parent, leaf, module)
