"""ZeroQ data-free calibration: synthesise inputs whose BatchNorm batch statistics match.

Cai et al., ZeroQ (2020): start from Gaussian noise and optimise the inputs so that, at every
BatchNorm layer, the mean and standard deviation of the incoming batch equal the layer's
running statistics. The result ("distilled data") calibrates activation ranges without any
real image.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from edgec.errors import PassError


@dataclass(frozen=True)
class Synthesis:
    """Synthetic inputs (float NCHW, already normalised) and how they were made."""

    inputs: np.ndarray
    losses: tuple[float, ...]  # BN-statistics loss per step, first to last
    seconds: float


def bn_layers(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics (ZeroQ's targets)."""
    return [m for m in model.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def input_bounds(spec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel range of valid model inputs: uint8 pixels through the input spec's normalisation."""
    channels = spec.shape[0]
    low = torch.zeros(channels)
    high = torch.full((channels,), 255.0 * spec.scale)
    if spec.mean:
        mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)
        low, high = (low - mean) / std, (high - mean) / std
    shape = (1, channels) + (1,) * (len(spec.shape) - 1)
    return low.reshape(shape), high.reshape(shape)


@contextmanager
def _batch_statistics(layers):
    """Collect (layer, batch mean, batch std) of every BN layer's input while active."""
    seen: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]] = []

    def record(module, args):
        x = args[0]
        dims = [0, *range(2, x.dim())]
        seen.append((module, x.mean(dims), torch.sqrt(x.var(dims, unbiased=False) + module.eps)))

    hooks = [m.register_forward_pre_hook(record) for m in layers]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def _statistics_loss(seen) -> torch.Tensor:
    return sum(torch.linalg.vector_norm(mean - m.running_mean)
               + torch.linalg.vector_norm(std - torch.sqrt(m.running_var + m.eps))
               for m, mean, std in seen)


def _frozen_copy(model: torch.nn.Module) -> tuple[torch.nn.Module, list]:
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    layers = bn_layers(model)
    if not layers:
        raise PassError("data-free calibration (ZeroQ) needs BatchNorm layers with running "
                        "statistics in the float model; this model has none: give calibration data")
    return model, layers


def synthesize(model: torch.nn.Module, spec, count: int = 64, steps: int = 200, lr: float = 0.1,
               seed: int = 0, progress: Callable[[str], None] = lambda message: None) -> Synthesis:
    """Optimise ``count`` random inputs with Adam so each BN layer sees its running statistics.

    Loss = sum over BN layers of ||mean_batch - running_mean||_2 + ||std_batch - running_std||_2.
    Inputs stay inside the range real (normalised) pixels can take. ``model`` is not modified.
    """
    model, layers = _frozen_copy(model)
    low, high = input_bounds(spec)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((count, *spec.shape), generator=generator).clamp_(low, high).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    losses = []
    started = time.perf_counter()
    with _batch_statistics(layers) as seen:
        for step in range(steps):
            seen.clear()
            optimizer.zero_grad()
            model(x)
            loss = _statistics_loss(seen)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                x.clamp_(low, high)
            losses.append(float(loss.detach()))
            if step % 50 == 0:
                progress(f"zeroq: step {step}/{steps}, BN-statistics loss {losses[-1]:.3f}")
    return Synthesis(x.detach().numpy().astype(np.float32), tuple(losses),
                     time.perf_counter() - started)


def bn_statistics_loss(model: torch.nn.Module, inputs: np.ndarray) -> float:
    """The ZeroQ loss of ``inputs`` (float NCHW) on ``model``: for synthetic or real data."""
    model, layers = _frozen_copy(model)
    with _batch_statistics(layers) as seen, torch.no_grad():
        model(torch.from_numpy(inputs))
        return float(_statistics_loss(seen))
