"""A torch model's widths and weights as plain tensors and ints, and their replay onto the
model it was derived from.

Structured pruning changes only the widths of standard layers (a convolution's channels, a
BatchNorm's features, a linear layer's features) and the weights. Those round-trip through
``torch.load(weights_only=True)``; arbitrary modules (pickled classes, FX code) would not, and
loading pickles is what edgec never does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgec.errors import PassError

WIDTHS = {
    nn.Conv2d: ("in_channels", "out_channels"),
    nn.ConvTranspose2d: ("in_channels", "out_channels"),
    nn.BatchNorm2d: ("num_features",),
    nn.BatchNorm1d: ("num_features",),
    nn.Linear: ("in_features", "out_features"),
}


def _widths(module: nn.Module) -> dict[str, int]:
    for kind, names in WIDTHS.items():
        if type(module) is kind:
            return {name: getattr(module, name) for name in names}
    return {}


def save_widths_and_weights(model: nn.Module, path: Path) -> None:
    """Write the layers' widths and the full state dict (tensors only) to ``path``."""
    widths = {name: _widths(module) for name, module in model.named_modules() if _widths(module)}
    torch.save({"widths": widths, "state": model.state_dict()}, path)


def load_widths_and_weights(base: nn.Module, path: Path) -> nn.Module:
    """``base`` (the model the saved one was derived from; changed in place) resized to the
    saved widths and loaded with the saved weights; a structure that does not fit is a
    PassError."""
    saved = torch.load(path, weights_only=True)
    modules = dict(base.named_modules())
    for name, widths in saved["widths"].items():
        if name not in modules or not _widths(modules[name]):
            raise PassError(f"cached weights name layer {name!r}, which the model lacks")
        for attribute, value in widths.items():
            setattr(modules[name], attribute, value)
    for name, tensor in saved["state"].items():
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        if module is None:
            raise PassError(f"cached weight {name!r} has no module in the model")
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(tensor.clone())
        elif leaf in module._buffers:
            module._buffers[leaf] = tensor.clone()
        else:
            raise PassError(f"cached weight {name!r} is neither parameter nor buffer")
    return base.eval()


def resize_to_weights(model: nn.Module, values: dict) -> list[str]:
    """Resize the Conv2d and Linear layers of ``model`` whose weight in ``values`` (parameter
    name → array, e.g. an ONNX file's initialisers) has other widths, as structured pruning
    leaves them, and resize their biases; returns the parameter names resized. The weights'
    values are not copied."""
    modules = dict(model.named_modules())
    resized = []
    for name, value in values.items():
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        if leaf != "weight" or type(module) not in (nn.Conv2d, nn.Linear):
            continue
        if tuple(module.weight.shape) == tuple(value.shape) or value.ndim != module.weight.ndim:
            continue
        if isinstance(module, nn.Conv2d):
            module.out_channels, module.in_channels = value.shape[0], value.shape[1] * module.groups
        else:
            module.out_features, module.in_features = value.shape[0], value.shape[1]
        module.weight = nn.Parameter(torch.zeros(tuple(value.shape)))
        if module.bias is not None:
            module.bias = nn.Parameter(torch.zeros(value.shape[0]))
        resized.append(name)
    return resized
