"""Features of one built artifact for the latency model: a layer table and per-model facts.

A layer table is a JSON-able list of dicts, one per convolution / fully connected layer in
execution order (per stage for an early-exit cascade)::

    {"name": "/conv1/Conv", "stage": 0, "kind": "conv3x3", "precision": "int8",
     "arithmetic": "u8s8", "per_channel": true,
     "macs": 9216, "weight_bytes": 144.0, "activation_bytes": 1536.0, "bytes": 1680.0,
     "in_channels": 1, "out_channels": 16, "groups": 1, "kernel": [3, 3], "stride": [1, 1]}

``kind`` is ``conv<K>x<K>`` (``conv3x3``, ``conv1x1``, ...), ``depthwise``, ``grouped`` or
``gemm``; ``precision`` is that of the weights (``fp32``, ``fp16``, ``int8``, ``int4``, read
from the QDQ node around the weight); weights are counted at their precision and activations at
theirs (int8 where a DequantizeLinear feeds the layer). ``arithmetic`` is the kernel the runtime
picks, which precision alone does not tell: for int8 layers the signedness of activations and
weights (``u8s8``, ``u8u8``, ``s8s8``, ``s8u8``; one x86 VNNI machine ran one ResNet-20 in
0.36-0.55 ms as u8s8, 0.78-1.18 as u8u8 and 0.88-1.55 as s8s8), else the precision;
``per_channel`` whether the weights carry one scale per output channel; ``activation_zero_point``
(int8 layers of ONNX files, else absent) the zero point of the int8 activations feeding the
layer, which also picks the kernel: on the emulated arm64 board one ResNet-20 ran 75-100 ms
with s8 activations of nonzero zero point and 150-171 ms with symmetric ones (zero point 0),
where the x86 VNNI machine ran both alike. ONNX files are read here
(:func:`layer_table_from_onnx`); artifacts whose files cannot be parsed (ExecuTorch ``.pte``,
TVM ``.so``) need the table the build stores as ``manifest["layers"]``
(:func:`layer_table_from_torch` or :func:`layer_table_from_onnx` at build time).

:func:`artifact_features` adds the per-model facts (backend, threads, size, stages, exit rates,
totals) and :func:`aggregate` turns the features into the named numbers the models fit on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgec.errors import ConfigError, DataError, ModelError

FEATURES_FORMAT = 3  # 3: int8 layers carry their activations' zero point
PRECISIONS = ("fp32", "fp16", "int8", "int4")
# int8 x int8 kernels by (activation, weight) signedness; "int8": int8 weights, float activations
INT8_ARITHMETIC = ("u8s8", "u8u8", "s8s8", "s8u8")
ARITHMETIC = ("fp32", "fp16", *INT8_ARITHMETIC, "int8", "int4")
KINDS = ("conv1x1", "conv3x3", "conv_other", "depthwise", "gemm")
# int8 MACs by their activations' zero point (zero: symmetric s8, or u8 after a ReLU)
ZERO_POINT_COLUMNS = ("macs:zero_point:zero", "macs:zero_point:nonzero")
MAX_EXITS = 4  # exit rates beyond this many exits are summed into the last aggregate column
ELEMENT_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
# ONNX TensorProto data types of a quantized or plain tensor → precision
_ONNX_PRECISION = {1: "fp32", 10: "fp16", 2: "int8", 3: "int8", 21: "int4", 22: "int4"}
_ONNX_SIGN = {2: "u", 3: "s", 21: "u", 22: "s"}
_MANIFEST = "manifest.json"


def layer_entry(name: str, kind: str, precision: str, macs: int, weight_elements: int,
                activation_elements: int, activation_precision: str,
                arithmetic: str | None = None, per_channel: bool = False, **shape: Any) -> dict:
    """One row of a layer table; ``shape`` holds in/out channels, groups, kernel, stride.
    ``arithmetic`` defaults to ``precision`` (give the signedness of int8 x int8 layers)."""
    if precision not in ELEMENT_BYTES or activation_precision not in ELEMENT_BYTES:
        raise ConfigError(f"layer {name!r}: precision {precision!r} / {activation_precision!r} "
                          f"is not one of {', '.join(PRECISIONS)}")
    arithmetic = arithmetic or precision
    if arithmetic not in ARITHMETIC:
        raise ConfigError(f"layer {name!r}: arithmetic {arithmetic!r} is not one of "
                          f"{', '.join(ARITHMETIC)}")
    weight_bytes = weight_elements * ELEMENT_BYTES[precision]
    activation_bytes = activation_elements * ELEMENT_BYTES[activation_precision]
    return {"name": name, "stage": 0, "kind": kind, "precision": precision,
            "arithmetic": arithmetic, "per_channel": bool(per_channel), "macs": int(macs),
            "weight_bytes": weight_bytes, "activation_bytes": activation_bytes,
            "bytes": weight_bytes + activation_bytes, **shape}


def conv_kind(kernel: list[int], groups: int, in_channels: int) -> str:
    """``depthwise`` (one group per input channel), ``grouped``, else ``conv<K>x<K>``."""
    if groups > 1:
        return "depthwise" if groups == in_channels else "grouped"
    return "conv" + "x".join(str(k) for k in kernel)


def kind_group(kind: str) -> str:
    """The aggregate column a layer kind counts in (other kernel sizes and grouped convolutions
    share ``conv_other``)."""
    return kind if kind in KINDS else "conv_other"


# --- ONNX --------------------------------------------------------------------------------------


def layer_table_from_onnx(path: str | Path, stage: int = 0) -> list[dict]:
    """The layer table of an ONNX file (fp32, fp16 or QDQ int8/int4), batch 1."""
    import onnx

    from edgec.analysis import onnx_layer_costs

    costs = {cost.name: cost for cost in onnx_layer_costs(path)}
    graph = onnx.load(str(path), load_external_data=False).graph
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {init.name: init for init in graph.initializer}
    table = []
    for node in graph.node:
        cost = costs.get(node.name)
        if cost is None:
            continue
        weight, weight_sign = _tensor_precision(node.input[1], producers, initializers, "fp32")
        activation, activation_sign = _tensor_precision(node.input[0], producers, initializers,
                                                        "fp16" if weight == "fp16" else "fp32")
        shape = _onnx_shape(node, initializers, producers, cost)
        kind = conv_kind(shape["kernel"], shape["groups"], shape["in_channels"]) \
            if node.op_type == "Conv" else "gemm"
        arithmetic = f"{activation_sign}8{weight_sign}8" \
            if weight == activation == "int8" and activation_sign and weight_sign else weight
        row = layer_entry(node.name, kind, weight, cost.macs, cost.weight_elements,
                          cost.input_elements + cost.output_elements, activation, arithmetic,
                          _per_channel(node.input[1], producers, initializers), **shape)
        zero_point = _zero_point(node.input[0], producers, initializers) \
            if activation == "int8" else None
        table.append({**row, "stage": stage,
                      **({} if zero_point is None else {"activation_zero_point": zero_point})})
    return table


def _dequantize(tensor: str, producers):
    """The DequantizeLinear node that produces ``tensor``, else None."""
    source = producers.get(tensor)
    return source if source is not None and source.op_type == "DequantizeLinear" else None


def _tensor_precision(tensor: str, producers, initializers, plain: str) -> tuple[str, str]:
    """(precision, "u" / "s" for a quantized type else "") of a layer input: the quantized
    type behind a DequantizeLinear, an initialiser's own type, else ``plain``."""
    source = _dequantize(tensor, producers)
    if source is not None:
        for name in (source.input[0], *source.input[2:3]):  # the data, else its zero point
            if name in initializers:
                data_type = initializers[name].data_type
                return _ONNX_PRECISION.get(data_type, "int8"), _ONNX_SIGN.get(data_type, "")
        return "int8", ""
    if tensor in initializers:
        data_type = initializers[tensor].data_type
        return _ONNX_PRECISION.get(data_type, plain), _ONNX_SIGN.get(data_type, "")
    return plain, ""


def _zero_point(tensor: str, producers, initializers) -> int | None:
    """The (per-tensor) zero point of the DequantizeLinear behind a layer input: 0 when it has
    none (ONNX's default), None when there is no such node or its zero point is not a
    constant."""
    from onnx import numpy_helper

    source = _dequantize(tensor, producers)
    if source is None:
        return None
    if len(source.input) < 3 or not source.input[2]:
        return 0
    found = initializers.get(source.input[2])
    return None if found is None else int(numpy_helper.to_array(found).reshape(-1)[0])


def _per_channel(weight: str, producers, initializers) -> bool:
    """Whether the DequantizeLinear behind a weight has one scale per channel."""
    source = _dequantize(weight, producers)
    if source is None or len(source.input) < 2:
        return False
    scale = initializers.get(source.input[1])
    return scale is not None and math.prod(scale.dims) > 1


def _onnx_shape(node, initializers, producers, cost) -> dict[str, Any]:
    """Channels, groups, kernel and stride of a Conv / Gemm / MatMul node."""
    attributes = {a.name: a for a in node.attribute}
    weight = node.input[1]
    source = _dequantize(weight, producers)
    if source is not None:
        weight = source.input[0]
    dims = list(initializers[weight].dims) if weight in initializers else []
    if node.op_type != "Conv":
        transposed = node.op_type == "Gemm" and "transB" in attributes and attributes["transB"].i
        out_features, in_features = (dims[0], dims[1]) if transposed and len(dims) == 2 \
            else (dims[-1] if dims else 0, dims[-2] if len(dims) >= 2 else 0)
        return {"in_channels": int(in_features), "out_channels": int(out_features), "groups": 1,
                "kernel": [], "stride": []}
    groups = attributes["group"].i if "group" in attributes else 1
    declared = attributes["kernel_shape"].ints if "kernel_shape" in attributes else []
    kernel = [int(k) for k in (dims[2:] or declared)]
    stride = list(attributes["strides"].ints) if "strides" in attributes else [1] * len(kernel)
    out_channels = int(dims[0]) if dims else 0
    in_channels = int(dims[1]) * groups if len(dims) > 1 else 0
    return {"in_channels": in_channels, "out_channels": out_channels, "groups": int(groups),
            "kernel": kernel, "stride": [int(s) for s in stride]}


# --- torch -------------------------------------------------------------------------------------


def layer_table_from_torch(model, input_spec, precision: str | Mapping[str, str] = "fp32",
                           int8_arithmetic: str = "s8s8", per_channel: bool = False
                           ) -> list[dict]:
    """The layer table of a torch model's Conv2d / Linear modules for one sample of
    ``input_spec`` (e.g. for an ExecuTorch build, from the float model before lowering).

    ``precision`` is the weights' precision for every layer, or a mapping from module name to
    precision (missing names are fp32); activations of int8 / int4 layers count as int8, and
    int8 layers compute in ``int8_arithmetic`` (XNNPACK's quantizer: signed activations and
    weights) with ``per_channel`` weight scales."""
    import torch

    from edgec.analysis import torch_layer_costs

    modules = dict(model.named_modules())
    table = []
    for cost in torch_layer_costs(model, input_spec):
        module = modules[cost.name]
        weight = precision if isinstance(precision, str) else precision.get(cost.name, "fp32")
        activation = "int8" if weight in ("int8", "int4") else weight
        if isinstance(module, torch.nn.Conv2d):
            kernel = [int(k) for k in module.kernel_size]
            shape = {"in_channels": module.in_channels, "out_channels": module.out_channels,
                     "groups": module.groups, "kernel": kernel,
                     "stride": [int(s) for s in module.stride]}
            kind = conv_kind(kernel, module.groups, module.in_channels)
        else:
            shape = {"in_channels": module.in_features, "out_channels": module.out_features,
                     "groups": 1, "kernel": [], "stride": []}
            kind = "gemm"
        quantized = weight in ("int8", "int4")
        table.append(layer_entry(cost.name, kind, weight, cost.macs, cost.weight_elements,
                                 cost.input_elements + cost.output_elements, activation,
                                 int8_arithmetic if weight == "int8" else weight,
                                 per_channel and quantized, **shape))
    return table


# --- artifacts ---------------------------------------------------------------------------------


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The artifact's manifest.json, or a ModelError naming the directory."""
    path = Path(directory) / _MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{directory} is not an edgec artifact (no {_MANIFEST}); give the "
                         f"directory `edgec build` printed after 'artifact:'") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}); build the artifact again") from None


def artifact_layers(directory: str | Path, manifest: dict[str, Any]) -> list[dict]:
    """The artifact's layer table: ``manifest["layers"]`` when the build stored it, else read
    from its ONNX files (one model, or the stages of a cascade)."""
    if manifest.get("layers"):
        return list(manifest["layers"])
    entry = manifest.get("entry", {})
    files = [name for name in entry.get("files", []) if name.endswith(".onnx")]
    if not files:
        names = ", ".join(entry.get("files", [])) or "no files"
        raise ModelError(
            f"artifact {directory} ({entry.get('backend', '?')} backend: {names}) has no layer "
            f"table: its manifest lacks 'layers' and it holds no ONNX file to read one from; "
            f"build it again with an edgec that stores manifest['layers']")
    return [row for stage, name in enumerate(files)
            for row in layer_table_from_onnx(Path(directory) / name, stage=stage)]


def manifest_exit_rates(manifest: dict[str, Any]) -> list[float]:
    """Fraction of inputs that leave at each exit, from the early_exit step's report (empty for
    a model without exits)."""
    for step in manifest.get("lineage", []):
        if step.get("pass") == "early_exit":
            return [float(e["rate"]) for e in step.get("report", {}).get("exits", [])]
    return []


def artifact_features(directory: str | Path, threads: int = 1,
                      exit_rates: list[float] | None = None) -> dict[str, Any]:
    """Features of one built artifact measured with ``threads`` threads, as a JSON-able dict.

    ``exit_rates`` (fraction of inputs leaving at each exit) overrides the rates the early_exit
    pass chose on its threshold split, e.g. with the histogram a measurement streamed."""
    manifest = read_manifest(directory)
    layers = artifact_layers(directory, manifest)
    stages = max((int(row.get("stage", 0)) for row in layers), default=0) + 1
    rates = manifest_exit_rates(manifest) if exit_rates is None else list(exit_rates)
    if len(rates) != stages - 1:
        raise ModelError(f"artifact {directory} has {stages} stages but {len(rates)} exit "
                         f"rates; give one rate per exit ({stages - 1})")
    return {
        "format": FEATURES_FORMAT, "artifact": manifest.get("hash", ""),
        "backend": manifest.get("entry", {}).get("backend", "?"), "threads": int(threads),
        "size_bytes": int(manifest.get("size_bytes", 0)), "stages": stages,
        "exit_rates": rates, "macs": sum(int(row["macs"]) for row in layers),
        "bytes": float(sum(row["bytes"] for row in layers)), "layers": layers,
    }


def profile_features(directory: str | Path, threads: int = 1) -> dict[str, Any] | None:
    """:func:`artifact_features` for a profile record, or None when the artifact's layers are
    unknown (a measurement is recorded either way; the latency model skips it)."""
    try:
        return artifact_features(directory, threads)
    except (ConfigError, DataError, ModelError):
        return None


# --- aggregate features ------------------------------------------------------------------------


def stage_reach(features: dict[str, Any]) -> list[float]:
    """Probability that an input runs each stage: 1, then 1 minus the rates of earlier exits."""
    reach, left = [], 1.0
    for k in range(int(features["stages"])):
        reach.append(max(left, 0.0))
        if k < len(features["exit_rates"]):
            left -= float(features["exit_rates"][k])
    return reach


def aggregate_names() -> tuple[str, ...]:
    """Names of the numbers :func:`aggregate` returns, in a fixed order."""
    names = ["intercept", "stage_calls"]
    names += [f"macs:{a}:{k}" for a in ARITHMETIC for k in KINDS]
    names += [f"bytes:{a}" for a in ARITHMETIC] + [f"layers:{a}" for a in ARITHMETIC]
    names += ["macs:per_channel", *ZERO_POINT_COLUMNS] + [f"macs_kind:{k}" for k in KINDS]
    names += ["macs", "bytes", "layers", "plain_macs", "size_bytes", "threads", "stages",
              "mean_out_channels", "min_out_channels"]
    return tuple(names + [f"exit_rate:{k}" for k in range(MAX_EXITS)])


def aggregate(features: dict[str, Any]) -> dict[str, float]:
    """Per-model numbers the latency models fit on; layer sums are expected values per inference
    (each layer weighted by the probability that its stage runs)."""
    check_features(features)
    reach = stage_reach(features)
    values = dict.fromkeys(aggregate_names(), 0.0)
    values.update(intercept=1.0, stage_calls=sum(reach), size_bytes=float(features["size_bytes"]),
                  threads=float(features["threads"]), stages=float(features["stages"]))
    channels = []
    for row in features["layers"]:
        weight = reach[int(row.get("stage", 0))]
        arithmetic, kind = row["arithmetic"], kind_group(row["kind"])
        per_channel = row["macs"] if row["per_channel"] else 0
        zero_point = _zero_point_column(row)
        for name, amount in ((f"macs:{arithmetic}:{kind}", row["macs"]),
                             (f"bytes:{arithmetic}", row["bytes"]), (f"layers:{arithmetic}", 1),
                             ("macs:per_channel", per_channel),
                             *([(zero_point, row["macs"])] if zero_point else []),
                             (f"macs_kind:{kind}", row["macs"]), ("macs", row["macs"]),
                             ("bytes", row["bytes"]), ("layers", 1)):
            values[name] += weight * float(amount)
        values["plain_macs"] += float(row["macs"])
        channels.append((float(row["macs"]), float(row.get("out_channels", 0))))
    values.update(_channel_summary(channels))
    for k, rate in enumerate(features["exit_rates"]):
        values[f"exit_rate:{min(k, MAX_EXITS - 1)}"] += float(rate)
    return values


def _zero_point_column(row: dict[str, Any]) -> str | None:
    """Where an int8 layer's MACs count by its activations' zero point: two columns, not one,
    so that a non-negative fit can make either kernel the dearer one."""
    if row.get("activation_zero_point") is None:
        return None
    return ZERO_POINT_COLUMNS[0] if row["activation_zero_point"] == 0 else ZERO_POINT_COLUMNS[1]


def _channel_summary(channels: list[tuple[float, float]]) -> dict[str, float]:
    """MAC-weighted mean and minimum of the layers' output channels."""
    macs = sum(m for m, _ in channels)
    if not channels or macs <= 0:
        return {"mean_out_channels": 0.0, "min_out_channels": 0.0}
    return {"mean_out_channels": sum(m * c for m, c in channels) / macs,
            "min_out_channels": min(c for _, c in channels)}


def check_features(features: Any, origin: str = "features") -> None:
    """Raise a DataError unless ``features`` is what :func:`artifact_features` returns."""
    if not isinstance(features, dict) or features.get("format") != FEATURES_FORMAT:
        found = features.get("format") if isinstance(features, dict) else type(features).__name__
        raise DataError(f"{origin}: latency features of format {found!r}, this edgec reads "
                        f"format {FEATURES_FORMAT}; measure the configuration again")
    missing = [k for k in ("backend", "threads", "size_bytes", "stages", "exit_rates", "layers")
               if k not in features]
    if missing:
        raise DataError(f"{origin}: latency features lack {', '.join(missing)}; measure the "
                        f"configuration again")
    for row in features["layers"]:
        if row.get("precision") not in ELEMENT_BYTES or not math.isfinite(float(row["macs"])) \
                or row.get("arithmetic") not in ARITHMETIC:
            raise DataError(f"{origin}: layer {row.get('name')!r} has precision "
                            f"{row.get('precision')!r}, arithmetic {row.get('arithmetic')!r}; "
                            f"known: {', '.join(PRECISIONS)} / {', '.join(ARITHMETIC)}")
