"""prune: structured channel pruning (Torch-Pruning dependency graph), or a 2:4 sparsity mask.

Channel mode removes output channels of convolutions whose channels are not coupled to any
other layer's output (for a ResNet: the inner conv of each block; residual streams stay whole,
which also keeps option-A zero-padded shortcuts exact). Kept widths are rounded to the target's
``channel_multiple``. An optional fine-tune distils the unpruned model into the pruned one on
the training split. With ``budget_points`` the pass picks the ratio by iterative pruning: the
candidate ratios are steps from the smallest up, each pruning the previous step's fine-tuned
student further (ratios count from the unpruned model) and fine-tuning it for an equal share
of the epochs; the search stops at the first step whose top-1 drop on a held-out slice of the
training split (plain, or the ``shifted`` view for models that memorised the whole split)
leaves the budget and returns the step before it. The whole search therefore costs at most
``finetune_epochs``, and falling back costs nothing. In a build with an accuracy ledger
(edgec.budget) the held-out slice, its view and the reference are the ledger's, and the budget
is at most what the ledger allows the pass.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from edgec.accuracy import VIEWS, check_view, view_top1
from edgec.analysis import total_macs
from edgec.artifact import Artifact
from edgec.budget import pass_budget
from edgec.config import check_choice
from edgec.data import AUGMENTS, Dataset, preprocess
from edgec.errors import BudgetError, PassError
from edgec.pipeline import Context, Step
from edgec.space import boolean, choices
from edgec.train import distill

MODES = ("channel", "2:4")
IMPORTANCES = ("l1", "taylor")
SCOPES = ("global", "local")
RATIO_UNITS = ("channels", "macs")
SEARCH_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)


def _check_ratio(value: float, what: str) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{what} {value} must be in [0, 1); e.g. 0.3 removes 30 % of channels")


@dataclass(frozen=True)
class PruneParams:
    """Structured pruning.

    ``ratio``: fraction of prunable channels removed (``stage_ratios`` overrides it for the
    layers under a module name, e.g. ``{layer3 = 0.4}``), or with ``ratio_of`` 'macs' the
    fraction of the model's MACs removed (the channel ratio that first reaches it is found by
    bisection; ratios and ``ratios`` steps then count MACs); ``scope`` 'global' ranks channels of
    all layers together, 'local' prunes each layer by the ratio. ``budget_points``: if set, the
    ratio is the last of the ``ratios`` steps (iterative pruning, module docstring) whose top-1
    drop (points, held-out training slice) stays within it. ``channel_multiple`` 0 takes the target's.
    ``reconstruct``: refit the layer that reads the pruned channels by least squares so it
    reproduces its unpruned output on 256 training images (He et al. 2017, ThiNet).
    ``finetune_epochs``: distillation from the unpruned model in all, with ``finetune_augment``
    (default: the training split's own, :class:`edgec.data.SplitSpec`); each search step gets
    an equal share (epochs make the budget scale with the model: a deeper model gets the
    seconds it needs); ``time_budget_s`` caps the whole pass (a later step gets what is
    left).
    ``holdout_view`` 'shifted' measures held-out accuracy on :func:`edgec.accuracy.shifted`
    images: use it when the model was trained on the whole training split, whose held-out slice
    it has memorised. ``mode`` '2:4' zeroes 2 of every 4 weights instead (a mask; widths
    unchanged).
    """

    mode: str = "channel"
    ratio: float = field(default=0.2, metadata=choices(0.0, 0.1, 0.2, 0.3, 0.4, 0.5,
                                                       when={"budget_points": None}))
    stage_ratios: dict[str, float] = field(default_factory=dict)
    scope: str = field(default="global", metadata=choices(*SCOPES))
    importance: str = field(default="l1", metadata=choices(*IMPORTANCES))
    budget_points: float | None = field(default=None, metadata=choices(None, 0.5, 1.0, 2.0))
    ratios: tuple[float, ...] = SEARCH_RATIOS
    ratio_of: str = field(default="channels", metadata=choices(*RATIO_UNITS))
    channel_multiple: int = field(default=0, metadata=choices(0, 4, 8, 16, 32))
    reconstruct: bool = field(default=True, metadata=boolean())
    finetune_epochs: float = field(default=0.0, metadata=choices(0.0, 1.0, 2.0, 5.0))
    finetune_augment: str = ""
    time_budget_s: float = 600.0
    holdout: int = 5000
    holdout_view: str = "plain"
    lr: float = 0.01
    batch: int = 128
    seed: int = 0

    def __post_init__(self):
        check_choice("mode", self.mode, MODES)
        check_choice("importance", self.importance, IMPORTANCES)
        check_choice("scope", self.scope, SCOPES)
        check_choice("holdout_view", self.holdout_view, VIEWS)
        check_choice("ratio_of", self.ratio_of, RATIO_UNITS)
        if self.finetune_augment:
            check_choice("finetune_augment", self.finetune_augment, AUGMENTS)
        if self.ratio_of == "macs" and self.stage_ratios:
            raise ValueError("stage_ratios fix channel fractions per stage and cannot be "
                             "combined with ratio_of = 'macs'; use ratio_of = 'channels'")
        _check_ratio(self.ratio, "ratio")
        for name, value in self.stage_ratios.items():
            _check_ratio(value, f"stage_ratios[{name!r}]")
        if not self.ratios:
            raise ValueError("ratios is empty; give candidate ratios such as [0.4, 0.3, 0.2]")
        for value in self.ratios:
            _check_ratio(value, "ratios entry")
        if self.budget_points is not None and self.budget_points < 0:
            raise ValueError(f"budget_points {self.budget_points} must be >= 0 (top-1 points)")
        if self.channel_multiple < 0:
            raise ValueError(f"channel_multiple {self.channel_multiple} must be >= 0 "
                             f"(0 = the target's)")
        if self.finetune_epochs < 0 or self.time_budget_s < 0:
            raise ValueError("finetune_epochs and time_budget_s must be >= 0")
        if self.holdout < 1 or self.batch < 1 or self.lr <= 0:
            raise ValueError(f"holdout {self.holdout}, batch {self.batch} must be >= 1 "
                             f"and lr {self.lr} > 0")


class PrunePass:
    name = "prune"
    consumes = "torch"
    produces = "torch"
    Params = PruneParams
    target_fields = ("channel_multiple",)  # all the pass reads of the target (cache key)
    cached_torch = "widths"  # the output differs from its input in widths and weights only

    def supports(self, target) -> str | None:
        return None

    def run(self, artifact: Artifact, params: PruneParams, ctx: Context) -> Artifact:
        model = artifact.payload
        if not isinstance(model, torch.nn.Module):
            raise PassError(f"prune needs a torch nn.Module, got {type(model).__name__}")
        multiple = params.channel_multiple or getattr(ctx.target, "channel_multiple", 1)
        needs_data = params.finetune_epochs > 0 or params.budget_points is not None \
            or params.importance == "taylor"
        if needs_data and (ctx.calibration is None or len(ctx.calibration) == 0):
            raise PassError("prune needs the training split (--data with [calibration]) for "
                            "fine-tuning, the accuracy budget or Taylor importance")
        check_view("holdout_view", params.holdout_view, ctx.input_spec.shape)
        job = _Job(model.eval(), params, ctx, multiple)
        pruned, report = job.semi_structured() if params.mode == "2:4" else job.channels()
        return artifact.derive("torch", pruned, Step(self, params).lineage(report))


class _Job:
    """One run of the pass: data split, trials, fine-tune, report."""

    def __init__(self, model, params: PruneParams, ctx: Context, multiple: int):
        self.model, self.params, self.ctx, self.multiple = model, params, ctx, multiple
        self.spec = ctx.input_spec
        if ctx.ledger is None:
            self.train, self.holdout = _split(ctx.calibration, params.holdout)
        else:  # the build held its budget's slice out already
            self.train, self.holdout = ctx.calibration, ctx.ledger.holdout
        self.started = time.perf_counter()
        self.macs_before = total_macs(model, self.spec)
        self.widths_before = conv_widths(model)

    def time_left(self) -> float:
        return max(0.0, self.params.time_budget_s - (time.perf_counter() - self.started))

    def accuracy(self, model) -> float:
        """Top-1 (%) on the held-out slice in ``holdout_view`` (the build's accuracy ledger's
        slice and view when there is one)."""
        if self.ctx.ledger is not None:
            return self.ctx.ledger.torch_top1(model)
        return view_top1(model, self.holdout, self.spec, self.params.holdout_view,
                         self.params.seed) * 100

    def reference_and_budget(self) -> tuple[float, float]:
        """(the top-1 the drop counts from, the points the pass may lose): its input and
        ``budget_points``, or, in a build with an accuracy ledger, the input's top-1 as the
        ledger counts it and at most what the ledger allows the pass."""
        ledger = self.ctx.ledger
        if ledger is None:
            return self.accuracy(self.model), self.params.budget_points
        return ledger.input_top1(), pass_budget(self.ctx, self.params.budget_points)

    def channels(self):
        params = self.params
        if params.budget_points is None:
            student, trial = self._trial(self.model, params.ratio, params.finetune_epochs)
            return student, self._report(student, trial, [])
        reference, budget = self.reference_and_budget()
        steps = sorted(set(params.ratios))
        student, kept, trials = self.model, None, []
        for ratio in steps:
            student, trial = self._trial(student, ratio, params.finetune_epochs / len(steps))
            trial["holdout_drop_points"] = round(reference - trial["holdout_top1"], 3)
            trials.append(trial)
            self.ctx.progress(f"prune: ratio {ratio}: held-out top-1 {trial['holdout_top1']:.2f} %"
                              f" (drop {trial['holdout_drop_points']:.2f} points)")
            if trial["holdout_drop_points"] > budget:
                break
            kept = student, trial
        if kept is not None:
            return kept[0], self._report(kept[0], kept[1], trials, reference)
        raise BudgetError(
            f"prune: no ratio in {steps} keeps the top-1 drop within {budget:.2f} "
            f"points on the held-out training slice; best achievable drop "
            f"{trials[0]['holdout_drop_points']:.2f} points at ratio {steps[0]}, the smallest "
            f"(the search stops at the first step over budget); raise budget_points, add a "
            f"smaller ratio (0 keeps every channel) or give more fine-tune epochs")

    def _trial(self, base, ratio: float, epochs: float):
        """Prune a copy of ``base`` by ``ratio`` of the unpruned model's channels (or MACs,
        per ``ratio_of``), fine-tune."""
        channel_ratio = self._channel_ratio(base, ratio)
        student = copy.deepcopy(base)
        self._prune(student, channel_ratio, self._batch(), self.params.reconstruct)
        widths = {name: [before, width] for name, width in conv_widths(student).items()
                  if width != (before := self.widths_before[name])}
        trial = {"ratio": ratio, "widths": widths, "macs": total_macs(student, self.spec)}
        if self.params.ratio_of == "macs":
            trial["channel_ratio"] = round(channel_ratio, 4)
        trial["finetune"] = self._finetune(student, epochs, self.time_left())
        if self.params.budget_points is not None or self.params.finetune_epochs > 0:
            trial["holdout_top1"] = round(self.accuracy(student), 3)
        return student, trial

    def _prune(self, model, channel_ratio: float, batch=None, reconstruct: bool = False):
        prune_channels(model, self.spec, channel_ratio, self.params.stage_ratios,
                       self.params.scope, self.params.importance, self.multiple, batch,
                       reconstruct, self.widths_before)

    def _channel_ratio(self, base, ratio: float) -> float:
        """``ratio`` itself, or for ``ratio_of`` 'macs' the smallest channel ratio (to 0.001)
        whose pruned ``base`` has at most ``1 - ratio`` of the unpruned model's MACs."""
        if self.params.ratio_of == "channels" or ratio == 0:
            return ratio
        target = (1 - ratio) * self.macs_before
        batch = self._batch()  # Taylor importance ranks by gradients, in the probes too

        def macs_at(channel_ratio: float) -> int:
            probe = copy.deepcopy(base)
            self._prune(probe, channel_ratio, batch)
            return total_macs(probe, self.spec)

        low, high = 0.0, 0.999
        fewest = macs_at(high)
        if fewest > target:
            raise PassError(f"prune: ratio {ratio} of MACs cannot be reached by removing "
                            f"channels (at most {1 - fewest / self.macs_before:.3f} with "
                            f"channel_multiple {self.multiple}); use a smaller ratio")
        while high - low > 1e-3:
            middle = (low + high) / 2
            low, high = (low, middle) if macs_at(middle) <= target else (middle, high)
        return high

    def _finetune(self, student, epochs: float, seconds: float) -> dict:
        if epochs <= 0 or seconds <= 0:
            return {"epochs": 0}
        result = distill(student, self.model, self.train, self.spec, epochs=epochs,
                         time_budget_s=seconds, lr=self.params.lr, batch=self.params.batch,
                         seed=self.params.seed, progress=self.ctx.progress,
                         augment=self.params.finetune_augment or None)
        return result.to_json()

    def _batch(self):
        if self.params.importance != "taylor" and not self.params.reconstruct:
            return None
        if len(self.train) == 0:
            return None
        subset = self.train.head(min(256, len(self.train)))
        return (torch.from_numpy(preprocess(subset.images, self.spec)),
                torch.from_numpy(subset.labels))

    def _report(self, student, trial, trials, reference=None) -> dict:
        report = {"mode": "channel", "ratio": trial["ratio"], "ratio_of": self.params.ratio_of,
                  "channel_multiple": self.multiple,
                  "macs_before": self.macs_before, "macs_after": trial["macs"],
                  "macs_reduction": round(1 - trial["macs"] / self.macs_before, 4),
                  "widths": trial["widths"], "finetune": trial["finetune"],
                  "holdout": self.holdout.origin if len(self.holdout) else None,
                  "holdout_view": self.params.holdout_view if self.ctx.ledger is None
                  else self.ctx.ledger.spec.view,
                  "seconds": round(time.perf_counter() - self.started, 1)}
        for key in ("channel_ratio", "holdout_top1", "holdout_drop_points"):
            if key in trial:
                report[key] = trial[key]
        if reference is not None:
            report["holdout_top1_unpruned"] = round(reference, 3)
            report["trials"] = [{k: v for k, v in t.items() if k != "widths"} for t in trials]
        return report

    def semi_structured(self):
        student = copy.deepcopy(self.model)
        masks = semi_structured_masks(student)
        finetune = {"epochs": 0}
        if self.params.finetune_epochs > 0:
            def reapply():
                with torch.no_grad():
                    for module, mask in masks.items():
                        module.weight.mul_(mask)
            finetune = self._finetune_masked(student, reapply)
        zeros = sum(int((m == 0).sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        accelerated, why = runtime_accelerates_2_4(self.ctx.target)
        report = {"mode": "2:4", "layers": len(masks), "sparsity": round(zeros / total, 4),
                  "macs_dense": self.macs_before, "accelerated": accelerated, "why": why,
                  "finetune": finetune}
        if self.params.finetune_epochs > 0:
            report["holdout_top1"] = round(self.accuracy(student), 3)
        self.ctx.progress(f"prune 2:4: {len(masks)} layers masked; accelerated: {accelerated}")
        return student, report

    def _finetune_masked(self, student, reapply) -> dict:
        result = distill(student, self.model, self.train, self.spec,
                         epochs=self.params.finetune_epochs, time_budget_s=self.time_left(),
                         lr=self.params.lr, batch=self.params.batch, seed=self.params.seed,
                         progress=self.ctx.progress, after_step=reapply,
                         augment=self.params.finetune_augment or None)
        return result.to_json()


def _split(data: Dataset | None, holdout: int) -> tuple[Dataset, Dataset]:
    """Fine-tuning images and a held-out tail of the training split for accuracy checks."""
    if data is None:
        empty = Dataset(np.zeros((0, 1, 1, 1), np.uint8), np.zeros(0, np.int64), "none")
        return empty, empty
    n = min(holdout, len(data) // 2)
    cut = len(data) - n
    return data.slice(0, cut), data.slice(cut, len(data))


def round_width(keep: float, channels: int, multiple: int) -> int:
    """Nearest multiple of ``multiple`` to ``keep``, at least one multiple, at most ``channels``."""
    rounded = max(multiple, multiple * round(keep / multiple))
    return channels if rounded >= channels else rounded


def conv_widths(model: torch.nn.Module) -> dict[str, int]:
    """Output channels of every Conv2d, by module name."""
    return {name: m.out_channels for name, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d)}


def prunable_convs(model: torch.nn.Module, graph) -> dict[str, torch.nn.Conv2d]:
    """Convolutions whose output channels no other layer's output depends on (uncoupled)."""
    import torch_pruning as tp

    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Conv2d) or module.groups != 1:
            continue
        group = graph.get_pruning_group(module, tp.prune_conv_out_channels, idxs=[0])
        producers = {id(dep.target.module) for dep, _ in group
                     if graph.is_out_channel_pruning_fn(dep.handler)
                     and isinstance(dep.target.module, torch.nn.Conv2d | torch.nn.Linear)}
        if producers == {id(module)}:
            found[name] = module
    return found


def _ratio_for(name: str, ratio: float, stage_ratios: dict[str, float]) -> float:
    matches = [prefix for prefix in stage_ratios if name == prefix or name.startswith(prefix + ".")]
    return stage_ratios[max(matches, key=len)] if matches else ratio


def prune_channels(model: torch.nn.Module, input_spec, ratio: float,
                   stage_ratios: dict[str, float] | None = None, scope: str = "global",
                   importance: str = "l1", multiple: int = 1,
                   batch=None, reconstruct: bool = False,
                   reference_widths: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Prune ``model`` in place; returns {layer: [width before, width after]} of pruned layers.

    ``batch`` (images, labels) feeds Taylor importance and the least-squares reconstruction.
    ``reference_widths`` ({layer: channels}) are what ``ratio`` counts from, e.g. the unpruned
    widths when pruning an already pruned model further (default: the current widths).
    """
    import torch_pruning as tp

    stage_ratios = stage_ratios or {}
    example = torch.zeros((1, *input_spec.shape), dtype=getattr(torch, input_spec.dtype))
    model.eval()
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    except Exception as exc:
        raise PassError(f"Torch-Pruning cannot trace this model: {type(exc).__name__}: {exc}") \
            from exc
    convs = prunable_convs(model, graph)
    if not convs:
        raise PassError("no convolution has uncoupled output channels to prune")
    if importance == "taylor":
        _accumulate_gradients(model, batch)
    scorer = (tp.importance.GroupTaylorImportance() if importance == "taylor"
              else tp.importance.GroupMagnitudeImportance(p=1))
    scores = {}
    for name, conv in convs.items():
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels,
                                        idxs=list(range(conv.out_channels)))
        scores[name] = scorer(group).detach().cpu().numpy().astype(np.float64)
    reference = {name: (reference_widths or {}).get(name, len(score))
                 for name, score in scores.items()}
    keep = _keep_counts(scores, reference, ratio, stage_ratios, scope)
    consumers = {name: _consumer(graph, conv) for name, conv in convs.items()}
    inputs = _capture_inputs(model, [c for c in consumers.values() if c is not None], batch) \
        if reconstruct and batch is not None else {}
    widths = {}
    for name, conv in convs.items():
        before = conv.out_channels
        after = round_width(keep[name], before, multiple)
        if after == before:
            continue
        order = np.argsort(-scores[name], kind="stable")
        drop = sorted(int(i) for i in order[after:])
        consumer = consumers[name]
        if consumer in inputs:
            kept = sorted(int(i) for i in order[:after])
            refit = _least_squares_refit(consumer, inputs[consumer], kept)
        graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=drop).prune()
        if consumer in inputs:
            with torch.no_grad():
                consumer.weight.copy_(refit)
        widths[name] = [before, after]
    model.zero_grad(set_to_none=True)
    return widths


def _keep_counts(scores: dict[str, np.ndarray], reference: dict[str, int], ratio: float,
                 stage_ratios: dict[str, float], scope: str) -> dict[str, float]:
    """Unrounded channels to keep per layer, ``1 - ratio`` of its ``reference`` width (at most
    its current width): per layer, or by a global importance threshold among the layers that
    share a ratio (importances are normalised per group by the scorer)."""
    by_ratio: dict[float, list[str]] = {}
    for name in scores:
        by_ratio.setdefault(_ratio_for(name, ratio, stage_ratios), []).append(name)
    keep = {}
    for layer_ratio, names in by_ratio.items():
        if scope == "local" or layer_ratio == 0:
            keep.update({n: min(len(scores[n]), reference[n] * (1 - layer_ratio)) for n in names})
            continue
        pooled = np.sort(np.concatenate([scores[n] for n in names]), kind="stable")
        target = (1 - layer_ratio) * sum(reference[n] for n in names)
        drop = min(len(pooled) - 1, max(0, int(len(pooled) - target + 1e-9)))
        threshold = pooled[drop]
        keep.update({n: float((scores[n] >= threshold).sum()) for n in names})
    return keep


def _consumer(graph, conv: torch.nn.Conv2d) -> torch.nn.Conv2d | None:
    """The single plain Conv2d whose input channels are ``conv``'s output channels, if any."""
    import torch_pruning as tp

    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0])
    readers = [dep.target.module for dep, _ in group
               if dep.handler == tp.prune_conv_in_channels and dep.target.module is not conv]
    if len(readers) == 1 and isinstance(readers[0], torch.nn.Conv2d) and readers[0].groups == 1:
        return readers[0]
    return None


def _capture_inputs(model, layers, batch) -> dict[torch.nn.Module, torch.Tensor]:
    """Each layer's input on ``batch`` (one forward pass of the unpruned model)."""
    captured = {}
    handles = [layer.register_forward_hook(
        lambda module, args, out: captured.__setitem__(module, args[0].detach()))
        for layer in layers]
    try:
        with torch.no_grad():
            model.eval()
            model(batch[0])
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _least_squares_refit(conv: torch.nn.Conv2d, x: torch.Tensor, kept: list[int]):
    """Weights over the ``kept`` input channels that best reproduce ``conv(x)`` (ridge LSQ)."""
    with torch.no_grad():
        weight = conv.weight.detach().double()
        flat_weight = weight.reshape(weight.shape[0], -1)
        unfold = torch.nn.Unfold(conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        k = math.prod(conv.kernel_size)
        index = torch.tensor([c * k + j for c in kept for j in range(k)])
        gram = torch.zeros(len(index), len(index), dtype=torch.float64)
        cross = torch.zeros(len(index), weight.shape[0], dtype=torch.float64)
        for chunk in x.split(16):  # chunks keep the im2col matrix small
            columns = unfold(chunk.double()).transpose(1, 2).reshape(-1, flat_weight.shape[1])
            a = columns[:, index]
            gram += a.T @ a
            cross += a.T @ (columns @ flat_weight.T)  # the unpruned output (bias unchanged)
        ridge = 1e-3 * gram.diagonal().mean() * torch.eye(len(index), dtype=gram.dtype)
        solution = torch.linalg.solve(gram + ridge, cross)  # (Ck·k, Cout)
        return solution.T.reshape(weight.shape[0], len(kept), *conv.kernel_size).float()


def _accumulate_gradients(model, batch) -> None:
    images, labels = batch
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(images), labels).backward()


def semi_structured_masks(model: torch.nn.Module) -> dict[torch.nn.Module, torch.Tensor]:
    """Zero the 2 smallest-magnitude weights of every 4 consecutive input weights, in place.

    Applies to Conv2d (groups 1) and Linear layers whose input length is a multiple of 4,
    except the last classifier (its accuracy cost is high and its MACs negligible).
    """
    layers = [m for m in model.modules()
              if isinstance(m, torch.nn.Linear) or
              (isinstance(m, torch.nn.Conv2d) and m.groups == 1)]
    masks = {}
    for module in layers[:-1] if isinstance(layers[-1], torch.nn.Linear) else layers:
        weight = module.weight.detach()
        flat = weight.reshape(weight.shape[0], -1)
        if flat.shape[1] % 4:
            continue
        quads = flat.abs().reshape(flat.shape[0], -1, 4)
        smallest = quads.argsort(dim=2, stable=True)[..., :2]
        mask = torch.ones_like(quads).scatter_(2, smallest, 0.0).reshape(weight.shape)
        with torch.no_grad():
            module.weight.mul_(mask)
        masks[module] = mask
    return masks


def runtime_accelerates_2_4(target) -> tuple[bool, str]:
    """Whether the target's runtime runs 2:4 sparse weights faster than dense ones."""
    if target is not None and target.options.get("sparse_2_4", False):
        return True, f"target {target.name!r} declares options.sparse_2_4 (sparse tensor cores)"
    backends = ", ".join(getattr(target, "backends", ()) or ("none",))
    return False, (f"the runtime of backend(s) {backends} executes 2:4-masked weights as dense "
                   f"tensors (ONNX Runtime CPU has no 2:4 sparse kernels); the zeros cost the "
                   f"same MACs. Accuracy is unaffected by this; speed-up needs e.g. TensorRT on "
                   f"an Ampere-class GPU")
