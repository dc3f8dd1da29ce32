"""Cutting a model into chained stages, for early exits.

Two representations, one idea: a traced torch model is cut after named blocks into segments
that chain to its output (the ``early_exit`` pass hangs a head after each but the last), and the
early-exit ONNX graph, whose outputs are ``logits``, ``exit_k`` and ``feature_k``, is cut at the
``feature_k`` tensors into one stage graph per segment (the ``cascade`` backend ships them; the
pass times them). :func:`cascade_graph` joins the stage graphs again into one graph with an
``If`` per exit (measured, not shipped: see its docstring). torch is imported only where a torch
model is cut: the backend needs none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx
from onnx import helper

from edgec.errors import CompileError, PassError

if TYPE_CHECKING:
    from torch import fx, nn

NHWC, NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


# ------------------------------------------------------------------- a torch model into segments
def trace(model: nn.Module) -> fx.GraphModule:
    """The model as an FX graph whose nodes remember their module path (``nn_module_stack``)."""
    from torch import fx

    if isinstance(model, fx.GraphModule):
        return model
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:
        raise PassError(f"early_exit needs an FX-traceable model: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0]}") from exc


def _module_paths(node: fx.Node) -> set[str]:
    paths = set(node.meta.get("nn_module_stack", {}))
    if node.op == "call_module":
        paths.add(str(node.target))
    return paths


def auto_points(graph: fx.GraphModule) -> list[str]:
    """Every block of every top-level ``nn.Sequential`` stage, in execution order, except the
    model's last block: the candidate exit points ``after = 'auto'`` chooses from."""
    from torch import nn

    stages, blocks = set(), []  # module types come from the trace's meta: a GraphModule keeps
    for node in graph.graph.nodes:  # leaf modules, not their containers
        for path, kind in node.meta.get("nn_module_stack", {}).values():
            if "." not in path and isinstance(kind, type) and issubclass(kind, nn.Sequential):
                stages.add(path)
            parent = path.rsplit(".", 1)[0]
            if path.count(".") == 1 and parent in stages and path not in blocks:
                blocks.append(path)
    if len(blocks) < 2:
        raise PassError(f"after = 'auto' found {len(blocks)} blocks in nn.Sequential stages; "
                        f"name the blocks to exit after, e.g. after = [\"layer1.2\"]")
    return blocks[:-1]


def boundary_index(nodes: list[fx.Node], name: str) -> int:
    """Index of the last node that belongs to module ``name`` (the block's output)."""
    hits = [i for i, node in enumerate(nodes) if any(p == name or p.startswith(name + ".")
                                                     for p in _module_paths(node))]
    if not hits:
        known = sorted({p for n in nodes for p in _module_paths(n)})
        raise PassError(f"exit point {name!r} is no module of the model; known: "
                        f"{', '.join(known[:20])}{' ...' if len(known) > 20 else ''}")
    return hits[-1]


def split_segments(graph: fx.GraphModule, points: list[str]) -> list[fx.GraphModule]:
    """Cut ``graph`` after each module of ``points`` into len(points) + 1 chained segments."""
    nodes = list(graph.graph.nodes)
    cuts = [boundary_index(nodes, name) for name in points]
    if cuts != sorted(set(cuts)):
        raise PassError(f"exit points {list(points)} are not in execution order; list them in "
                        f"the order the model runs them")
    output = next(n for n in nodes if n.op == "output")
    starts = [0, *[c + 1 for c in cuts]]
    ends = [*cuts, nodes.index(output)]
    segments = []
    for k, (start, end) in enumerate(zip(starts, ends)):
        source = nodes[cuts[k - 1]] if k else next(n for n in nodes if n.op == "placeholder")
        last = output if end == nodes.index(output) else nodes[end]
        where = points[k - 1] if k else "the input"
        segments.append(_segment(graph, source, nodes[start:end + 1], last, where))
    return segments


def _segment(graph, source, body, last, where) -> fx.GraphModule:
    from torch import fx

    new = fx.Graph()
    env = {source: new.placeholder("x")}

    def lookup(node):
        if node in env:
            return env[node]
        if node.op == "get_attr":
            env[node] = new.node_copy(node)
            return env[node]
        raise PassError(f"cannot cut after {where}: {node.name!r} from before the cut is used "
                        f"after it (a skip connection crosses it); exit after another block")

    for node in body:
        if node.op in ("placeholder", "output") or node is source:
            continue
        if node.op == "get_attr" and node not in env:
            env[node] = new.node_copy(node)
            continue
        env[node] = new.node_copy(node, lookup)
    if last.op == "output":
        new.output(fx.node.map_arg(last.args[0], lookup))
    else:
        new.output(lookup(last))
    module = fx.GraphModule(graph, new)
    module.graph.lint()
    return module


# --------------------------------------------------------- the early-exit ONNX graph into stages
def stage_graphs(model: onnx.ModelProto, exits: int, heads: bool = True) -> list[onnx.ModelProto]:
    """Cut the early-exit graph into ``exits + 1`` chained stage graphs.

    Stage k maps the input (or feature k-1) to ``[feature_k, exit_k, confidence_k]``, the last
    stage to ``[logits]``. With ``heads=False`` the stages hold only the backbone (for
    measuring the heads' cost). A feature that quantize wrapped in
    QuantizeLinear→DequantizeLinear is handed over as the uint8 tensor between the pair,
    channels-last (see :func:`_hand_over_nhwc`): both sides then keep exactly the int8 kernels
    of the uncut graph. A float feature is handed over as it is.
    """
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    cuts = [_cut_tensor(f"feature_{k}", producers) for k in range(exits)]
    inputs = [graph.input[0].name, *cuts]
    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model))
    stages = []
    for k in range(exits + 1):
        outputs = [cuts[k], f"exit_{k}"] if k < exits and heads else (
            [cuts[k]] if k < exits else ["logits"])
        try:
            stage = extractor.extract_model([inputs[k]], outputs)
        except Exception as exc:
            raise CompileError(f"cannot cut stage {k} ({inputs[k]} → {outputs}): {exc}") from exc
        stage.ir_version = model.ir_version  # the extractor writes onnx's newest IR version
        if k < exits and heads:
            _add_confidence(stage, f"exit_{k}", _opset(model))
        stages.append(stage)
    for k, cut in enumerate(cuts):
        if producers[cut].op_type == "QuantizeLinear":
            _hand_over_nhwc(stages[k], stages[k + 1], cut, f"handover_{k}")
    return stages


def _cut_tensor(name: str, producers: dict) -> str:
    """Where to cut for feature ``name``: the int8 tensor between QuantizeLinear and
    DequantizeLinear when quantize wrapped the feature in that pair, else the feature."""
    node = producers.get(name)
    if node is None:
        raise CompileError(f"the early-exit graph has no tensor {name!r}; rebuild with early_exit")
    if node.op_type == "DequantizeLinear":
        quant = producers.get(node.input[0])
        if quant is not None and quant.op_type == "QuantizeLinear":
            return node.input[0]
    return name


def _hand_over_nhwc(first: onnx.ModelProto, second: onnx.ModelProto, cut: str,
                    handover: str) -> None:
    """Pass the 4-D int8 tensor ``cut`` from ``first`` to ``second`` as NHWC ``handover``.

    ONNX Runtime runs int8 convolutions channels-last and wraps them in transposes from and to
    NCHW; the transposes added here cancel against those, so no stage transposes the feature
    at the boundary (ResNet-20 on x86: a uint8 NCHW hand-over costs two transposes per cut).
    """
    output = next(o for o in first.graph.output if o.name == cut)
    if len(output.type.tensor_type.shape.dim) != 4:
        return
    first.graph.node.append(helper.make_node("Transpose", [cut], [handover], perm=NHWC))
    output.name = handover
    _permute_dims(output, NHWC)
    source = next(i for i in second.graph.input if i.name == cut)
    second.graph.node.insert(0, helper.make_node("Transpose", [handover], [cut], perm=NCHW))
    source.name = handover
    _permute_dims(source, NHWC)


def _permute_dims(value: onnx.ValueInfoProto, perm: list[int]) -> None:
    dims = value.type.tensor_type.shape.dim
    permuted = [onnx.TensorShapeProto.Dimension() for _ in perm]
    for new, axis in zip(permuted, perm):
        new.CopyFrom(dims[axis])
    for dim, new in zip(dims, permuted):
        dim.CopyFrom(new)


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _add_confidence(stage: onnx.ModelProto, logits: str, opset: int) -> None:
    """Append ``confidence = max(softmax(logits))`` (shape [batch]) as the last output."""
    graph = stage.graph
    graph.node.append(helper.make_node("Softmax", [logits], [f"{logits}_softmax"], axis=1))
    if opset >= 18:
        graph.initializer.append(helper.make_tensor(f"{logits}_axes", onnx.TensorProto.INT64,
                                                    [1], [1]))
        graph.node.append(helper.make_node("ReduceMax", [f"{logits}_softmax", f"{logits}_axes"],
                                           ["confidence"], keepdims=0))
    else:
        graph.node.append(helper.make_node("ReduceMax", [f"{logits}_softmax"], ["confidence"],
                                           axes=[1], keepdims=0))
    graph.output.append(helper.make_tensor_value_info("confidence", onnx.TensorProto.FLOAT,
                                                      ["batch"]))


# ------------------------------------------------------- the stages as one graph with If nodes
def cascade_graph(stages: list[onnx.ModelProto], thresholds: list[float]) -> onnx.ModelProto:
    """The cascade of ``stages`` (cut by :func:`stage_graphs`, heads included) as one ONNX
    graph for batch 1: stage 0, then for each exit k an ``If`` on ``confidence_k >=
    thresholds[k]`` whose then-branch returns exit k's logits and whose else-branch holds the
    rest of the cascade. Outputs ``logits`` and ``exit_index`` (int64 [1]: k for exit k,
    ``len(thresholds)`` for the final output). Each stage keeps its hand-over transposes and
    its initializers in its own branch: ORT's layout transform works graph by graph, and every
    outer-scope value a branch reads is an implicit input the ``If`` passes on each call.

    One runtime session instead of one per stage, measured against the stage graphs the
    ``cascade`` backend ships (``benchmarks/cascade_graph.py``; int8, AMD EPYC, one thread,
    2,000 test images streamed, vs the plain int8 model): ResNet-20 (one exit) −6.0 % against
    −5.6 %, ResNet-56 (three) −12.7 % against −12.1 %; an image past every exit pays 1-2.5
    points less in one graph, one that leaves at the first 0.5-1.5 points more (the ``If``).
    Even, so the backend keeps one graph per stage. With the initializers in the main graph
    and the hand-over transposes dropped, ResNet-56's one graph lost (−0.1 %): past all three
    exits +40.7 % against +16.4 %.
    """
    if len(stages) != len(thresholds) + 1:
        raise CompileError(f"a cascade of {len(stages)} stages needs {len(stages) - 1} "
                           f"thresholds, got {len(thresholds)}")
    last = len(stages) - 1
    bodies, incoming = [], None
    for k, stage in enumerate(stages):
        bodies.append(_merged_stage(stage, k, last, incoming))
        incoming = bodies[-1][1].get("cut")
    logits_type = stages[last].graph.output[0].type.tensor_type
    shape = [d.dim_param or d.dim_value for d in logits_type.shape.dim]
    nodes, final, tensors = bodies[last]
    outputs = (final["logits"], f"stage{last}/exit_index")
    nodes = [*nodes, _index_constant(outputs[1], last)]
    for k in reversed(range(last)):
        nodes, outputs, tensors = _exit_branch(k, bodies[k], thresholds[k],
                                               (nodes, outputs, tensors), shape)
    graph = helper.make_graph(nodes, "cascade", list(stages[0].graph.input),
                              _cascade_outputs("logits", "exit_index", shape), initializer=tensors)
    model = helper.make_model(graph, opset_imports=list(stages[0].opset_import))
    model.ir_version = stages[0].ir_version
    return model


def _exit_branch(k: int, body: tuple, threshold: float, rest: tuple, shape: list):
    """Stage k's nodes, then ``If(confidence_k >= threshold)``: exit k's logits and index k,
    else ``rest`` (nodes, outputs, initializers: the cascade past exit k). Returns the same
    triple for the graph from stage k on."""
    nodes, names, tensors = body
    then = helper.make_graph(
        [helper.make_node("Identity", [names["exit"]], [f"exit_{k}/logits"]),
         _index_constant(f"exit_{k}/exit_index", k)],
        f"exit_{k}", [], _cascade_outputs(f"exit_{k}/logits", f"exit_{k}/exit_index", shape))
    rest_nodes, rest_outputs, rest_tensors = rest
    otherwise = helper.make_graph(rest_nodes, f"past_exit_{k}", [],
                                  _cascade_outputs(*rest_outputs, shape), initializer=rest_tensors)
    outputs = ("logits", "exit_index") if k == 0 else (f"stage{k}/logits_out",
                                                        f"stage{k}/exit_index_out")
    limit = helper.make_tensor(f"exit_{k}_threshold", onnx.TensorProto.FLOAT, [1], [threshold])
    return [*nodes,
            helper.make_node("GreaterOrEqual", [names["confidence"], limit.name],
                             [f"exit_{k}_taken"]),
            helper.make_node("If", [f"exit_{k}_taken"], list(outputs), name=f"exit_{k}_if",
                             then_branch=then, else_branch=otherwise)], outputs, [*tensors, limit]


def _merged_stage(stage: onnx.ModelProto, k: int, last: int, incoming: str | None):
    """Stage k for the merged graph: its nodes and initializers, every name it defines renamed
    ``stage<k>/...`` for k > 0 (SSA across branches: the stages repeat some nodes, e.g. a
    feature's DequantizeLinear, and some constants), its input read from ``incoming``. Returns
    (nodes, names: ``cut`` handed on, ``exit`` and ``confidence``, or ``logits`` for the last
    stage, initializers)."""
    source = stage.graph.input[0].name
    defined = {name for node in stage.graph.node for name in node.output if name} | {
        tensor.name for tensor in stage.graph.initializer}
    prefix = f"stage{k}/" if k else ""

    def renamed(name: str) -> str:
        if k and name == source:
            return incoming
        return prefix + name if name in defined else name

    nodes = []
    for node in stage.graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [renamed(name) if name else name for name in node.input]
        copy.output[:] = [renamed(name) if name else name for name in node.output]
        copy.name = prefix + node.name if node.name else ""
        nodes.append(copy)
    tensors = []
    for tensor in stage.graph.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        copy.name = renamed(tensor.name)
        tensors.append(copy)
    first = stage.graph.output[0].name
    if k == last:
        return nodes, {"logits": renamed(first)}, tensors
    return nodes, {"cut": renamed(first), "exit": renamed(f"exit_{k}"),
                   "confidence": renamed("confidence")}, tensors


def _index_constant(name: str, k: int) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name],
                            value=helper.make_tensor(name, onnx.TensorProto.INT64, [1], [k]))


def _cascade_outputs(logits: str, index: str, shape: list) -> list[onnx.ValueInfoProto]:
    return [helper.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, shape),
            helper.make_tensor_value_info(index, onnx.TensorProto.INT64, [1])]
