"""Model references, input specs and safe loading of checkpoints, ExportedPrograms and ONNX."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgec.config import from_dict, load_toml, resolve_path, suggest
from edgec.errors import ConfigError, ModelError


@dataclass(frozen=True)
class InputSpec:
    """What one input sample looks like and how raw data is normalised into it.

    ``shape`` excludes the batch dimension and is channels-first (C, H, W). Raw images are
    stored NHWC as uint8; they become ``(x * scale - mean) / std`` per channel.
    """

    shape: tuple[int, ...]
    dtype: str = "float32"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __post_init__(self):
        if not self.shape or any(d <= 0 for d in self.shape):
            raise ConfigError(f"input shape {self.shape} is invalid; give positive (C, H, W)")
        channels = self.shape[0]
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values and len(values) != channels:
                raise ConfigError(
                    f"input {name} {values} has {len(values)} values for {channels} channels"
                )
        if any(s == 0 for s in self.std):
            raise ConfigError(f"input std {self.std} contains 0; every std must be non-zero")

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "scale": self.scale,
                "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class ModelConfig:
    """A model TOML: ``factory`` and optional ``checkpoint``, or a ``file`` (.pt2 / .onnx)."""

    name: str
    input: InputSpec
    factory: str = ""
    checkpoint: str = ""
    # a whole pickled model (torch.save(model)) runs code when loaded: only on explicit trust
    trust_checkpoint: bool = False
    file: str = ""
    data: str = ""
    num_classes: int = 10
    root: Path = field(default=Path("."), compare=False)

    def resolve(self, relative: str) -> Path:
        return resolve_path(self.root, relative)


def load_model_config(path: str | Path) -> ModelConfig:
    """Parse a model TOML (see examples/*/model.toml); paths are relative to the file."""
    path = Path(path)
    raw = load_toml(path)
    where = str(path)
    input_table = raw.pop("input", None)
    if not isinstance(input_table, dict):
        raise ConfigError(f"{where}: missing [input] table with at least 'shape'")
    spec = from_dict(InputSpec, input_table, f"{where} [input]")
    config = from_dict(ModelConfig, {**raw, "input": spec}, where)
    if bool(config.factory) == bool(config.file):
        raise ConfigError(f"{where}: give exactly one of 'factory' or 'file'")
    return ModelConfig(**{**config.__dict__, "root": path.parent.resolve()})


def import_factory(ref: str, root: Path = Path(".")):
    """Resolve ``file.py:factory`` (relative to ``root``) or ``package.module:factory``."""
    module_ref, sep, attr = ref.partition(":")
    if not sep or not module_ref or not attr.isidentifier():
        raise ModelError(
            f"model reference {ref!r} is not of the form 'file.py:factory' or 'pkg.module:factory'"
        )
    if module_ref.endswith(".py"):
        module = _import_file((root / module_ref).resolve(), ref)
    else:
        try:
            module = importlib.import_module(module_ref)
        except ImportError as exc:
            raise ModelError(f"cannot import module {module_ref!r} of {ref!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        callables = sorted(name for name, value in vars(module).items()
                           if callable(value) and not name.startswith("_")
                           and getattr(value, "__module__", None) == module.__name__)
        raise ModelError(f"{ref!r}: module has no callable {attr!r}; "
                         f"{suggest(attr, callables, 'its callables')}")
    return factory


def _import_file(path: Path, ref: str):
    if not path.is_file():
        raise ModelError(f"model file {str(path)!r} of {ref!r} does not exist")
    name = f"edgec_user_{abs(hash(str(path)))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ModelError(f"importing {str(path)!r} failed: {type(exc).__name__}: {exc}") from exc
    return module


def load_checkpoint(model, path: Path, trust: bool = False) -> None:
    """Load a state dict safely (weights_only) into ``model``; strips DataParallel ``module.``.

    ``trust``: also accept a whole pickled model (its state dict is used), which runs code."""
    import torch

    if not path.is_file():
        raise ModelError(f"checkpoint {str(path)!r} does not exist; check the path")
    state = _read_checkpoint(path, trust)
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"checkpoint {str(path)!r} holds {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    problems = state_dict_mismatch(model.state_dict(), state)
    if problems:
        raise ModelError(f"checkpoint {str(path)!r} does not fit model {type(model).__name__}: "
                         f"{problems}; is the factory right?")
    model.load_state_dict(state, strict=True)


def _read_checkpoint(path: Path, trust: bool):
    import pickle
    import warnings

    import torch

    if trust:
        warnings.warn(f"loading {path} with weights_only=False (trust_checkpoint = true): "
                      f"unpickling runs code from the file", stacklevel=3)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"checkpoint {str(path)!r} is a pickled object, not plain tensors (e.g. "
            f"torch.save(model)); loading it would run code from the file. Save the weights "
            f"instead: torch.save(model.state_dict(), {path.name!r}); or, if you trust the file, "
            f"set trust_checkpoint = true in the model TOML") from exc
    except Exception as exc:
        raise ModelError(f"checkpoint {str(path)!r} cannot be read: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc


def state_dict_mismatch(expected: dict, found: dict) -> str:
    """'n missing (first 3), n unexpected (first 3), n of another shape (first 3)', or ''."""
    # BatchNorm fills a missing num_batches_tracked itself (checkpoints from older torch)
    missing = [k for k in expected if k not in found and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in found if k not in expected]
    reshaped = [f"{k} {tuple(found[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
                if k in found and hasattr(found[k], "shape")
                and tuple(found[k].shape) != tuple(expected[k].shape)]
    parts = [f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
             for label, keys in (("missing", missing), ("unexpected", unexpected),
                                 ("of another shape (checkpoint vs model)", reshaped)) if keys]
    return "; ".join(parts)


def load_torch_model(config: ModelConfig):
    """Build the float torch model described by ``config`` in eval mode, checked on its input."""
    import torch

    if config.file:
        path = config.resolve(config.file)
        if not path.is_file():
            raise ModelError(f"model file {str(path)!r} does not exist; check the path")
        if path.suffix != ".pt2":
            raise ModelError(f"{str(path)!r} is not a .pt2 ExportedProgram; use load_onnx for .onnx")
        model = torch.export.load(str(path)).module()
    else:
        model = import_factory(config.factory, config.root)()
        if not isinstance(model, torch.nn.Module):
            raise ModelError(f"factory {config.factory!r} returned {type(model).__name__}, not nn.Module")
        if config.checkpoint:
            load_checkpoint(model, config.resolve(config.checkpoint), config.trust_checkpoint)
        model.eval()
    check_input(model, config.input)
    return model


def check_input(model, spec: InputSpec) -> None:
    """Run one dummy batch; a shape the model rejects is a ModelError naming the shape."""
    import torch

    x = torch.zeros((1, *spec.shape), dtype=getattr(torch, spec.dtype))
    try:
        with torch.no_grad():
            model(x)
    except Exception as exc:
        raise ModelError(
            f"input shape {tuple(spec.shape)} does not fit the model: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0]}; fix [input] shape in the model config"
        ) from exc
