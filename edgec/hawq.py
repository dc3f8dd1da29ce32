"""HAWQ-V2 mixed precision: Hessian-trace sensitivity, per-channel low-bit weights, Pareto order.

Sensitivity of layer i at b bits (Dong et al., HAWQ-V2):
    Omega_i(b) = mean(diag(H_i)) * ||Q_b(W_i) - W_i||^2
where mean(diag(H_i)) = Tr(H_i) / n_i is estimated with Hutchinson's method
(E[v^T H v] with Rademacher v) from Hessian-vector products of the training loss.
Layers are then ordered by how much sensitivity each byte saved costs; the prefixes of that
order are the nested configurations on the lower convex hull of the sensitivity-vs-size
Pareto front, which a bisection can search with a measured accuracy check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

WEIGHT_BITS = (4, 8)
CLIP_RATIOS = np.linspace(0.3, 1.0, 36)


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of ``bits``-bit weights (two's complement, as ONNX INT4/INT8)."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def fake_quantize(weight: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """Symmetric per-output-channel quantize-dequantize of ``weight`` (axis 0)."""
    low, high = qrange(bits)
    shape = (-1,) + (1,) * (weight.ndim - 1)
    s = scales.reshape(shape)
    return np.clip(np.round(weight / s), low, high) * s


def channel_scales(weight: np.ndarray, bits: int) -> np.ndarray:
    """Per-output-channel scales minimising ||Q(W) - W||^2 over a grid of clipping ratios.

    For 8 bits the min-max scale is already near optimal; for 4 bits clipping the largest
    weights cuts the rounding error of all others, which is where most of the accuracy is.
    """
    flat = weight.reshape(weight.shape[0], -1).astype(np.float64)
    absmax = np.maximum(np.abs(flat).max(axis=1), 1e-12)
    _, high = qrange(bits)
    ratios = CLIP_RATIOS if bits < 8 else (1.0,)
    best_err = np.full(len(absmax), np.inf)
    best = absmax / high
    for ratio in ratios:
        scales = absmax * ratio / high
        err = ((fake_quantize(flat, scales, bits) - flat) ** 2).sum(axis=1)
        better = err < best_err
        best_err[better], best[better] = err[better], scales[better]
    return best.astype(np.float32)


def perturbation(weight: np.ndarray, bits: int) -> float:
    """||Q_b(W) - W||^2 with the scales the artifact uses."""
    w = weight.astype(np.float64)
    return float(((fake_quantize(w, channel_scales(weight, bits).astype(np.float64), bits) - w) ** 2).sum())


def hessian_traces(model: torch.nn.Module, params: dict[str, torch.nn.Parameter],
                   batches: Iterable[tuple[torch.Tensor, torch.Tensor]], samples: int = 16,
                   seed: int = 0) -> dict[str, float]:
    """Average Hessian trace Tr(H_i)/n_i of the cross-entropy loss for each tensor in ``params``.

    Hutchinson's estimator with ``samples`` Rademacher probes per batch, drawn from a
    generator seeded with ``seed`` (so the result is reproducible). The Hessian is the
    diagonal block of each tensor; the probes of all tensors are drawn jointly, which gives
    every block's trace from one Hessian-vector product per probe.
    """
    names = list(params)
    tensors = [params[n] for n in names]
    generator = torch.Generator().manual_seed(seed)
    totals = np.zeros(len(names))
    count = 0
    model.eval()
    for x, y in batches:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, tensors, create_graph=True)
        for _ in range(samples):
            probes = [torch.randint(0, 2, t.shape, generator=generator).to(t.dtype) * 2 - 1
                      for t in tensors]
            hvps = torch.autograd.grad(grads, tensors, grad_outputs=probes, retain_graph=True)
            totals += [float((h * v).sum()) for h, v in zip(hvps, probes)]
            count += 1
    return {n: totals[i] / count / tensors[i].numel() for i, n in enumerate(names)}


@dataclass(frozen=True)
class LayerCost:
    """One quantizable layer: its weight size and sensitivity at 4 and 8 bits."""

    name: str
    numel: int
    trace: float
    sensitivity: dict[int, float]

    def bytes_at(self, bits: int) -> float:
        return self.numel * bits / 8

    def cost_per_byte(self) -> float:
        """Sensitivity added per weight byte saved by going from 8 to 4 bits."""
        saved = self.bytes_at(8) - self.bytes_at(4)
        return (self.sensitivity[4] - self.sensitivity[8]) / saved


def layer_costs(weights: dict[str, np.ndarray], traces: dict[str, float]) -> list[LayerCost]:
    """Sensitivity Omega_i(b) = average trace x perturbation for b in {4, 8}."""
    return [LayerCost(name, int(w.size), traces[name],
                      {bits: traces[name] * perturbation(w, bits) for bits in WEIGHT_BITS})
            for name, w in weights.items()]


def pareto_order(costs: list[LayerCost]) -> list[str]:
    """Layers in the order they should drop to 4 bits: cheapest sensitivity per byte first.

    Ties break on the name, so the order is deterministic.
    """
    return [c.name for c in sorted(costs, key=lambda c: (c.cost_per_byte(), c.name))]


def bits_for(order: list[str], k: int) -> dict[str, int]:
    """The configuration with the first ``k`` layers of ``order`` at 4 bits, the rest at 8."""
    return {name: 4 if i < k else 8 for i, name in enumerate(order)}


def largest_passing(low: int, high: int, passes: Callable[[int], bool]) -> int:
    """Largest k in [low, high] with ``passes(k)``, given ``passes(low)`` and monotone failure."""
    while low < high:
        mid = (low + high + 1) // 2
        if passes(mid):
            low = mid
        else:
            high = mid - 1
    return low
