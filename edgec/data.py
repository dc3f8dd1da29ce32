"""Datasets: npz files or generator functions, split into calibration and evaluation sets.

A dataset file holds ``images`` (uint8 N,H,W,C) and ``labels`` (int N). Calibration (also used
for fine-tuning and threshold choice) and evaluation splits must never share an image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgec.config import from_dict, load_toml, resolve_path
from edgec.errors import ConfigError, DataError
from edgec.model import InputSpec, import_factory
from edgec.runner import runner

AUGMENTS = ("none", "flip", "crop-flip", "crop-flip-shifted")


@dataclass(frozen=True)
class SplitSpec:
    """One split: an npz ``path`` or a ``generator`` ('file.py:fn' returning images, labels).

    ``augment``: the label-preserving augmentation fine-tuning may apply to this split's
    images: 'none', 'flip' (horizontal) or 'crop-flip' (4-pixel padded random crops and flips,
    the usual one for natural images such as CIFAR; wrong for digits or text);
    'crop-flip-shifted' also moves half of each batch by :func:`edgec.accuracy.shifted`
    (distillation then matches the teacher off the training distribution too).
    """

    path: str = ""
    generator: str = ""
    start: int = 0
    count: int = 0  # 0 = to the end
    augment: str = "none"

    def __post_init__(self):
        if bool(self.path) == bool(self.generator):
            raise ConfigError("a split needs exactly one of 'path' or 'generator'")
        if self.augment not in AUGMENTS:
            raise ConfigError(f"split augment {self.augment!r} unknown; use one of {AUGMENTS}")
        if self.start < 0 or self.count < 0:
            raise ConfigError(f"split start {self.start} / count {self.count} must be >= 0")

    def source(self) -> str:
        return self.path or self.generator


@dataclass(frozen=True)
class Dataset:
    """Images (uint8 NHWC) and labels of one split, with where they came from."""

    images: np.ndarray
    labels: np.ndarray
    origin: str
    augment: str = "none"  # see SplitSpec

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> Dataset:
        return self.slice(0, n)

    def slice(self, start: int, end: int) -> Dataset:
        """Samples [start:end], keeping the augmentation and naming the origin."""
        return Dataset(self.images[start:end], self.labels[start:end],
                       f"{self.origin}[{start}:{end}]", self.augment)


@dataclass(frozen=True)
class DataConfig:
    """The ``[calibration]`` and ``[evaluation]`` splits of a data TOML."""

    calibration: SplitSpec
    evaluation: SplitSpec
    root: Path = Path(".")

    def load(self, split: str) -> Dataset:
        spec = getattr(self, split)
        return load_split(spec, self.root)


def load_data_config(path: str | Path) -> DataConfig:
    """Parse a data TOML; splits of one source that overlap are a ConfigError."""
    path = Path(path)
    raw = load_toml(path)
    where = str(path)
    for split in ("calibration", "evaluation"):
        if not isinstance(raw.get(split), dict):
            raise ConfigError(f"{where}: missing [{split}] table")
    splits = {k: from_dict(SplitSpec, v, f"{where} [{k}]") if isinstance(v, dict) else v
              for k, v in raw.items()}
    config = from_dict(DataConfig, splits, where)
    _check_disjoint(config.calibration, config.evaluation, where)
    return DataConfig(config.calibration, config.evaluation, path.parent.resolve())


def _check_disjoint(a: SplitSpec, b: SplitSpec, where: str) -> None:
    if a.source() != b.source():
        return
    a_end = a.start + a.count if a.count else float("inf")
    b_end = b.start + b.count if b.count else float("inf")
    if a.start < b_end and b.start < a_end:
        raise ConfigError(
            f"{where}: calibration and evaluation both read {a.source()!r} with overlapping "
            f"ranges; give them disjoint start/count"
        )


def load_split(spec: SplitSpec, root: Path) -> Dataset:
    """Load one split as uint8 NHWC images and int64 labels."""
    if spec.path:
        path = resolve_path(root, spec.path)
        images, labels = load_npz(path)
        origin = path.name
    else:
        images, labels = import_factory(spec.generator, root)()
        images, labels = np.asarray(images), np.asarray(labels)
        origin = spec.generator
    end = spec.start + spec.count if spec.count else len(labels)
    if end > len(labels):
        raise DataError(f"{origin}: split [{spec.start}:{end}] exceeds its {len(labels)} samples")
    return Dataset(images[spec.start:end], labels[spec.start:end].astype(np.int64),
                   f"{origin}[{spec.start}:{end}]", spec.augment)


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``images`` and ``labels`` from an npz; anything else is a DataError naming the file."""
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist; check the path")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = {"images", "labels"} - set(npz.files)
            if missing:
                raise DataError(
                    f"data file {str(path)!r} lacks {sorted(missing)}; it has {npz.files}; "
                    f"save arrays named 'images' (uint8 N,H,W,C) and 'labels'"
                )
            images, labels = npz["images"], npz["labels"]
    except (OSError, ValueError) as exc:
        raise DataError(f"data file {str(path)!r} is not a readable npz: {exc}") from exc
    if images.ndim != 4 or len(images) != len(labels):
        raise DataError(
            f"data file {str(path)!r}: images {images.shape} / labels {labels.shape} are not "
            f"N,H,W,C images with one label each"
        )
    return images, labels


def preprocess(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 NHWC images to normalised float NCHW, with the artifact runner's own code."""
    expected = (spec.shape[1], spec.shape[2], spec.shape[0])
    if tuple(images.shape[1:]) != expected:
        raise DataError(
            f"images of shape {tuple(images.shape[1:])} (H,W,C) do not match the model input "
            f"{tuple(spec.shape)} (C,H,W)"
        )
    return runner.preprocess(images, spec.to_json())


def to_batches(dataset: Dataset, spec: InputSpec, size: int) -> list[np.ndarray]:
    """The dataset pre-processed into consecutive batches of ``size`` images."""
    return [preprocess(dataset.images[i:i + size], spec) for i in range(0, len(dataset), size)]


def generated(spec: InputSpec, count: int, seed: int = 0) -> Dataset:
    """Random uint8 images of the model's input shape (for models without data)."""
    rng = np.random.default_rng(seed)
    c, h, w = spec.shape
    images = rng.integers(0, 256, size=(count, h, w, c), dtype=np.uint8)
    return Dataset(images, np.zeros(count, np.int64), f"generated(seed={seed})")
