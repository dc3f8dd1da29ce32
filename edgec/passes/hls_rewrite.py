"""hls_rewrite: replace layers hls4ml's PyTorch frontend lacks with equivalent layers it has.

- ``Identity`` and eval-mode ``Dropout`` modules → removed (their input is used directly).
- ``adaptive_avg_pool2d`` / ``AdaptiveAvgPool2d`` on a known spatial size → ``AvgPool2d``.
- The option-A shortcut of CIFAR ResNets (``x[:, :, ::s, ::s]`` then a zero channel pad) → a
  fixed 1×1 ``Conv2d`` with stride ``s`` whose weight is an identity / zero-padding matrix.
  A lone strided slice or a lone channel pad becomes the same kind of convolution.

Both rewrites are exact: the model computes the same function (checked after the rewrite).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from edgec.artifact import Artifact
from edgec.errors import PassError
from edgec.pipeline import Context, Step

_PAD_FUNCTIONS = (F.pad, torch.constant_pad_nd)


@dataclass(frozen=True)
class HlsRewriteParams:
    """``pooling``: rewrite adaptive average pooling; ``shortcuts``: rewrite slice/pad shortcuts.

    ``tolerance``: largest max-abs logit change the rewrite may cause before it is rejected.
    """

    pooling: bool = True
    shortcuts: bool = True
    tolerance: float = 1e-4

    def __post_init__(self):
        if not self.tolerance > 0:
            raise ValueError(f"tolerance {self.tolerance} must be > 0")


class HlsRewritePass:
    name = "hls_rewrite"
    consumes = "torch"
    produces = "torch"
    Params = HlsRewriteParams
    target_fields = ()
    exact = True  # checked against ``tolerance``: the accuracy budget charges it nothing

    def supports(self, target) -> str | None:
        return None

    def run(self, artifact: Artifact, params: HlsRewriteParams, ctx: Context) -> Artifact:
        example = torch.zeros((1, *ctx.input_spec.shape), dtype=getattr(torch, ctx.input_spec.dtype))
        graph = rewrite_for_hls(artifact.payload, example, params)
        report = {"pooling_rewritten": graph.meta["pooling_rewritten"],
                  "shortcuts_rewritten": graph.meta["shortcuts_rewritten"]}
        ctx.progress(f"hls_rewrite: {report}")
        return artifact.derive("torch", graph, Step(self, params).lineage(report))


def rewrite_for_hls(model: nn.Module, example: torch.Tensor,
                    params: HlsRewriteParams = HlsRewriteParams()) -> fx.GraphModule:
    """A GraphModule computing what ``model`` computes, using only layers hls4ml converts."""
    try:
        graph = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
        graph = fx.GraphModule(graph, graph.graph)  # never modify the caller's module
    except Exception as exc:
        raise PassError(f"hls_rewrite needs an FX-traceable model: {type(exc).__name__}: {exc}") from exc
    ShapeProp(graph).propagate(example)
    _drop_identities(graph)
    pools = _rewrite_pooling(graph) if params.pooling else 0
    shortcuts = _rewrite_shortcuts(graph) if params.shortcuts else 0
    graph.graph.lint()
    graph.recompile()
    _check_equal(model, graph, example, params.tolerance)
    graph.meta["pooling_rewritten"] = pools
    graph.meta["shortcuts_rewritten"] = shortcuts
    return graph


def _drop_identities(graph: fx.GraphModule) -> None:
    modules = dict(graph.named_modules())
    for node in list(graph.graph.nodes):
        if node.op == "call_module" and isinstance(modules[node.target], nn.Identity | nn.Dropout):
            node.replace_all_uses_with(node.args[0])
            graph.graph.erase_node(node)
    graph.delete_all_unused_submodules()


def _rewrite_pooling(graph: fx.GraphModule) -> int:
    modules = dict(graph.named_modules())
    count = 0
    for node in list(graph.graph.nodes):
        if node.op == "call_module" and isinstance(modules[node.target], nn.AdaptiveAvgPool2d):
            output_size = modules[node.target].output_size
        elif node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
            output_size = node.args[1] if len(node.args) > 1 else node.kwargs["output_size"]
        else:
            continue
        _, _, height, width = node.args[0].meta["tensor_meta"].shape
        out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
        out_h, out_w = out_h or height, out_w or width
        if height % out_h or width % out_w:
            raise PassError(f"hls_rewrite: adaptive pooling {height}x{width} → {out_h}x{out_w} "
                            f"(node {node.name!r}) is not a fixed pooling; use sizes that divide")
        kernel = (height // out_h, width // out_w)
        _replace_with_module(graph, node, node.args[0], f"hls_pool_{count}", nn.AvgPool2d(kernel))
        count += 1
    return count


def _rewrite_shortcuts(graph: fx.GraphModule) -> int:
    count = 0
    for node in list(graph.graph.nodes):
        stride = _spatial_stride(node)
        if stride is None:
            continue
        source = node.args[0]
        channels = source.meta["tensor_meta"].shape[1]
        pad_node = next(iter(node.users)) if len(node.users) == 1 else None
        before, after = _channel_pad(pad_node) if pad_node is not None else (None, None)
        last = node
        if before is None:
            before, after = 0, 0
        else:
            last = pad_node
        conv = _selection_conv(channels, before, after, stride)
        _replace_with_module(graph, last, source, f"hls_shortcut_{count}", conv)
        if last is not node:
            graph.graph.erase_node(node)
        count += 1
    for node in list(graph.graph.nodes):  # channel pads that follow no slice
        before, after = _channel_pad(node)
        if before is None:
            continue
        source = node.args[0]
        conv = _selection_conv(source.meta["tensor_meta"].shape[1], before, after, 1)
        _replace_with_module(graph, node, source, f"hls_shortcut_{count}", conv)
        count += 1
    return count


def _spatial_stride(node: fx.Node) -> int | None:
    """``s`` if ``node`` is ``x[:, :, ::s, ::s]`` on a 4-D tensor, else None."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    index = node.args[1]
    if not (isinstance(index, tuple) and len(index) == 4 and all(isinstance(i, slice) for i in index)):
        return None
    full = slice(None)
    h, w = index[2], index[3]
    if index[0] != full or index[1] != full or h.start not in (None, 0) or w.start not in (None, 0):
        return None
    if h.stop is not None or w.stop is not None or h.step != w.step or not h.step:
        return None
    return h.step


def _channel_pad(node: fx.Node | None) -> tuple[int | None, int | None]:
    """(before, after) if ``node`` zero-pads only the channel axis of a 4-D tensor."""
    if node is None or node.op != "call_function" or node.target not in _PAD_FUNCTIONS:
        return None, None
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0)
    if mode != "constant" or value not in (0, 0.0, None) or not isinstance(pad, list | tuple):
        return None, None
    if len(pad) != 6 or any(pad[:4]):
        return None, None
    return int(pad[4]), int(pad[5])


def _selection_conv(channels: int, before: int, after: int, stride: int) -> nn.Conv2d:
    """1×1 conv copying input channel i to output channel ``before + i``; other outputs zero."""
    conv = nn.Conv2d(channels, before + channels + after, 1, stride=stride, bias=False)
    weight = torch.zeros_like(conv.weight)
    for i in range(channels):
        weight[before + i, i, 0, 0] = 1.0
    conv.weight = nn.Parameter(weight, requires_grad=False)
    return conv.eval()


def _replace_with_module(graph: fx.GraphModule, old: fx.Node, source: fx.Node, name: str,
                         module: nn.Module) -> None:
    graph.add_submodule(name, module)
    with graph.graph.inserting_before(old):
        new = graph.graph.call_module(name, (source,))
    new.meta = dict(old.meta)
    old.replace_all_uses_with(new)
    graph.graph.erase_node(old)


def _check_equal(model: nn.Module, graph: fx.GraphModule, example: torch.Tensor,
                 tolerance: float) -> None:
    probe = torch.randn((4, *example.shape[1:]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(probe) - graph(probe)).abs().max().item()
    if diff > tolerance:
        raise PassError(f"hls_rewrite changed the model's outputs by {diff:.2e} (> {tolerance}); "
                        "this is a bug in the rewrite, please report it")
