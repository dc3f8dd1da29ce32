"""quantize: static post-training quantization with onnxruntime (QDQ, per-channel weights).

Modes:
- ``int8``: int8 weights and activations, calibrated on the calibration split, or, without
  one (or with ``calibration = "datafree"``), on ZeroQ synthetic inputs (edgec.zeroq).
- ``mixed``: weights at 4 or 8 bits per layer (activations 8) chosen by HAWQ-V2 sensitivity
  (edgec.hawq): layers ordered by Hessian-trace sensitivity per byte saved, the size budget
  fixes how many must drop to 4 bits at least, and a bisection over that order finds how many
  can, keeping the top-1 drop measured on held-out calibration-split images inside
  ``accuracy_budget``. int4 weights are stored as ONNX INT4 initialisers (opset >= 21) feeding
  DequantizeLinear; with an older opset onnxruntime emits its com.microsoft Q/DQ ops instead.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgec import hawq, int8, zeroq
from edgec.artifact import Artifact
from edgec.budget import pass_budget
from edgec.config import check_choice
from edgec.cpu import host_cpu, target_cpu
from edgec.data import Dataset, preprocess, to_batches
from edgec.errors import BudgetError, DataError, PassError
from edgec.pipeline import Context, Step
from edgec.space import boolean, choices, float_range

MODES = ("int8", "mixed")
CALIBRATION_SOURCES = ("auto", "data", "datafree")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
# bytes per element when counting weight bytes (onnx.TensorProto data types)
ELEMENT_BYTES = {onnx.TensorProto.INT4: 0.5, onnx.TensorProto.UINT4: 0.5}


@dataclass(frozen=True)
class QuantizeParams:
    """Static PTQ (QDQ). See the module docstring for the modes.

    ``calibration``: "auto" (the calibration split if there is one, else data-free), "data" or
    "datafree" (ZeroQ: ``synthetic_count`` inputs optimised for ``synthetic_steps`` Adam steps).
    Mixed precision: ``bits`` are the allowed weight widths, ``accuracy_budget`` the allowed top-1
    drop in points against the float model on ``holdout_count`` calibration-split images that are
    used for nothing else, ``weight_bytes_budget`` the largest allowed fraction of the int8
    model's weight bytes; Hessian traces use ``hessian_count`` calibration images and
    ``hessian_samples`` Hutchinson probes per batch.

    ``scheme``: the int8 types ("auto": the target backend's policy for the CPU that runs the
    artifact, see edgec.int8; or one of edgec.int8.SCHEMES, e.g. "u8s8-reduce-range").
    """

    mode: str = field(default="int8", metadata=choices(*MODES))
    scheme: str = field(default="auto", metadata=choices("auto", *int8.SCHEMES))
    per_channel: bool = field(default=True, metadata=boolean(when={"mode": "int8"}))
    calibration: str = field(default="auto", metadata=choices("data", "datafree", when={"mode": "int8"}))
    calibration_count: int = 512
    calibration_method: str = field(default="minmax", metadata=choices(*CALIBRATION_METHODS))
    batch: int = 32
    bits: tuple[int, ...] = hawq.WEIGHT_BITS
    accuracy_budget: float = field(default=1.0, metadata=float_range(0.25, 3.0, when={"mode": "mixed"}))
    weight_bytes_budget: float = field(default=0.7, metadata=float_range(0.5, 1.0, when={"mode": "mixed"}))
    holdout_count: int = 2000
    hessian_count: int = 512
    hessian_samples: int = 2
    synthetic_count: int = 32
    synthetic_steps: int = 100

    def __post_init__(self):
        check_choice("mode", self.mode, MODES)
        check_choice("scheme", self.scheme, ("auto", *int8.SCHEMES))
        check_choice("calibration", self.calibration, CALIBRATION_SOURCES)
        check_choice("calibration_method", self.calibration_method, CALIBRATION_METHODS)
        for name in ("calibration_count", "batch", "holdout_count", "hessian_count",
                     "hessian_samples", "synthetic_count", "synthetic_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be >= 1")
        bad = [b for b in self.bits if b not in hawq.WEIGHT_BITS]
        if bad or not self.bits:
            raise ValueError(f"bits {list(self.bits)}: weight bits must be chosen from "
                             f"{list(hawq.WEIGHT_BITS)} (int4 or int8), e.g. bits = [4, 8]")
        if self.accuracy_budget < 0:
            raise ValueError(f"accuracy_budget {self.accuracy_budget} must be >= 0 (top-1 points)")
        if not 0 < self.weight_bytes_budget <= 1:
            raise ValueError(f"weight_bytes_budget {self.weight_bytes_budget} must be in (0, 1] "
                             f"(fraction of the int8 model's weight bytes)")
        if self.mode == "mixed" and not self.per_channel:
            raise ValueError("mode 'mixed' needs per_channel = true (int4 weights need "
                             "per-channel scales)")


class QuantizePass:
    """int8 or mixed int4/int8 static PTQ of an ONNX model (QDQ); see the module docstring."""

    name = "quantize"
    consumes = "onnx"
    produces = "onnx"
    Params = QuantizeParams

    def supports(self, target) -> str | None:
        return None if "int8" in target.precisions else f"target has no int8 ({target.precisions})"

    def run(self, artifact: Artifact, params: QuantizeParams, ctx: Context) -> Artifact:
        path = ctx.workdir / f"{len(artifact.lineage):02d}-quantize.onnx"
        batches, report = calibration_batches(params, ctx)
        choice = int8_choice(params, ctx)
        with tempfile.TemporaryDirectory(prefix="quantize-", dir=ctx.workdir) as scratch:
            quantizer = Quantizer(artifact.payload, batches, params, choice.scheme, Path(scratch),
                                  artifact.extras.get("float_nodes", ()), ctx.cache)
            if params.mode == "int8":
                quantizer.write({}, path)
                bits = {name: 8 for name in quantizer.weights}
            else:
                bits, mixed_report = choose_mixed(quantizer, artifact, params, ctx, path)
                report.update(mixed_report)
        report.update(bits=bits, weight_bytes=weight_bytes(path),
                      float_nodes=len(quantizer.float_nodes), int8_scheme=choice.to_json())
        ctx.progress(f"quantize: {params.mode} {choice.scheme.name} ({report['calibration']}), "
                     f"{sum(b == 4 for b in bits.values())} of {len(bits)} layers at 4 bits")
        precision = "int8" if params.mode == "int8" else "mixed-int4-int8"
        return artifact.derive("onnx", path, Step(self, params).lineage(report),
                               precision=precision, weight_bits=bits, int8=choice.to_json())


def int8_choice(params: QuantizeParams, ctx: Context) -> int8.Int8Choice:
    """The int8 scheme for this build: forced by ``params.scheme``, else the policy of the
    build's backend (or the target's first) for the CPU that runs the artifact. A context
    without a target (a pass run on its own) quantizes for ONNX Runtime on this host."""
    target = ctx.target
    cpu = ctx.cpu or (target_cpu(target) if target is not None else host_cpu())
    backend = ctx.backend or (None if target is not None else "onnxruntime")
    return int8.choose(target, cpu, backend, params.scheme)


def calibration_batches(params: QuantizeParams, ctx: Context) -> tuple[list[np.ndarray], dict]:
    """Pre-processed calibration batches: real images, or ZeroQ synthetic inputs."""
    source = params.calibration
    if source == "auto":
        source = "data" if ctx.calibration is not None else "datafree"
    if source == "data":
        if ctx.calibration is None:
            raise PassError("quantize calibration = 'data' needs a calibration split: give --data "
                            "with a [calibration] table, or set calibration = 'datafree'")
        images = ctx.calibration.head(params.calibration_count)
        report = {"calibration": images.origin, "calibration_images": len(images)}
        return to_batches(images, ctx.input_spec, params.batch), report
    if params.mode == "mixed":
        raise PassError("mode 'mixed' measures accuracy on labelled calibration images; "
                        "data-free calibration works with mode 'int8' only")
    if ctx.baseline is None:
        raise PassError("data-free calibration needs the float torch model (ctx.baseline)")
    synthesis = zeroq.synthesize(ctx.baseline, ctx.input_spec, params.synthetic_count,
                                 params.synthetic_steps, seed=ctx.seed, progress=ctx.progress)
    inputs = synthesis.inputs
    batches = [inputs[i:i + params.batch] for i in range(0, len(inputs), params.batch)]
    return batches, {"calibration": "datafree (ZeroQ)", "calibration_images": len(inputs),
                     "synthesis_seconds": round(synthesis.seconds, 2),
                     "bn_loss_first": round(synthesis.losses[0], 4),
                     "bn_loss_last": round(synthesis.losses[-1], 4)}


class Quantizer:
    """quantize_static on one pre-processed model, with per-layer int4 weight overrides.

    ``scratch`` holds the pre-processed model and the candidate models. ``float_nodes``: names
    of nodes left in float (an earlier pass asked for them in ``extras['float_nodes']``).

    The activation ranges are calibrated once (onnxruntime's ``calibration_cache_path``) and
    reused by every candidate: mixed precision's bisection writes one model per step, and only
    the weights' bits differ. With ``cache`` (:class:`edgec.cache.Cache`) the ranges are kept
    across builds too, keyed by the pre-processed model, the batches, the method and the
    calibrator's options: the raw float ranges do not depend on the int8 types, symmetry or
    per-channel weights, which apply when the model is written.
    """

    def __init__(self, source, batches: list[np.ndarray], params: QuantizeParams,
                 scheme: int8.Int8Scheme, scratch: Path, float_nodes: Sequence[str] = (),
                 cache=None):
        self.batches, self.params, self.scheme, self.scratch = batches, params, scheme, scratch
        self.float_nodes = list(float_nodes)
        self.pre = scratch / "pre.onnx"
        _pre_process(source, self.pre)
        self.ranges = _CalibrationRanges(self, cache)
        graph = onnx.load(str(self.pre)).graph
        self.initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        names = dict.fromkeys(n.input[1] for n in graph.node if n.op_type in QUANTIZED_OPS
                              and len(n.input) > 1 and n.input[1] in self.initializers
                              and n.name not in self.float_nodes)
        self.tensor_names = {layer_name(n): n for n in names}
        self.weights = {layer_name(n): self.initializers[n] for n in names}

    def write(self, bits: dict[str, int], target: Path) -> None:
        """Quantize with the layers of ``bits`` that say 4 stored as int4, the rest int8."""
        from onnxruntime.quantization import QuantType

        overrides = {}
        for layer, b in bits.items():
            if b == 4:
                scales = hawq.channel_scales(self.weights[layer], 4)
                channels = [{"quant_type": QuantType.QInt4, "scale": np.float32(s),
                             "zero_point": np.int8(0)} for s in scales]
                channels[0]["axis"] = 0
                overrides[self.tensor_names[layer]] = channels
        self.ranges.before_write()
        _quantize_static(self.pre, target, self.batches, self.params, self.scheme, overrides,
                         self.float_nodes, self.ranges.path)
        self.ranges.after_write()


class _CalibrationRanges:
    """The file onnxruntime keeps a quantizer's activation ranges in, and its cache entry."""

    def __init__(self, quantizer: Quantizer, cache):
        from edgec.artifact import sha256_file
        from edgec.cache import array_digest, digest, library_versions

        self.path, self.cache = quantizer.scratch / "ranges.json", cache
        extra = quantizer.scheme.ort_options()["extra_options"]
        self.key = digest({  # what reaches the calibrator: not the int8 types, not the weights
            "what": "onnxruntime calibration ranges", "model": sha256_file(quantizer.pre),
            "batches": [array_digest(b) for b in quantizer.batches],
            "method": quantizer.params.calibration_method,
            "calibrator": {k: v for k, v in extra.items() if k.startswith("Calib")},
            "float_nodes": quantizer.float_nodes, "versions": library_versions()})

    def before_write(self) -> None:
        if self.path.is_file() or self.cache is None:
            return
        entry = self.cache.load("evaluations", self.key)
        if entry is not None:
            shutil.copyfile(entry.file("ranges.json"), self.path)

    def after_write(self) -> None:
        if self.cache is not None and self.path.is_file() \
                and self.cache.load("evaluations", self.key) is None:
            self.cache.store("evaluations", self.key, {"what": "calibration ranges"},
                             {"ranges.json": self.path})


def layer_name(tensor: str) -> str:
    """'layer1.0.conv1.weight' → 'layer1.0.conv1' (the torch module the weight belongs to)."""
    return tensor.removesuffix(".weight")


def choose_mixed(quantizer: Quantizer, artifact: Artifact, params: QuantizeParams, ctx: Context,
                 path: Path) -> tuple[dict[str, int], dict[str, Any]]:
    """HAWQ-V2 sensitivity order, size budget, then bisection on the measured held-out drop."""
    calibration, holdout = _calibration_and_holdout(params, ctx)
    model, layers = torch_twin(artifact, ctx, quantizer)
    traces = hessian_traces(model, quantizer, layers, calibration, params, ctx)
    costs = hawq.layer_costs({layer: quantizer.weights[layer] for layer in layers}, traces)
    order = hawq.pareto_order(costs)
    fixed = {layer: 8 for layer in quantizer.weights if layer not in layers}
    work = quantizer.scratch
    int8_path = work / "k0.onnx"
    quantizer.write({}, int8_path)
    int8_bytes = weight_bytes(int8_path)
    holdout_top1 = _holdout_top1(artifact, holdout, ctx)
    reference, budget = holdout_top1(artifact.payload), pass_budget(ctx, params.accuracy_budget)
    measured_on = (f"{len(holdout)} held-out calibration images" if ctx.ledger is None else
                   f"the accuracy budget's {len(ctx.ledger.holdout)} held-out images, "
                   f"{ctx.ledger.spec.view} view")
    drops: dict[int, float] = {}

    def drop(k: int) -> float:
        if k not in drops:
            candidate = work / f"k{k}.onnx"
            quantizer.write({**fixed, **hawq.bits_for(order, k)}, candidate)
            drops[k] = round((reference - holdout_top1(candidate)) * 100, 3)
            ctx.progress(f"quantize: {k} layers at 4 bits → top-1 drop {drops[k]:.2f} points "
                         f"on {measured_on}")
        return drops[k]

    k_min = _fewest_int4_layers(costs, order, int8_bytes * params.weight_bytes_budget, int8_bytes)
    low = len(order) if 8 not in params.bits else k_min
    high = len(order) if 4 in params.bits else 0
    if k_min is None or low > high:
        raise BudgetError(f"weight_bytes_budget {params.weight_bytes_budget} cannot be met with "
                          f"weight bits {list(params.bits)}; raise weight_bytes_budget or allow "
                          f"bits = [4, 8]")
    if drop(low) > budget:
        raise BudgetError(
            f"accuracy_budget {budget:.2f} points cannot be met within "
            f"weight_bytes_budget {params.weight_bytes_budget}: the best achievable top-1 drop "
            f"there is {drops[low]:.2f} points (on {measured_on}, {low} layers at 4 bits); "
            f"raise {'accuracy_budget' if ctx.ledger is None else 'the build budget (--budget)'}"
            f" by {drops[low] - budget:.2f} points or raise weight_bytes_budget")
    k = hawq.largest_passing(low, high, lambda k: drop(k) <= budget)
    shutil.copyfile(work / f"k{k}.onnx", path)
    bits = {layer: {**fixed, **hawq.bits_for(order, k)}[layer] for layer in quantizer.weights}
    return bits, {
        "mode": "mixed", "int8_weight_bytes": int8_bytes,
        "weight_bytes_ratio": round(weight_bytes(path) / int8_bytes, 4),
        "int4_storage": int4_storage(path), "int8_without_torch_twin": sorted(fixed),
        "holdout": holdout.origin if ctx.ledger is None else ctx.ledger.holdout.origin,
        "holdout_fp32_top1": reference, "holdout_drop_points": drops[k],
        "drops_by_int4_layers": {str(n): d for n, d in sorted(drops.items())},
        "hessian_images": calibration.origin, "order": order,
        "avg_hessian_trace": {c.name: c.trace for c in costs},
        "sensitivity_int4": {c.name: c.sensitivity[4] for c in costs},
    }


def int4_storage(path: Path) -> str:
    """How the int4 weights are stored: standard ONNX (opset >= 21) or onnxruntime contrib ops."""
    model = onnx.load(str(path))
    contrib = any(n.op_type == "DequantizeLinear" and n.domain == "com.microsoft"
                  for n in model.graph.node)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if contrib:
        return f"INT4 initialisers + com.microsoft DequantizeLinear (opset {opset} < 21)"
    return f"INT4 initialisers + ONNX DequantizeLinear (opset {opset})"


def _fewest_int4_layers(costs, order, budget_bytes, int8_bytes) -> int | None:
    """Smallest prefix of ``order`` at 4 bits whose predicted weight bytes fit ``budget_bytes``."""
    saved = {c.name: c.bytes_at(8) - c.bytes_at(4) for c in costs}
    size = int8_bytes
    for k, name in enumerate([*order, None]):
        if size <= budget_bytes:
            return k
        if name is not None:
            size -= saved[name]
    return None


def _calibration_and_holdout(params: QuantizeParams, ctx: Context) -> tuple[Dataset, Dataset]:
    """Hessian images (the head of the calibration split) and disjoint held-out images after them."""
    data = ctx.calibration
    start = max(params.calibration_count, params.hessian_count)
    end = start + params.holdout_count
    if len(data) < end:
        raise DataError(f"mixed precision needs {end} calibration images (calibration_count / "
                        f"hessian_count {start} + holdout_count {params.holdout_count}); the "
                        f"calibration split {data.origin} has {len(data)}: lower holdout_count")
    holdout = data.slice(start, end)
    return data.head(params.hessian_count), holdout


def _holdout_top1(artifact: Artifact, holdout, ctx: Context):
    """Top-1 (fraction) of an ONNX file as the budget counts it: on the pass's held-out
    calibration images, or, in a build with an accuracy ledger, on the ledger's slice and view
    (the input's top-1 is then the ledger's count, not a measurement)."""
    ledger = ctx.ledger
    if ledger is None:
        return lambda path: _top1(path, holdout, ctx)

    def top1(path) -> float:
        if path == artifact.payload:
            return ledger.input_top1() / 100
        return ledger.top1(Artifact("onnx", path, extras=artifact.extras)) / 100
    return top1


def torch_twin(artifact: Artifact, ctx: Context, quantizer: Quantizer) -> tuple[Any, list[str]]:
    """The float torch model behind the ONNX graph, and the layers it has a parameter for.

    Prefers ``artifact.extras['torch_model']``; otherwise ``ctx.baseline`` with BatchNorm folded
    (torch.fx fusion keeps the module names, which the legacy exporter keeps as initialiser
    names), its layers resized to the ONNX weights' widths where an earlier pass pruned
    channels. The ONNX initialisers are copied in, so the Hessian is taken at exactly the weights
    that get quantized. Weights an earlier pass added (e.g. ``fuse``'s fixed 0/1 shortcut
    convolutions) have no twin; they stay at 8 bits, where they are exact.
    """
    import torch
    from torch.fx.experimental.optimization import fuse

    from edgec.module_state import resize_to_weights

    source = artifact.extras.get("torch_model") or ctx.baseline
    if source is None:
        raise PassError("mode 'mixed' needs the float torch model for Hessian traces")
    try:
        model = fuse(copy.deepcopy(source).eval())
    except Exception as exc:
        raise PassError(f"mode 'mixed' needs an FX-traceable float model to fold BatchNorm: "
                        f"{type(exc).__name__}: {exc}") from exc
    values = quantizer.initializers
    resize_to_weights(model, values)  # a pruned model's widths, on the unpruned architecture
    params = dict(model.named_parameters())
    layers = [layer for layer, w in quantizer.tensor_names.items()
              if w in params and tuple(params[w].shape) == values[w].shape]
    if not layers:
        raise PassError(
            f"mode 'mixed': no ONNX weight ({list(quantizer.tensor_names.values())[:3]}, ...) "
            f"has a torch parameter of that name and shape in the float model; export after "
            f"'fuse' from the same architecture (a model changed by an earlier pass must be "
            f"passed as artifact.extras['torch_model'])")
    with torch.no_grad():
        for name, value in values.items():
            if name in params and tuple(params[name].shape) == value.shape:
                params[name].copy_(torch.from_numpy(value.copy()))
    return model, layers


def hessian_traces(model, quantizer: Quantizer, layers: list[str], images: Dataset,
                   params: QuantizeParams, ctx: Context) -> dict[str, float]:
    """Average Hessian trace of each quantized layer's weight on calibration images."""
    import torch

    named = dict(model.named_parameters())
    tensors = {layer: named[quantizer.tensor_names[layer]] for layer in layers}
    for p in model.parameters():
        p.requires_grad_(False)
    for t in tensors.values():
        t.requires_grad_(True)
    step = params.batch  # small batches, few probes each: probe noise dominates, not data noise
    batches = [(torch.from_numpy(preprocess(images.images[i:i + step], ctx.input_spec)),
                torch.from_numpy(images.labels[i:i + step]))
               for i in range(0, len(images), step)]
    ctx.progress(f"quantize: Hessian traces on {len(images)} calibration images")
    return hawq.hessian_traces(model, tensors, batches, params.hessian_samples, ctx.seed)


def _top1(path, dataset: Dataset, ctx: Context) -> float:
    from edgec.accuracy import onnx_logits, top1

    return top1(onnx_logits(path, dataset, ctx.input_spec), dataset.labels)


def weight_bytes(path: Path) -> float:
    """Bytes of all initialisers, int4 counted as half a byte (as packed in the ONNX file)."""
    total = 0.0
    for init in onnx.load(str(path)).graph.initializer:
        count = int(np.prod(init.dims)) if init.dims else 1
        size = ELEMENT_BYTES.get(init.data_type)
        if size is None:
            size = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        total += count * size
    return total


def _pre_process(source, target: Path) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(source), str(target), skip_symbolic_shape=True)


def quantize_int8(source, target, batches: list[np.ndarray], params: QuantizeParams,
                  scheme: int8.Int8Scheme, float_nodes: Sequence[str] = ()) -> None:
    """quant_pre_process then quantize_static (QDQ, int8 weights and activations typed by
    ``scheme``), the nodes named in ``float_nodes`` left in float."""
    target = Path(target)
    pre = target.with_suffix(".pre.onnx")
    _pre_process(source, pre)
    _quantize_static(pre, target, batches, params, scheme, float_nodes=float_nodes)
    pre.unlink()


def _quantize_static(pre: Path, target: Path, batches: list[np.ndarray], params: QuantizeParams,
                     scheme: int8.Int8Scheme, overrides: dict | None = None,
                     float_nodes: Sequence[str] = (), ranges: Path | None = None) -> None:
    """quantize_static as QDQ; ``ranges``: onnxruntime's calibration cache file (read when it
    exists, else written after calibrating)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[params.calibration_method]
    options = scheme.ort_options()
    options["extra_options"] = {**options["extra_options"],
                                "TensorQuantOverrides": overrides or {}}
    quantize_static(str(pre), str(target), _Reader(batches), quant_format=QuantFormat.QDQ,
                    per_channel=params.per_channel, calibrate_method=method,
                    nodes_to_exclude=list(float_nodes), calibration_cache_path=ranges,
                    **options)


class _Reader:
    """onnxruntime CalibrationDataReader over pre-processed batches."""

    def __init__(self, batches: list[np.ndarray]):
        self._batches = iter(batches)

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {"input": batch}
