"""Training: one loop (:func:`fit`) for every pass that trains, and distillation on top of it.

``fit`` steps any model over any batches with any loss, under a step and a time limit. The
passes that change a trained model (prune, early_exit) recover accuracy on the training split
with :func:`distill` (``fit`` over images, distilling from a teacher); the early-exit heads
train with ``fit`` on cached features (``edgec.exits.train_head``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from edgec.accuracy import shifted
from edgec.config import check_choice
from edgec.data import AUGMENTS, Dataset, preprocess

PRECISIONS = ("auto", "fp32", "bf16")
OPTIMIZERS = ("sgd-cosine", "adam-one-cycle")
UNLABELLED = -100  # a sample distilled from the teacher only


@dataclass(frozen=True)
class TrainResult:
    """What a training run did: steps, images seen, epochs (fractional), seconds, final loss."""

    steps: int
    images: int
    epochs: float
    seconds: float
    loss: float
    stopped_by: str  # "epochs" or "time"
    teacher_reused: int = 0  # steps whose teacher logits came from :class:`TeacherLogits`

    def to_json(self) -> dict:
        return {"steps": self.steps, "images": self.images, "epochs": round(self.epochs, 3),
                "seconds": round(self.seconds, 1), "loss": round(self.loss, 4),
                "stopped_by": self.stopped_by, "teacher_reused": self.teacher_reused}


@dataclass(frozen=True)
class OptimizerSpec:
    """How the parameters move. ``kind``: "sgd-cosine" (SGD, momentum 0.9, Nesterov; the
    learning rate falls on a cosine to zero when the steps or the time run out, whichever
    first) or "adam-one-cycle" (Adam with torch's one-cycle schedule over the steps)."""

    kind: str = "sgd-cosine"
    lr: float = 0.01
    weight_decay: float = 5e-4

    def __post_init__(self):
        check_choice("optimizer", self.kind, OPTIMIZERS)


class _Schedule:
    """An optimizer and its learning rate over one run."""

    def __init__(self, spec: OptimizerSpec, parameters: list[torch.nn.Parameter], steps: int):
        self.spec, self.one_cycle = spec, None
        if spec.kind == "sgd-cosine":
            self.optimizer = torch.optim.SGD(parameters, lr=spec.lr, momentum=0.9,
                                             weight_decay=spec.weight_decay, nesterov=True)
        else:
            self.optimizer = torch.optim.Adam(parameters, spec.lr, weight_decay=spec.weight_decay)
            self.one_cycle = torch.optim.lr_scheduler.OneCycleLR(self.optimizer, spec.lr,
                                                                 total_steps=steps)

    def before_step(self, done: float) -> None:
        """``done``: the fraction of the run spent (steps or time, whichever is further)."""
        if self.one_cycle is None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.spec.lr * 0.5 * (1 + math.cos(math.pi * done))

    def after_step(self) -> None:
        if self.one_cycle is not None:
            self.one_cycle.step()


def fit(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, ...]],
        loss_fn: Callable[[tuple[torch.Tensor, ...]], torch.Tensor], optimizer: OptimizerSpec,
        steps: int, epoch_size: int, time_budget_s: float = math.inf, seed: int = 0,
        parameters: list[torch.nn.Parameter] | None = None, max_grad_norm: float | None = None,
        after_step: Callable[[], None] | None = None,
        progress: bool | Callable[[str], None] = False) -> TrainResult:
    """Train ``model`` (in place) for ``steps`` optimizer steps or ``time_budget_s``, whichever
    runs out first; returns it to eval mode.

    ``batches`` yields tuples whose first element holds the step's images (counted against
    ``epoch_size``, the images of one epoch); it must last ``steps`` batches and is read one
    batch per step, so a generator that draws random numbers draws them in the same order
    whatever stops the run.
    ``loss_fn(batch)`` computes the loss. ``parameters`` restricts training (default: all of
    the model's); ``max_grad_norm`` clips the gradient norm of all of them; ``after_step``
    runs after every optimizer step (e.g. to re-apply a sparsity mask). ``progress``: True
    for a rich progress bar, a callable for one-line messages, or False.
    """
    torch.manual_seed(seed)
    schedule = _Schedule(optimizer, list(model.parameters()) if parameters is None else parameters,
                         steps)
    model.train()
    batches = iter(batches)
    started = time.perf_counter()
    step, images, loss, stopped_by = 0, 0, float("nan"), "epochs"
    with _Progress(progress, steps) as bar:
        while step < steps:
            elapsed = time.perf_counter() - started
            if elapsed >= time_budget_s:
                stopped_by = "time"
                break
            done = max(step / steps, elapsed / time_budget_s)
            schedule.before_step(done)
            loss, size = _step(model, batches, loss_fn, schedule, max_grad_norm)
            if after_step is not None:
                after_step()
            step, images = step + 1, images + size
            bar.advance(step, done, f"loss {loss:.3f}")
    model.eval()
    return TrainResult(step, images, images / epoch_size, time.perf_counter() - started, loss,
                       stopped_by)


def _step(model, batches: Iterator, loss_fn, schedule: _Schedule,
          max_grad_norm: float | None) -> tuple[float, int]:
    """One optimizer step on the next batch: (its loss, its images)."""
    batch = next(batches)
    schedule.optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(batch)
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    schedule.optimizer.step()
    schedule.after_step()
    return float(loss.detach()), len(batch[0])


def distillation_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float):
    """Hinton et al.: alpha·T²·KL(teacher_T ‖ student_T) + (1 − alpha)·CE(student, labels);
    the CE term skips samples labelled UNLABELLED."""
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean", log_target=True) * temperature ** 2
    known = labels != UNLABELLED
    hard = F.cross_entropy(student_logits[known], labels[known]) if known.any() else 0.0
    return alpha * soft + (1 - alpha) * hard


def distill(student: torch.nn.Module, teacher: torch.nn.Module | None, dataset: Dataset,
            input_spec, epochs: float = 1.0, time_budget_s: float = 600.0, lr: float = 0.01,
            batch: int = 128, temperature: float = 4.0, alpha: float = 0.9, seed: int = 0,
            progress: bool | Callable[[str], None] = True,
            parameters: list[torch.nn.Parameter] | None = None,
            after_step: Callable[[], None] | None = None,
            device: str = "cpu", augment: str | None = None, precision: str = "auto",
            weights: tuple[float, ...] | None = None,
            max_grad_norm: float | None = None) -> TrainResult:
    """Fine-tune ``student`` (in place) towards ``teacher``'s soft labels and the true labels.

    :func:`fit` with "sgd-cosine" (weight decay 5e-4) over ``dataset``, reshuffled every epoch,
    until ``epochs`` or ``time_budget_s`` runs out. ``teacher=None`` trains on labels only.
    ``parameters``, ``after_step``, ``progress`` and ``max_grad_norm`` (e.g. for networks whose
    BatchNorm is folded): as for :func:`fit`. ``augment`` overrides the dataset's own
    (``Dataset.augment``, see :class:`edgec.data.SplitSpec`). ``precision``: 'bf16'
    autocast, 'fp32', or 'auto' (bf16 where the CPU has native bf16 arithmetic, about 1.6x
    faster; weights and the optimiser stay fp32). A student that returns a tuple of logits
    (e.g. early exits and the final output) has every output distilled from the teacher's
    logits, the losses summed with ``weights`` (default all 1).
    """
    augment = augment or dataset.augment
    check_choice("augment", augment, AUGMENTS)
    check_choice("precision", precision, PRECISIONS)
    if len(dataset) == 0 or epochs <= 0 or time_budget_s <= 0:
        return TrainResult(0, 0, 0.0, 0.0, float("nan"), "epochs")
    order = np.random.default_rng(seed)
    steps = max(1, math.ceil(epochs * math.ceil(len(dataset) / batch)))
    # channels-last convolutions train about 20 % faster on CPU (oneDNN)
    student.to(device, memory_format=torch.channels_last)
    if teacher is not None:
        teacher.to(device, memory_format=torch.channels_last).eval()
    cast = _autocast(precision, device)
    memo = None if teacher is None else teacher_logits(teacher, f"{precision}/{device}")
    hits_before = 0 if memo is None else memo.hits
    loss = _DistillLoss(student, teacher, temperature, alpha, weights, cast, memo)
    images = _image_batches(dataset, input_spec, batch, augment, order, device,
                            distilled_only=teacher is not None)
    result = fit(student, images, loss, OptimizerSpec("sgd-cosine", lr, 5e-4), steps,
                 epoch_size=len(dataset), time_budget_s=time_budget_s, seed=seed,
                 parameters=parameters, max_grad_norm=max_grad_norm, after_step=after_step,
                 progress=progress)
    student.to(memory_format=torch.contiguous_format)
    if teacher is not None:
        teacher.to(memory_format=torch.contiguous_format)
        result = replace(result, teacher_reused=memo.hits - hits_before)
    return result


def _image_batches(dataset: Dataset, input_spec, batch: int, augment: str,
                   order: np.random.Generator, device: str,
                   distilled_only: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless epochs of (images, labels), reshuffled by ``order`` every epoch and augmented;
    ``distilled_only``: images that augmentation moved off the distribution get no label."""
    while True:
        permutation = order.permutation(len(dataset))
        for start in range(0, len(dataset), batch):
            index = np.sort(permutation[start:start + batch])
            x = torch.from_numpy(preprocess(dataset.images[index], input_spec)).to(device)
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(dataset.labels[index]).to(device)
            x, moved = _augment(x, augment, order)
            if distilled_only and moved is not None:
                y = y.masked_fill(moved, UNLABELLED)
            yield x, y


def _autocast(precision: str, device: str) -> Callable[[], contextlib.AbstractContextManager]:
    native = device == "cpu" and torch.cpu._is_avx512_bf16_supported()
    if precision == "bf16" or (precision == "auto" and native):
        return lambda: torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _augment(x: torch.Tensor, augment: str,
             rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-image random horizontal flips; 'crop-flip' adds random crops of a 4-pixel
    zero-padded image (the standard CIFAR augmentation); 'crop-flip-shifted' then moves a random
    half of the batch by :func:`edgec.accuracy.shifted` and returns which (else None)."""
    if augment == "none" or x.dim() != 4:
        return x, None
    flip = torch.from_numpy(rng.random(len(x)) < 0.5)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if augment in ("crop-flip", "crop-flip-shifted"):
        height, width = x.shape[2:]
        padded = F.pad(x, (4, 4, 4, 4))
        shifts = rng.integers(0, 9, size=(len(x), 2))
        x = torch.stack([padded[i, :, dy:dy + height, dx:dx + width]
                         for i, (dy, dx) in enumerate(shifts)])
    moved = None
    if augment == "crop-flip-shifted":
        # Function matching (Beyer et al. 2022): the student also copies the teacher on inputs
        # off the training distribution. With a teacher, the moved images are distilled only:
        # their true labels would make the student beat the teacher under shift (pruned
        # ResNet-56 did by 0.8 points), and the shifted held-out view would read low.
        moved = torch.from_numpy(rng.random(len(x)) < 0.5)
        if moved.any():
            x = x.clone()
            x[moved] = shifted(x[moved].contiguous(), int(rng.integers(1 << 30)))
    return x.contiguous(memory_format=torch.channels_last), moved


class TeacherLogits:
    """A frozen teacher's logits by input batch (its bytes): distillation runs that draw the
    same batches compute the teacher once. The steps of an iterative prune draw the same seeded
    batches, and so do the prune steps of a search's trials, which run in one process and
    distil from one model: the teacher's forward pass is about a quarter of a fine-tune step.
    One table per (teacher weights, precision), at most ``MAX_BYTES`` each; the two most
    recent teachers are kept (:func:`teacher_logits`)."""

    MAX_BYTES = 256 << 20

    def __init__(self):
        self.table: dict[bytes, torch.Tensor] = {}
        self.bytes = self.hits = self.misses = 0

    def __call__(self, teacher: torch.nn.Module, x: torch.Tensor,
                 cast: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor:
        key = hashlib.blake2b(x.detach().contiguous().numpy().tobytes(), digest_size=20).digest()
        known = self.table.get(key)
        if known is not None:
            self.hits += 1
            return known
        self.misses += 1
        with cast(), torch.no_grad():
            logits = teacher(x).float()
        if self.bytes + logits.nbytes <= self.MAX_BYTES:
            self.table[key] = logits
            self.bytes += logits.nbytes
        return logits


_TEACHERS: dict[tuple[str, str], TeacherLogits] = {}


def teacher_logits(teacher: torch.nn.Module, precision: str) -> TeacherLogits:
    """The logits table of ``teacher`` (by its structure and weights) under ``precision``."""
    from edgec.cache import module_identity

    key = (module_identity(teacher), precision)
    if key not in _TEACHERS:
        while len(_TEACHERS) >= 2:
            del _TEACHERS[next(iter(_TEACHERS))]
        _TEACHERS[key] = TeacherLogits()
    return _TEACHERS[key]


@dataclass(frozen=True)
class _DistillLoss:
    """One batch's loss: every output of the student distilled from the teacher's logits (or
    trained on the labels without a teacher), the forward passes under ``cast`` (autocast)."""

    student: torch.nn.Module
    teacher: torch.nn.Module | None
    temperature: float
    alpha: float
    weights: tuple[float, ...] | None
    cast: Callable[[], contextlib.AbstractContextManager]
    memo: TeacherLogits | None = None

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        with self.cast():  # forward passes only; backward runs outside autocast
            outputs = self.student(x)
        soft = None if self.teacher is None else self.memo(self.teacher, x, self.cast)
        outputs = outputs if isinstance(outputs, tuple | list) else (outputs,)
        loss = 0.0
        for weight, logits in zip(self.weights or [1.0] * len(outputs), outputs):
            logits = logits.float()
            loss = loss + weight * (
                F.cross_entropy(logits, y) if soft is None else
                distillation_loss(logits, soft, y, self.temperature, self.alpha))
        return loss


class _Progress:
    """A rich progress bar, or one-line messages every 5 %, or nothing."""

    def __init__(self, progress, total: int):
        self.progress, self.total, self.bar, self.task, self.last = progress, total, None, None, -1

    def __enter__(self):
        if self.progress is True:
            from rich.errors import LiveError
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            bar = Progress(TextColumn("fine-tune"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.description}"), TimeElapsedColumn(),
                           TimeRemainingColumn(), transient=True)
            try:
                bar.start()
            except LiveError:  # another live display (e.g. edgec build's spinner) owns the screen
                return self
            self.bar, self.task = bar, bar.add_task("", total=self.total)
        return self

    def advance(self, step: int, done: float, message: str) -> None:
        """``done``: fraction of the budget used (steps or time, whichever is further)."""
        if self.bar is not None:
            self.bar.update(self.task, completed=step, description=message)
        elif callable(self.progress):
            percent = int(100 * done)
            if percent // 5 != self.last:
                self.last = percent // 5
                self.progress(f"fine-tune {percent} % of budget, step {step}, {message}")

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
