"""early_exit: exit heads after chosen blocks, thresholds from an accuracy budget, a cascade.

Consumes a torch model, produces one ONNX graph whose outputs are the final ``logits``, each
head's ``exit_k`` and the ``feature_k`` maps the later stages start from, plus
``extras['cascade']`` (exit points, thresholds, rates). A following ``quantize`` pass quantizes
that one graph, so every stage is calibrated on the real stage inputs of the calibration split;
the ``cascade`` backend then cuts it into one ONNX graph per stage.

Steps: (1) cut the model after each candidate exit point; (2) train a small head per candidate
on cached features of the frozen backbone, distilling from the final logits; (3) optionally
fine-tune backbone and heads jointly, distilling from the original model; (4) measure each
segment's and head's latency and what a stage boundary costs, with ONNX Runtime on the build's
device (``ctx.device``: the board given with --device, else this machine); (5) on training
images disjoint from those of step 2, choose the exits greedily and their max-softmax
thresholds so that the expected latency is lowest with a top-1 drop within ``budget`` points of
the input model (what joint fine-tuning cost is spent from the same budget); exits that never
fire are dropped; (6) stream the chosen cascade, the cascade without each of its exits and the
plain model over threshold-split images in order on the same device, taking turns round by
round: keep the fastest cascade; while none is faster than the plain model, drop the exit the
cost model values least and choose again among the rest. The stream's measured saving is the
pass's ``expected_saving``; the cost model's is reported beside it (``model_saving``).

Joint fine-tuning trains far better with BatchNorm than on a folded backbone: put
``fuse`` with ``fold_bn = false`` before this pass; the stages are folded for deployment here.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import torch
from torch import nn

from edgec import exits as ee
from edgec.accuracy import VIEWS, check_view, top1, view_top1
from edgec.analysis import count_macs
from edgec.artifact import Artifact
from edgec.budget import pass_budget
from edgec.config import check_choice
from edgec.data import AUGMENTS, Dataset, preprocess
from edgec.devices import LocalDevice
from edgec.errors import BudgetError, PassError
from edgec.onnx_export import export_onnx
from edgec.pipeline import Context, Step
from edgec.runner import runner
from edgec.space import choices, int_range
from edgec.stage_timing import CascadeStream, StageCall, StageTimingPlan
from edgec.stages import auto_points, split_segments, stage_graphs, trace
from edgec.train import distill

COST_PRECISIONS = ("fp32", "int8")
THRESHOLD_TARGETS = ("labels", "agreement")
STREAM_IMAGES = 100  # calibration images streamed to measure what a stage boundary costs
# The chosen cascade is checked against the plain model on this many threshold-split images,
# in order, the rounds interleaved: ResNet-56's exits lost on the stream what stage-by-stage
# costs promised (later stages run cold after images that left early).
CHECK_IMAGES = 500
CHECK_ROUNDS = 15
# The backbone usually arrives with BatchNorm folded (fuse runs first); without clipping, SGD
# on it diverged within ten steps at lr 0.005 (ResNet-20, six fresh heads).
FINETUNE_MAX_GRAD_NORM = 2.0


@dataclass(frozen=True)
class EarlyExitParams:
    """Where exits go, how heads are trained, and the accuracy budget.

    ``after``: the candidate exit points, module names of blocks in execution order, or "auto"
    (every block of every top-level nn.Sequential stage but the model's last block). Every
    candidate gets a head; greedy forward selection on the threshold split then keeps at most
    ``max_exits`` of them, each added only if it lowers the expected latency. ``head``: "linear"
    (pool + linear), "mlp" (pool + linear + ReLU + linear) or "conv" (3×3 stride-2 conv + pool +
    linear), with adaptive pooling to ``pool``×``pool`` and ``head_width`` hidden
    units/channels (0: default).
    ``budget``: allowed top-1 drop in points on the threshold split. ``thresholds``: fixed
    per-exit thresholds instead of the budget search (exits are then all kept).
    ``train_count`` / ``threshold_count``: disjoint slices of the calibration split for head
    training and threshold choice; the heads first train on cached frozen-backbone features of
    the first ``cache_count`` of the training images. ``finetune_epochs`` /
    ``finetune_seconds``: joint fine-tuning of backbone and heads (0: off; the time limit stops
    it early) with SGD at ``finetune_lr`` (cosine), every exit's loss weighted 1 and the final
    output's ``final_weight``, on ``finetune_augment`` (see ``edgec.data.AUGMENTS``; empty: the
    data's own). What the fine-tune cost the final output is measured on the threshold split in
    ``finetune_cost_view``: "shifted" (:func:`edgec.accuracy.shifted`) for a backbone that
    memorised its training split, where the plain view overstates the cost (ResNet-20, 18
    epochs on crop-flip-shifted: 1.3 points on held-out training images, 0.1 on the test split).
    ``refit_epochs``: after the joint fine-tune (if any), train every head afresh for this
    many epochs on the backbone's frozen features of all ``train_count`` images, distilled from
    its final output (0: keep the heads as trained). The joint fine-tune moves the
    features the first heads were fitted to, and its heads share the backbone's gradient:
    refitted, ResNet-20's cascade streamed 11.3 % below int8 against 7.4 % (exit-int8, AMD EPYC).
    ``finetune_heads``: fine-tune only this many candidates (0: all), evenly spaced over those
    past the model's first top-level stage; the others are dropped. Every head's loss pulls
    the backbone: first-stage heads (ResNet-20/56: at most 51 % test top-1, never chosen) would
    pull it for exits that never pay, and neighbouring heads are near duplicates.
    ``cost_precision``: measure stage costs on the fp32 or the int8 (quantized) stage graphs.
    ``threshold_target``: what an output is judged against on the threshold split. "labels":
    the true labels, the cascade's top-1 within ``budget`` points of the reference; "agreement":
    the final output's own class, the cascade's agreement with it within ``budget`` points of
    100 % (the split's labels are not read: thresholds for unlabelled data). A cascade's top-1
    falls by at most its disagreement, so the agreement budget also bounds the top-1 drop.
    """

    after: tuple[str, ...] | str = "auto"
    head: str = field(default="mlp", metadata=choices(*ee.HEAD_KINDS))
    pool: int = 2
    head_width: int = 0
    budget: float = field(default=1.0, metadata=choices(0.5, 1.0, 2.0))
    thresholds: tuple[float, ...] = ()
    max_exits: int = field(default=3, metadata=int_range(1, 4))
    train_count: int = 10000
    threshold_count: int = 5000
    cache_count: int = 10000
    epochs: int = 4
    lr: float = 3e-3
    temperature: float = 2.0
    finetune_epochs: float = 0.0
    finetune_seconds: float = 0.0
    finetune_lr: float = 0.001
    final_weight: float = 1.0
    finetune_augment: str = ""
    finetune_cost_view: str = "plain"
    finetune_heads: int = 0
    refit_epochs: int = 0
    cost_precision: str = "fp32"
    cost_repeats: int = 200
    threshold_target: str = "labels"
    opset: int = 17

    def __post_init__(self):
        if isinstance(self.after, str) and self.after != "auto":
            raise ValueError(f"after = {self.after!r}: give a list of block names or 'auto'")
        if not isinstance(self.after, str) and not self.after:
            raise ValueError("after = []: name at least one block to exit after, or 'auto'")
        if self.head not in ee.HEAD_KINDS:
            raise ValueError(f"head {self.head!r} unknown; use one of {ee.HEAD_KINDS}")
        if self.pool < 1 or self.head_width < 0:
            raise ValueError(f"pool {self.pool} must be >= 1 and head_width {self.head_width} >= 0")
        if self.budget < 0:
            raise ValueError(f"budget {self.budget} must be >= 0 (top-1 points)")
        if any(t < 0 for t in self.thresholds):
            raise ValueError(f"thresholds {self.thresholds} must be >= 0 (above 1: never exit)")
        if min(self.train_count, self.threshold_count, self.cache_count, self.epochs,
               self.max_exits) < 1:
            raise ValueError("train_count, threshold_count, cache_count, epochs and max_exits "
                             "must be >= 1")
        for name in ("finetune_epochs", "finetune_seconds", "finetune_heads", "refit_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 0")
        if self.finetune_lr <= 0 or self.final_weight <= 0:
            raise ValueError(f"finetune_lr {self.finetune_lr} and final_weight "
                             f"{self.final_weight} must be > 0")
        check_choice("cost_precision", self.cost_precision, COST_PRECISIONS)
        check_choice("threshold_target", self.threshold_target, THRESHOLD_TARGETS)
        if self.finetune_augment:
            check_choice("finetune_augment", self.finetune_augment, AUGMENTS)
        check_choice("finetune_cost_view", self.finetune_cost_view, VIEWS)
        if self.cost_repeats < 5:
            raise ValueError(f"cost_repeats {self.cost_repeats} must be >= 5")


class EarlyExitPass:
    name = "early_exit"
    consumes = "torch"
    produces = "onnx"
    Params = EarlyExitParams

    def supports(self, target) -> str | None:
        if "onnxruntime" not in target.backends:
            return "the early-exit cascade runs on onnxruntime, which the target does not list"
        return None

    def run(self, artifact: Artifact, params: EarlyExitParams, ctx: Context) -> Artifact:
        params = replace(params, budget=pass_budget(ctx, params.budget))  # the ledger's cap
        head_data, choice_data = _splits(ctx.calibration, params)
        if params.finetune_epochs:
            check_view("finetune_cost_view", params.finetune_cost_view, ctx.input_spec.shape)
        graph = copy.deepcopy(trace(artifact.payload))  # fine-tuning must not touch the input
        points = auto_points(graph) if params.after == "auto" else list(params.after)
        if params.thresholds and len(params.thresholds) != len(points):
            raise PassError(f"thresholds {params.thresholds} give {len(params.thresholds)} "
                            f"values for {len(points)} exits {points}; give one per exit")
        model, macs = _build(graph, points, params, ctx)
        if params.finetune_epochs and params.finetune_heads and not params.thresholds:
            model, points, macs = _finetune_candidates(model, points, macs, ctx, params.finetune_heads)
        ctx.progress(f"early_exit: training {len(points)} heads on "
                     f"{min(len(head_data), params.cache_count)} images")
        started = time.perf_counter()
        _train_heads(model, head_data.head(min(len(head_data), params.cache_count)),
                     params.epochs, params, ctx)
        finetuned = _finetune(model, artifact.payload, head_data, params, ctx)
        refit = _refit_heads(model, head_data, params, ctx) if params.refit_epochs else {}
        deploy = model.deployable()
        combined = onnx.load_from_string(_export(deploy, params, ctx))
        costs = measure_costs(combined, len(points), params, ctx)
        ctx.progress(f"early_exit: choosing exits and thresholds among {len(points)} candidates")
        outputs = run_graph(combined, choice_data, ctx.input_spec, len(points), features=False)
        judged = threshold_targets(choice_data, outputs[0], params.threshold_target)
        reference, spent = _reference_top1(artifact.payload, model, outputs[0], choice_data,
                                           judged.labels, finetuned, params, ctx)
        kept, thresholds = _choose(outputs, judged.labels, costs, reference, params)
        stream = None
        if kept and not params.thresholds:  # fixed thresholds: the user's cascade, kept as is
            kept, thresholds, stream = check_on_stream(deploy, points, outputs, judged, costs,
                                                       reference, (kept, thresholds), params,
                                                       ctx)
        choice = evaluate_choice([outputs[0], *[outputs[1 + k] for k in kept]],
                                 judged.labels, thresholds, costs.subset(kept))
        choice["reference_top1"] = reference
        choice["model_saving"] = choice["expected_saving"]
        if stream is not None:
            choice["expected_saving"] = stream["measured_saving"] if kept else 0.0
        if finetuned:
            finetuned = {**finetuned, "cost_points": round(spent, 3),
                         "cost_view": params.finetune_cost_view}
        path = ctx.workdir / f"{len(artifact.lineage):02d}-early_exit.onnx"
        exported = _export(deploy.keep(kept), params, ctx)
        path.write_bytes(exported)
        cascade = {"exits": [{"after": points[k], "threshold": t, "rate": rate,
                              "head_macs": macs["heads"][k]}
                             for k, t, rate in zip(kept, thresholds, choice["rates"])],
                   "expected_saving": choice["expected_saving"]}
        report = {**_report(points, kept, thresholds, outputs, choice, costs, macs, head_data,
                            judged, finetuned, time.perf_counter() - started),
                  "costs_measured_on": cost_device(ctx).name, "stream": stream, "refit": refit}
        ctx.progress(f"early_exit: {len(kept)} exits {[points[k] for k in kept]}, expected "
                     f"saving {choice['expected_saving'] * 100:.1f} %")
        return artifact.derive("onnx", path, Step(self, params).lineage(report), cascade=cascade,
                               float_nodes=ee.head_node_names(onnx.load_from_string(exported)))


def threshold_targets(data: Dataset, final_logits: np.ndarray, target: str) -> Dataset:
    """The threshold split with the labels its outputs are judged against: its own labels, or
    for "agreement" the final output's classes (see ``EarlyExitParams.threshold_target``)."""
    if target == "labels":
        return data
    return replace(data, labels=np.argmax(final_logits, 1).astype(data.labels.dtype),
                   origin=f"{data.origin} (agreement with the final output)")


def _reference_top1(source, model: ee.ExitModel, final_logits, data: Dataset, targets,
                    finetuned: dict, params, ctx) -> tuple[float, float]:
    """(the top-1 the budget counts from on the threshold split, judged against ``targets``,
    and the points joint fine-tuning spent). The budget counts from the pass's input model, so
    what the fine-tune cost the final output (on ``data``'s labels, in ``finetune_cost_view``)
    is spent from it: the reference is the fine-tuned final output's own top-1 plus that cost
    (a negative cost counts as 0)."""
    final_top1 = top1(final_logits, targets)
    if not finetuned or params.thresholds:
        return final_top1, 0.0
    view, spec = params.finetune_cost_view, ctx.input_spec
    before = view_top1(source.eval(), data, spec, view, ctx.seed)
    after = final_top1 if view == "plain" else view_top1(
        nn.Sequential(*model.segments).eval(), data, spec, view, ctx.seed)
    spent = (before - after) * 100
    if spent > params.budget:
        raise BudgetError(f"joint fine-tuning alone cost the final output {spent:.2f} top-1 "
                          f"points on {data.origin} ({view} view), over budget = "
                          f"{params.budget}; raise final_weight, lower finetune_lr or set "
                          f"finetune_epochs = 0")
    # A fine-tune that reads better in the view does not add budget: on ResNet-56 the shifted
    # view read -0.45 points, and a cascade given that slack fell 1.35 points below fp32 on test.
    return final_top1 + max(spent, 0.0) / 100, spent


def _choose(outputs, labels, costs: ee.CostModel, reference_top1: float,
            params) -> tuple[list[int], list[float]]:
    """(candidate indices kept, their thresholds): fixed thresholds keep every exit."""
    if params.thresholds:
        return list(range(len(params.thresholds))), list(params.thresholds)
    return ee.select_exits(outputs[1:], outputs[0], labels, costs, params.budget,
                           params.max_exits, reference_top1)


def _splits(calibration: Dataset | None, params: EarlyExitParams) -> tuple[Dataset, Dataset]:
    """Head-training and threshold-choice slices of the calibration split, disjoint."""
    if calibration is None:
        raise PassError("early_exit needs training data: give --data with a [calibration] split")
    need = params.train_count + params.threshold_count
    if len(calibration) < need:
        raise PassError(f"early_exit needs train_count + threshold_count = {need} calibration "
                        f"images, {calibration.origin} has {len(calibration)}; lower them")
    return (calibration.slice(0, params.train_count),
            calibration.slice(params.train_count, need))


def _build(graph, points, params, ctx) -> tuple[ee.ExitModel, dict]:
    """Segments with fresh heads; checks that the segments chain to the original output."""
    segments = split_segments(graph, points)
    torch.manual_seed(ctx.seed)
    x = torch.from_numpy(preprocess(ctx.calibration.images[:4], ctx.input_spec))
    heads, macs = [], {"segments": [], "heads": []}
    feature = x
    for segment in segments[:-1]:
        seg_macs, feature = count_macs(segment, feature)
        head = ee.make_head(params.head, tuple(feature.shape[1:]), _classes(graph, x),
                            params.pool, params.head_width)
        macs["segments"].append(seg_macs)
        macs["heads"].append(count_macs(head.eval(), feature)[0])
        heads.append(head)
    macs["segments"].append(count_macs(segments[-1], feature)[0])
    model = ee.ExitModel(segments, heads).eval()
    with torch.no_grad():
        error = (model(x)[0] - graph(x)).abs().max().item()
    if error > 1e-4:
        raise PassError(f"the stages cut at {points} do not chain to the model's output "
                        f"(max difference {error:.2e}); choose other exit points")
    return model, macs


def _classes(graph, x) -> int:
    with torch.no_grad():
        return int(graph(x[:1]).shape[1])


def _export(model: ee.ExitModel, params, ctx) -> bytes:
    """ONNX bytes of the early-exit model, its outputs named as ``ExitModel.output_names``."""
    return export_onnx(model, ctx.input_spec, params.opset, output_names=model.output_names())


def _train_heads(model: ee.ExitModel, data: Dataset, epochs: int, params, ctx,
                 fresh: bool = False) -> None:
    """Every head trained for ``epochs`` on the model's own frozen features of ``data``,
    distilled from its final output; ``fresh``: new heads first."""
    k = len(model.heads)
    combined = onnx.load_from_string(_export(model.deployable(), params, ctx))
    # Every core: ResNet-56's features of 45,000 images took 117 s on one thread, 66 on two.
    outputs = run_graph(combined, data, ctx.input_spec, k, features=True, threads=0)
    teacher, features = outputs[0], outputs[1 + k:]
    for j in range(k):
        if fresh:
            torch.manual_seed(ctx.seed + j)
            model.heads[j] = ee.make_head(params.head, features[j].shape[1:], teacher.shape[1],
                                          params.pool, params.head_width)
        settings = ee.TrainSettings(epochs, params.lr,
                                    temperature=params.temperature, seed=ctx.seed + j)
        ee.train_head(model.heads[j], features[j], teacher, data.labels, settings)
    model.eval()


def _refit_heads(model: ee.ExitModel, data: Dataset, params, ctx) -> dict:
    """Fresh heads on the fine-tuned backbone (``EarlyExitParams.refit_epochs``)."""
    ctx.progress(f"early_exit: refitting {len(model.heads)} heads on the backbone's features "
                 f"of {len(data)} images")
    started = time.perf_counter()
    _train_heads(model, data, params.refit_epochs, params, ctx, fresh=True)
    return {"epochs": params.refit_epochs, "images": len(data),
            "seconds": round(time.perf_counter() - started, 1)}


def _finetune_candidates(model: ee.ExitModel, points, macs, ctx, count: int):
    """(model, points, MACs) with ``count`` candidates kept for the joint fine-tune: evenly
    spaced over those past the first top-level stage (all of them when the first stage holds
    every candidate)."""
    first = points[0].split(".")[0]
    later = [k for k, point in enumerate(points) if point.split(".")[0] != first] or \
        list(range(len(points)))
    kept = sorted({later[round(i)] for i in np.linspace(0, len(later) - 1, min(count, len(later)))})
    ctx.progress(f"early_exit: fine-tuning the heads after {[points[k] for k in kept]}")
    return (model.keep(kept), [points[k] for k in kept],
            {"segments": ee.merge_segments(macs["segments"], kept),
             "heads": [macs["heads"][k] for k in kept]})


def _finetune(model: ee.ExitModel, source, data: Dataset, params, ctx) -> dict:
    """Backbone and heads trained together, every output distilled from the original model."""
    if not params.finetune_epochs:
        return {}
    teacher = ctx.baseline if ctx.baseline is not None else copy.deepcopy(source)
    ctx.progress("early_exit: fine-tuning backbone and heads jointly")
    weights = (params.final_weight, *[1.0] * len(model.heads))
    result = distill(ee.ExitLogits(model), teacher.eval(), data, ctx.input_spec,
                     epochs=params.finetune_epochs, time_budget_s=params.finetune_seconds or
                     float("inf"), lr=params.finetune_lr, temperature=params.temperature,
                     alpha=0.7, seed=ctx.seed, progress=ctx.progress, weights=weights,
                     max_grad_norm=FINETUNE_MAX_GRAD_NORM,
                     augment=params.finetune_augment or None)
    model.eval()
    return result.to_json()


def run_graph(combined: onnx.ModelProto, data: Dataset, spec, exits: int, features: bool,
              batch: int = 100, threads: int = 1) -> list[np.ndarray]:
    """Run the early-exit graph over ``data``: [logits, exit_0.., (feature_0.. as float16)];
    ``threads``: ONNX Runtime's intra-op threads (0: its default, every physical core)."""
    session = runner.ort_session(combined.SerializeToString(), threads=threads)
    names = ["logits", *[f"exit_{k}" for k in range(exits)]]
    names += [f"feature_{k}" for k in range(exits)] if features else []
    chunks = [[] for _ in names]
    for i in range(0, len(data), batch):
        outputs = session.run(names, {"input": preprocess(data.images[i:i + batch], spec)})
        for store, (name, out) in zip(chunks, zip(names, outputs)):
            store.append(out.astype(np.float16) if name.startswith("feature") else out)
    return [np.concatenate(c) for c in chunks]


def measure_costs(combined: onnx.ModelProto, exits: int, params, ctx) -> ee.CostModel:
    """Batch-1 latency (ms) of each backbone segment, each head and each stage boundary,
    measured on ``ctx.device`` (this machine when None), where the cascade will run.

    Heads and the split of time between segments come from each stage graph run alone. The
    boundary cost (``call``: one more runtime call and the feature's hand-over) comes from
    streaming calibration images through all bare stages against the uncut model, as the
    cascade runs on the board; run alone, a stage looks up to three times cheaper to add.
    Segments are scaled so that the plain cost equals the uncut model's streamed time.
    """
    if params.cost_precision == "int8":
        combined = _quantized(combined, ctx)
    times = cost_device(ctx).time_stages(cost_plan(combined, exits, params, ctx))
    bare_ms, full_ms = times.calls_ms[:exits + 1], times.calls_ms[exits + 1:]
    plain, chained = times.streams_ms
    boundary = max((chained - plain) / max(exits, 1), 0.0)
    scale = max(plain - boundary, 1e-4) / sum(bare_ms)
    return ee.CostModel(segments=tuple(t * scale for t in bare_ms),
                        heads=tuple(max(f - b, 0.0) for f, b in zip(full_ms, bare_ms)),
                        call=boundary)


def check_on_stream(deploy: ee.ExitModel, points, outputs, data: Dataset, costs: ee.CostModel,
                    reference: float, chosen: tuple[list[int], list[float]], params,
                    ctx) -> tuple[list[int], list[float], dict]:
    """Stream the chosen cascade against the plain model, and beside it the cascade without
    each of its exits (thresholds chosen again among the rest, :func:`stream_savings`). Where a
    cascade without an exit streams faster, take it and check again; while no variant is
    faster than the plain model, drop the kept exit the cost model values least and choose
    again among the other candidates. Returns (kept, thresholds, the record of every check and
    what was dropped)."""
    kept, thresholds = chosen
    candidates, checks, dropped = list(range(len(points))), [], []
    while kept:
        variants = [(kept, thresholds), *_without_each(kept, thresholds, outputs, data.labels,
                                                       costs, reference, params)]
        measured = stream_savings(deploy, variants, data, params, ctx)
        round_checks = [_check_record(points, variant, found, outputs, data, costs)
                        for variant, found in zip(variants, measured)]
        checks += round_checks
        best = max(range(len(variants)), key=lambda i: measured[i]["measured_saving"])
        for record in round_checks:
            ctx.progress(f"early_exit: streamed {record['exits']}: measured saving "
                         f"{record['measured_saving'] * 100:.1f} %, cost model "
                         f"{record['model_saving'] * 100:.1f} %")
        if best == 0 and measured[0]["measured_saving"] > 0:
            round_checks[0]["chosen"] = True
            break
        if best > 0 and measured[best]["measured_saving"] > 0:
            dropped += [points[k] for k in kept if k not in variants[best][0]]
            kept, thresholds = variants[best]
            continue
        worst = _least_valuable(kept, thresholds, outputs, costs, len(data))
        dropped.append(points[worst])
        candidates.remove(worst)
        kept, thresholds = _choose_among(candidates, outputs, data.labels, costs, reference,
                                         params)
    saving = next((c["measured_saving"] for c in checks if c.get("chosen")), 0.0)
    return kept, thresholds, {"images": min(len(data), CHECK_IMAGES), "checks": checks,
                              "dropped": dropped, "measured_saving": saving}


def _without_each(kept, thresholds, outputs, labels, costs: ee.CostModel, reference: float,
                  params) -> list[tuple[list[int], list[float]]]:
    """The cascade without each of its exits in turn (none for a single exit), the others'
    thresholds chosen again, since the budget the dropped exit spent is free for them; where
    the cost model would then let none of them fire, with their thresholds as they were (the
    stream, not the cost model, judges the variant) if that stays inside the budget."""
    variants = []
    for j in range(len(kept)) if len(kept) > 1 else []:
        rest = [k for i, k in enumerate(kept) if i != j]
        again = ee.choose_thresholds([outputs[1 + k] for k in rest], outputs[0], labels,
                                     costs.subset(rest), params.budget, reference)
        if min(again) > 1.0:
            again = [t for i, t in enumerate(thresholds) if i != j]
            top1 = evaluate_choice([outputs[0], *[outputs[1 + k] for k in rest]], labels,
                                   again, costs.subset(rest))["cascade_top1"]
            if (reference - top1) * 100 > params.budget:
                continue
        variant = ([k for k, t in zip(rest, again) if t <= 1.0], [t for t in again if t <= 1.0])
        if variant[0] and variant not in variants:
            variants.append(variant)
    return variants


def _check_record(points, variant, measured: dict, outputs, data: Dataset,
                  costs: ee.CostModel) -> dict:
    kept, thresholds = variant
    model = evaluate_choice([outputs[0], *[outputs[1 + k] for k in kept]], data.labels,
                            thresholds, costs.subset(kept))["expected_saving"]
    return {"exits": [points[k] for k in kept], "thresholds": [round(t, 6) for t in thresholds],
            **measured, "model_saving": round(model, 4)}


def stream_savings(deploy: ee.ExitModel, variants: list[tuple[list[int], list[float]]],
                   data: Dataset, params, ctx) -> list[dict]:
    """For each cascade (kept exits, thresholds): 1 - (its ms per image) / (the plain model's),
    all streamed over the first ``CHECK_IMAGES`` images of ``data`` in order, ``CHECK_ROUNDS``
    rounds taking turns, the drift between rounds taken out (:class:`StageTimes`), on the cost
    device and in the cost precision; with each cascade's exit histogram (final output last)."""
    models, streams = {}, []
    for v, (kept, thresholds) in enumerate(variants):
        combined = onnx.load_from_string(_export(deploy.keep(kept), params, ctx))
        if params.cost_precision == "int8":
            combined = _quantized(combined, ctx)
        stages = {f"v{v}-stage{k}.onnx": stage
                  for k, stage in enumerate(stage_graphs(combined, len(kept)))}
        models.setdefault("plain.onnx", stage_graphs(combined, 0)[0])
        models.update(stages)
        streams.append(CascadeStream(tuple(stages), tuple(thresholds)))
    plan = StageTimingPlan({name: model.SerializeToString() for name, model in models.items()},
                           (), (("plain.onnx",), *streams), data.images[:CHECK_IMAGES],
                           ctx.input_spec.to_json(), rounds=CHECK_ROUNDS)
    times = cost_device(ctx).time_stages(plan)
    plain = times.streams_ms[0]
    return [{"plain_ms": round(plain, 4), "cascade_ms": round(cascade, 4),
             "measured_saving": round(1.0 - cascade / plain, 4),
             "histogram": record["exits"]}
            for cascade, record in zip(times.streams_ms[1:], times.result["streams"][1:])]


def _least_valuable(kept, thresholds, outputs, costs: ee.CostModel, count: int) -> int:
    """The kept candidate whose removal the cost model says costs least (or saves most)."""
    sub = costs.subset(kept)
    conf = [ee.confidence(outputs[1 + k]) for k in kept]
    enabled = list(range(len(kept)))
    base = sub.expected(ee.cascade_exits(conf, thresholds, count), enabled)

    def loss_without(j):
        off = [2.0 if i == j else t for i, t in enumerate(thresholds)]  # never fires
        return sub.expected(ee.cascade_exits(conf, off, count),
                            [i for i in enabled if i != j]) - base

    return kept[min(enabled, key=loss_without)]


def _choose_among(candidates: list[int], outputs, labels, costs: ee.CostModel,
                  reference: float, params) -> tuple[list[int], list[float]]:
    """:func:`edgec.exits.select_exits` over some candidates (indices into all of them)."""
    if not candidates:
        return [], []
    picked, thresholds = ee.select_exits([outputs[1 + k] for k in candidates], outputs[0],
                                         labels, costs.subset(candidates), params.budget,
                                         params.max_exits, reference)
    return [candidates[j] for j in picked], thresholds


def cost_device(ctx: Context):
    """Where the cost model is measured: the build's device, else this machine."""
    return ctx.device if ctx.device is not None else LocalDevice()


def cost_plan(combined: onnx.ModelProto, exits: int, params, ctx) -> StageTimingPlan:
    """What :func:`measure_costs` times: each bare stage ``stage<k>`` (backbone only) and each
    stage with its head ``stage<k>-head`` alone on the input the chain hands it (calls: the bare
    stages, then the headed ones); the uncut model and the chain of bare stages streamed over
    calibration images (streams)."""
    bare = stage_graphs(combined, exits, heads=False)
    headed = stage_graphs(combined, exits, heads=True)[:-1]
    chain = tuple(f"stage{k}.onnx" for k in range(exits + 1))
    models = {"uncut.onnx": stage_graphs(combined, 0)[0], **dict(zip(chain, bare)),
              **{f"stage{k}-head.onnx": stage for k, stage in enumerate(headed)}}
    calls = [StageCall(name, chain[:k]) for k, name in enumerate(chain)] + [
        StageCall(f"stage{k}-head.onnx", chain[:k]) for k in range(exits)]
    return StageTimingPlan({name: model.SerializeToString() for name, model in models.items()},
                           tuple(calls), (("uncut.onnx",), chain),
                           ctx.calibration.images[:STREAM_IMAGES], ctx.input_spec.to_json(),
                           repeat=params.cost_repeats)


def _quantized(combined: onnx.ModelProto, ctx) -> onnx.ModelProto:
    from edgec.passes.quantize import QuantizeParams, int8_choice, quantize_int8

    source = ctx.workdir / "early_exit-costs.onnx"
    target = ctx.workdir / "early_exit-costs-int8.onnx"
    onnx.save(combined, str(source))
    images = ctx.calibration.images[:64]
    batches = [preprocess(images[i:i + 32], ctx.input_spec) for i in range(0, len(images), 32)]
    params = QuantizeParams(calibration_count=len(images))
    quantize_int8(source, target, batches, params, int8_choice(params, ctx).scheme,
                  ee.head_node_names(combined))
    model = onnx.load(str(target))
    source.unlink()
    target.unlink()
    return model


def evaluate_choice(outputs, labels, thresholds, costs: ee.CostModel) -> dict:
    """A cascade at ``thresholds`` on ``outputs`` = [final logits, exit logits...]: exit rates
    and histogram, plain and cascade top-1 on ``labels``, the cost model's expected and plain
    ms and its saving."""
    final, exit_logits = outputs[0], outputs[1:]
    conf = [ee.confidence(z) for z in exit_logits]
    exit_at = ee.cascade_exits(conf, thresholds, len(labels))
    correct = ee.cascade_correct(exit_at, [np.argmax(z, 1) == labels for z in exit_logits],
                                 np.argmax(final, 1) == labels)
    enabled = [k for k, t in enumerate(thresholds) if t <= 1.0]
    expected = costs.expected(exit_at, enabled)
    counts = np.bincount(exit_at, minlength=len(thresholds) + 1)
    plain_top1 = top1(final, labels)
    return {"rates": [float(c) / len(labels) for c in counts[:-1]],
            "histogram": [int(c) for c in counts],
            "plain_top1": plain_top1, "cascade_top1": float(correct.mean()),
            "expected_ms": expected, "plain_ms": costs.plain(),
            "expected_saving": 1.0 - expected / costs.plain()}


def costs_from_report(report: dict) -> tuple[ee.CostModel, list[int]]:
    """(the pass's cost model over all its candidates, the indices of the kept ones), read back
    from an ``early_exit`` report (the lineage entry of an artifact's manifest)."""
    candidates = report["candidates"]
    costs = ee.CostModel(segments=(*[c["segment_ms"] for c in candidates],
                                   report["final_segment_ms"]),
                         heads=tuple(c["head_ms"] for c in candidates), call=report["call_ms"])
    after = [c["after"] for c in candidates]
    return costs, [after.index(e["after"]) for e in report["exits"]]


def _report(points, kept, thresholds, outputs, choice, costs, macs, head_data, choice_data,
            finetuned, seconds) -> dict:
    labels = choice_data.labels
    chosen = dict(zip(kept, thresholds))
    candidates = [{"after": points[k], "kept": k in chosen,
                   "threshold": round(chosen[k], 6) if k in chosen else None,
                   "threshold_split_top1": round(top1(z, labels), 4),
                   "head_macs": macs["heads"][k], "segment_macs": macs["segments"][k],
                   "segment_ms": round(costs.segments[k], 4), "head_ms": round(costs.heads[k], 4)}
                  for k, z in enumerate(outputs[1:])]
    return {
        "exits": [{"after": points[k], "threshold": round(t, 6), "rate": round(rate, 4)}
                  for k, t, rate in zip(kept, thresholds, choice["rates"])],
        "candidates": candidates,
        "final_segment_ms": round(costs.segments[-1], 4), "call_ms": round(costs.call, 4),
        "plain_macs": sum(macs["segments"]),
        "threshold_split": {"data": choice_data.origin, "images": len(choice_data),
                            "reference_top1": choice["reference_top1"],
                            "plain_top1": choice["plain_top1"],
                            "cascade_top1": choice["cascade_top1"],
                            "predicted_drop_points": round(
                                (choice["reference_top1"] - choice["cascade_top1"]) * 100, 3),
                            "histogram": choice["histogram"]},
        "expected_ms": round(choice["expected_ms"], 4), "plain_ms": round(choice["plain_ms"], 4),
        "expected_saving": round(choice["expected_saving"], 4),
        "model_saving": round(choice["model_saving"], 4),
        "heads_trained_on": head_data.origin, "finetune": finetuned, "seconds": round(seconds, 1),
    }
