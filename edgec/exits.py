"""Early-exit building blocks: exit heads, the model with its heads, the heads' training and
the threshold choice under an accuracy budget.

Used by the ``early_exit`` pass. Cutting the model into segments and the ONNX graph into stage
graphs lives in ``edgec.stages``; MACs are counted by ``edgec.analysis``, the ONNX export by
``edgec.onnx_export``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

from edgec.errors import PassError
from edgec.train import OptimizerSpec, distillation_loss, fit

HEAD_KINDS = ("linear", "mlp", "conv")


# ---------------------------------------------------------------------------- exit heads
def make_head(kind: str, shape: tuple[int, ...], classes: int, pool: int, width: int) -> nn.Module:
    """A small classifier on feature maps of ``shape`` (C, H, W)."""
    channels, height, wide = shape
    if kind == "linear":
        return nn.Sequential(_pool(height, wide, pool), nn.Flatten(),
                             nn.Linear(channels * pool * pool, classes))
    if kind == "mlp":
        return nn.Sequential(_pool(height, wide, pool), nn.Flatten(),
                             nn.Linear(channels * pool * pool, width or 128), nn.ReLU(),
                             nn.Linear(width or 128, classes))
    width = width or 2 * channels
    return nn.Sequential(nn.Conv2d(channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(), _pool((height + 1) // 2, (wide + 1) // 2, pool), nn.Flatten(),
                         nn.Linear(width * pool * pool, classes))


def _pool(height: int, wide: int, pool: int) -> nn.Module:
    """Average pooling to pool×pool with a fixed kernel (exports without shape inference)."""
    if pool == 1:
        return nn.AdaptiveAvgPool2d(1)
    if height % pool or wide % pool:
        raise PassError(f"pool {pool} does not divide the {height}×{wide} feature map; use a "
                        f"divisor or pool = 1")
    if height == pool and wide == pool:
        return nn.Identity()  # the linear layer sees the whole map: one op less per exit
    return nn.AvgPool2d((height // pool, wide // pool))


def fold_head(head: nn.Module) -> nn.Module:
    """The head for deployment: eval mode, BatchNorm folded into its convolution."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    head = copy.deepcopy(head).eval()
    layers = list(head)
    if len(layers) > 1 and isinstance(layers[0], nn.Conv2d) and isinstance(layers[1], nn.BatchNorm2d):
        layers = [fuse_conv_bn_eval(layers[0], layers[1]), *layers[2:]]
    return nn.Sequential(*layers)


def fold_segment(segment: nn.Module) -> nn.Module:
    """A backbone segment for deployment: eval mode, BatchNorm folded where the segment still
    has it (the backbone was fine-tuned with BatchNorm, which trains far better than folded)."""
    from edgec.batchnorm import fold_batchnorm

    segment = copy.deepcopy(segment).eval()
    for part in segment if isinstance(segment, nn.Sequential) else [segment]:  # merged: keep()
        if isinstance(part, fx.GraphModule):
            fold_batchnorm(part)
    return segment


class ExitModel(nn.Module):
    """Backbone segments with a head after each but the last.

    ``forward`` returns ``(logits, exit_0, ..., exit_{K-1}, feature_0, ..., feature_{K-1})``:
    the final logits, each head's logits and the feature map each later stage starts from.
    """

    def __init__(self, segments: list[nn.Module], heads: list[nn.Module]):
        super().__init__()
        if len(segments) != len(heads) + 1:
            raise PassError(f"{len(segments)} segments need {len(segments) - 1} heads")
        self.segments = nn.ModuleList(segments)
        self.heads = nn.ModuleList(heads)

    def forward(self, x):
        exits, features = [], []
        for segment, head in zip(self.segments, self.heads):
            x = segment(x)
            features.append(x)
            exits.append(head(x))
        return (self.segments[-1](x), *exits, *features)

    def output_names(self) -> list[str]:
        k = len(self.heads)
        return ["logits", *[f"exit_{i}" for i in range(k)], *[f"feature_{i}" for i in range(k)]]

    def keep(self, indices: list[int]) -> ExitModel:
        """The same backbone with only the heads at ``indices`` (segments merged)."""
        segments, current = [], []
        for k, segment in enumerate(self.segments):
            current.append(segment)
            if k in indices or k == len(self.heads):
                segments.append(current[0] if len(current) == 1 else nn.Sequential(*current))
                current = []
        return ExitModel(segments, [self.heads[k] for k in indices])

    def deployable(self) -> ExitModel:
        """A copy in eval mode with every BatchNorm folded (backbone segments and heads)."""
        return ExitModel([fold_segment(s) for s in self.segments],
                         [fold_head(h) for h in self.heads])


class ExitLogits(nn.Module):
    """``model``'s logits only, ``(final, exit_0, ..., exit_{K-1})``: the training view."""

    def __init__(self, model: ExitModel):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[:len(self.model.heads) + 1]


def head_node_names(model) -> list[str]:
    """Names of the exit heads' nodes in the ONNX graph of an :class:`ExitModel` (the exporter
    names them after ``ExitModel.heads``). ``quantize`` leaves them in float: at these
    sizes an int8 head's quantize/dequantize steps cost more than its arithmetic (ResNet-56,
    heads after layer3.1/3.4/3.6: 0.019–0.024 ms in int8, 0.011–0.014 in float)."""
    return [node.name for node in model.graph.node if node.name.startswith("/heads.")]


# ---------------------------------------------------------------------------- head training
@dataclass(frozen=True)
class TrainSettings:
    """Head training: epochs over cached features, Adam with a one-cycle schedule."""

    epochs: int = 4
    lr: float = 3e-3
    batch: int = 128
    temperature: float = 2.0
    alpha: float = 0.7  # weight of the soft targets; 1 - alpha on the labels
    seed: int = 0


def train_head(head: nn.Module, features: np.ndarray, teacher: np.ndarray, labels: np.ndarray,
               settings: TrainSettings) -> nn.Module:
    """Train ``head`` on cached (frozen-backbone) features, distilling from the ``teacher``
    logits: :func:`edgec.train.fit` with Adam (weight decay 1e-4) on a one-cycle schedule;
    deterministic for a seed."""
    order = torch.Generator().manual_seed(settings.seed)
    batches = _feature_batches(torch.from_numpy(features),
                               torch.from_numpy(teacher.astype(np.float32)),
                               torch.from_numpy(labels.astype(np.int64)), settings.batch, order)

    def loss(batch):
        x, soft, hard = batch
        return distillation_loss(head(x), soft, hard, settings.temperature, settings.alpha)

    steps = settings.epochs * math.ceil(len(labels) / settings.batch)
    fit(head, batches, loss, OptimizerSpec("adam-one-cycle", settings.lr, 1e-4), steps,
        epoch_size=len(labels), seed=settings.seed)
    return head


def _feature_batches(features: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                     batch: int, order: torch.Generator):
    """Endless epochs of (features, teacher logits, labels), reshuffled by ``order`` every
    epoch; each feature map flipped horizontally at random (cheap augmentation)."""
    while True:
        perm = torch.randperm(len(labels), generator=order)
        flips = torch.rand(len(perm), generator=order) < 0.5
        for index in perm.split(batch):
            x = features[index].float()
            x = torch.where(flips[index].view(-1, 1, 1, 1), x.flip(3), x)
            yield x, teacher[index], labels[index]


# ---------------------------------------------------------------------------- thresholds
def merge_segments(values, exits: list[int]) -> list:
    """Per-segment ``values`` (costs, MACs) summed between the kept ``exits``."""
    bounds = [0, *[k + 1 for k in exits], len(values)]
    return [sum(values[a:b]) for a, b in zip(bounds, bounds[1:])]


@dataclass(frozen=True)
class CostModel:
    """Measured milliseconds: backbone segment k, head k, and one stage boundary (``call``:
    a runtime call plus what cutting the graph there costs)."""

    segments: tuple[float, ...]
    heads: tuple[float, ...]
    call: float

    def plain(self) -> float:
        return sum(self.segments) + self.call

    def subset(self, exits: list[int]) -> CostModel:
        """The costs with only ``exits`` kept: the segments between them merged."""
        return CostModel(segments=tuple(merge_segments(self.segments, exits)),
                         heads=tuple(self.heads[k] for k in exits), call=self.call)

    def expected(self, exit_at: np.ndarray, enabled: list[int]) -> float:
        """Mean latency when sample i leaves at exit ``exit_at[i]`` (K = the final output)."""
        k_final = len(self.segments) - 1
        cost_until = []
        for k in range(k_final + 1):
            visited = [j for j in enabled if j <= k]
            calls = len(visited) + (1 if k == k_final else 0)
            heads = sum(self.heads[j] for j in visited)
            cost_until.append(sum(self.segments[:k + 1]) + heads + calls * self.call)
        return float(np.mean(np.asarray(cost_until)[exit_at]))


def confidence(logits: np.ndarray) -> np.ndarray:
    """Max softmax probability per row (float32, as the stage graphs compute it)."""
    z = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (1.0 / e.sum(axis=1)).astype(np.float32)


def cascade_exits(conf: list[np.ndarray], thresholds: list[float],
                  count: int | None = None) -> np.ndarray:
    """Where each sample leaves: the first exit whose confidence reaches its threshold, else K.
    ``count``: the number of samples, needed only when there are no exits."""
    k = len(conf)
    exit_at = np.full(len(conf[0]) if conf else count, k, dtype=np.int64)
    for j in reversed(range(k)):
        exit_at[conf[j] >= thresholds[j]] = j
    return exit_at


def cascade_correct(exit_at, exit_correct: list[np.ndarray], final_correct) -> np.ndarray:
    table = np.stack([*exit_correct, final_correct])
    return table[exit_at, np.arange(len(exit_at))]


def choose_thresholds(exit_logits: list[np.ndarray], final_logits: np.ndarray,
                      labels: np.ndarray, costs: CostModel, budget_points: float,
                      reference_top1: float | None = None, candidates: int = 64,
                      sweeps: int = 4) -> list[float]:
    """Per-exit thresholds minimising expected latency with a top-1 drop <= ``budget_points``
    below ``reference_top1`` (default: the final output's own top-1 on these labels).

    Coordinate descent over each exit's candidate thresholds (midpoints between observed
    confidences, so no sample sits exactly on a threshold) plus 'never' (2.0).
    """
    conf = [confidence(z) for z in exit_logits]
    exit_correct = [np.argmax(z, 1) == labels for z in exit_logits]
    final_correct = np.argmax(final_logits, 1) == labels
    reference = final_correct.mean() if reference_top1 is None else reference_top1
    floor = reference - budget_points / 100.0 - 1e-12
    grids = [_candidate_thresholds(c, candidates) for c in conf]
    thresholds = [2.0] * len(conf)

    def score(ts):
        exit_at = cascade_exits(conf, ts)
        accuracy = cascade_correct(exit_at, exit_correct, final_correct).mean()
        enabled = [j for j, t in enumerate(ts) if t <= 1.0]
        return costs.expected(exit_at, enabled) if accuracy >= floor else float("inf")

    best = score(thresholds)
    for _ in range(sweeps):
        improved = False
        for j in range(len(conf)):
            for t in grids[j]:
                trial = [*thresholds[:j], t, *thresholds[j + 1:]]
                value = score(trial)
                if value < best - 1e-9:
                    best, thresholds, improved = value, trial, True
        if not improved:
            break
    return thresholds


def select_exits(exit_logits: list[np.ndarray], final_logits: np.ndarray, labels: np.ndarray,
                 costs: CostModel, budget_points: float, max_exits: int,
                 reference_top1: float | None = None,
                 min_gain: float = 0.002) -> tuple[list[int], list[float]]:
    """Greedy forward selection of at most ``max_exits`` candidate exits and their thresholds.

    Each round adds the candidate whose inclusion (thresholds re-chosen for the whole subset)
    lowers the expected latency most, and stops when no candidate saves another ``min_gain``
    of the plain latency. Exits whose threshold ends above 1 (never fire) are dropped: a
    ramp that never fires is pure overhead. ``reference_top1``: as for
    :func:`choose_thresholds`. Returns (candidate indices, their thresholds).
    """
    def expected(subset):  # (expected ms, thresholds) with exactly ``subset`` as exits
        sub_costs = costs.subset(subset)
        ts = choose_thresholds([exit_logits[j] for j in subset], final_logits, labels,
                               sub_costs, budget_points, reference_top1)
        exit_at = cascade_exits([confidence(exit_logits[j]) for j in subset], ts)
        return sub_costs.expected(exit_at, [j for j, t in enumerate(ts) if t <= 1.0]), ts

    chosen, thresholds, best = [], [], costs.plain()
    while len(chosen) < max_exits and len(chosen) < len(exit_logits):
        trials = [(*expected(sorted([*chosen, k])), sorted([*chosen, k]))
                  for k in range(len(exit_logits)) if k not in chosen]
        value, ts, subset = min(trials, key=lambda t: t[0])
        if value > best - min_gain * costs.plain():
            break
        best, chosen, thresholds = value, subset, ts
    firing = [j for j, t in enumerate(thresholds) if t <= 1.0]
    return [chosen[j] for j in firing], [thresholds[j] for j in firing]


def _candidate_thresholds(conf: np.ndarray, count: int) -> list[float]:
    values = np.unique(conf.astype(np.float64))
    if len(values) < 2:
        return [2.0]
    mids = (values[:-1] + values[1:]) / 2
    picks = np.unique(np.quantile(mids, np.linspace(0.0, 1.0, count), method="nearest"))
    return [float(t) for t in picks] + [2.0]

