"""Backend ``cascade``: an early-exit model lowered to one ONNX graph per stage.

The ``early_exit`` pass produces one ONNX graph (fp32, or QDQ int8 after ``quantize``) with
outputs ``logits``, ``exit_k`` and ``feature_k``, and describes the cascade in
``artifact.extras['cascade']``. This backend cuts that graph at the ``feature_k`` tensors:
stage k maps the input (or feature k-1) to ``[feature_k, exit_k, confidence_k]``, the last
stage to ``[logits]``; int8 features pass between stages as uint8 NHWC tensors. The
artifact's runner runs stage 0, returns when the confidence reaches the stage's threshold,
else feeds the features to the next stage (edgec/runner/runner.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from edgec.artifact import Artifact
from edgec.errors import CompileError

CASCADE_FILE = "cascade.json"
NHWC, NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


class CascadeBackend:
    name = "cascade"
    consumes = "onnx"

    def supports(self, target) -> str | None:
        if "onnxruntime" not in target.backends:
            return f"the cascade runs on onnxruntime, which target {target.name!r} does not list"
        return None

    def versions(self) -> dict[str, str]:
        import onnxruntime

        return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}

    def compile(self, artifact: Artifact, target, out_dir: Path) -> dict[str, Any]:
        """Write ``stage<k>.onnx`` files and ``cascade.json``; return the manifest's entry."""
        cascade = artifact.extras.get("cascade")
        if artifact.stage != "onnx" or not cascade:
            raise CompileError("backend cascade needs an early-exit ONNX model; put the "
                               "'early_exit' pass in the recipe")
        stages = write_stages(onnx.load(str(artifact.payload)), len(cascade["exits"]), out_dir)
        thresholds = [e["threshold"] for e in cascade["exits"]]
        spec = {"stages": stages, "thresholds": thresholds,
                "exits": [e["after"] for e in cascade["exits"]]}
        (out_dir / CASCADE_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        return {"backend": self.name, "files": [CASCADE_FILE, *stages],
                "thresholds": thresholds, "exits": spec["exits"]}


def stage_graphs(model: onnx.ModelProto, exits: int, heads: bool = True) -> list[onnx.ModelProto]:
    """Cut the early-exit graph into ``exits + 1`` chained stage graphs.

    With ``heads=False`` the stages hold only the backbone (for measuring the heads' cost).
    A feature that quantize wrapped in QuantizeLinear→DequantizeLinear is handed over as the
    uint8 tensor between the pair, channels-last (see :func:`_hand_over_nhwc`): both sides then
    keep exactly the int8 kernels of the uncut graph. A float feature is handed over as it is.
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


def write_stages(model: onnx.ModelProto, exits: int, out_dir: Path) -> list[str]:
    """Write the stage graphs as ``stage0.onnx`` ... and return their file names."""
    names = []
    for k, stage in enumerate(stage_graphs(model, exits)):
        name = f"stage{k}.onnx"
        onnx.save(stage, str(out_dir / name))
        names.append(name)
    return names


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
