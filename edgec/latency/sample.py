"""Seeding a board's profile database: measure a family of configurations without training them.

Latency does not depend on the weights' values, so a configuration's structure is built straight
from the model: a one-shot structured prune to a MAC cut (no fine-tune, no reconstruction, no
accuracy budget), BatchNorm folding, ONNX export and, unless fp32, int8 PTQ with a forced scheme
calibrated on a few images; the result is compiled for the target, measured on the device and
recorded in ProfileDB with its features (:func:`edgec.latency.features.artifact_features`) and
the configuration it came from.
Each backend has its own structures (:data:`BACKEND_SCHEMES`): ONNX Runtime's are ONNX models,
quantized by the ``quantize`` pass with a forced scheme; ExecuTorch's are the torch model
quantized by ``quantize_pt2e`` (XNNPACKQuantizer: signed int8 activations and weights, so
``s8s8``) and lowered to a ``.pte``, as the mobile-int8 recipes build them.
Each structure is built once per run. A round measures all of them together, as one
measurement set (:func:`edgec.measure_set.measure_set`: one runner process, ``windows`` short
windows of each, interleaved, each structure loaded afresh per window, the machine's drift
taken out) and records one measurement per structure, whose ``level_ms`` the latency model
learns. A configuration already recorded for the device, model and protocol is
skipped, so an interrupted ``edgec latency sample`` resumes where it stopped; one recorded with
features of an older format is measured again.
"""

from __future__ import annotations

import itertools
import random
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from edgec.errors import ConfigError, PassError
from edgec.latency.features import FEATURES_FORMAT
from edgec.measure import MeasureSpec
from edgec.measure_set import measure_set

CUTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)  # MAC fractions removed
SCHEMES = ("fp32", "u8s8", "u8u8", "s8s8", "s8s8-symmetric")
# the structures each backend is sampled in: what edgec's recipes build for it
BACKEND_SCHEMES = {"onnxruntime": SCHEMES, "executorch": ("s8s8",)}
CALIBRATION_IMAGES = 64  # ranges for latency only: a few images do
WINDOW = MeasureSpec(warmup=3, repeat=5, min_time_s=0.1)  # short: many loads beat long windows
# (`edgec latency sample`'s defaults are these and SampleRequest.windows)


@dataclass(frozen=True)
class SampleConfig:
    """One structure to measure: MAC cut, channel multiple, precision/scheme, threads, backend."""

    cut: float
    channel_multiple: int
    scheme: str  # "fp32" or an int8 scheme (edgec.int8.SCHEMES; for executorch XNNPACK's s8s8)
    per_channel: bool
    threads: int
    backend: str = "onnxruntime"

    def key(self) -> str:
        backend = "" if self.backend == "onnxruntime" else f" backend={self.backend}"
        return (f"cut={self.cut:g} multiple={self.channel_multiple} scheme={self.scheme} "
                f"per_channel={self.per_channel} threads={self.threads}{backend}")


def sample_configs(count: int, multiples: tuple[int, ...], threads: tuple[int, ...],
                   seed: int = 0, backends: tuple[str, ...] = ("onnxruntime",)
                   ) -> list[SampleConfig]:
    """``count`` distinct configurations of each backend, drawn from its grid in a fixed order
    (``seed``) and taken in turns across backends: the first of them are the same whatever
    ``count``, so a larger sample extends a smaller one."""
    drawn = [_backend_grid(backend, multiples, threads, seed)[:count] for backend in backends]
    return [config for turn in itertools.zip_longest(*drawn) for config in turn if config]


def _backend_grid(backend: str, multiples: tuple[int, ...], threads: tuple[int, ...],
                  seed: int) -> list[SampleConfig]:
    if backend not in BACKEND_SCHEMES:
        raise ConfigError(f"latency sample: backend {backend!r} has no sampled structures; "
                          f"choose from {', '.join(BACKEND_SCHEMES)}")
    grid = [SampleConfig(cut, multiple, scheme, per_channel, t, backend)
            for cut in CUTS for multiple in multiples for scheme in BACKEND_SCHEMES[backend]
            for per_channel in ((False,) if scheme == "fp32" else (True, False))
            for t in threads]
    grid = list(dict.fromkeys(replace(c, channel_multiple=multiples[0]) if c.cut == 0 else c
                              for c in grid))  # an unpruned model has no multiple
    random.Random(seed).shuffle(grid)
    return grid


@dataclass(frozen=True)
class SampleRequest:
    """What ``edgec latency sample`` needs: ``models`` (model TOMLs), each sampled with the
    same ``count`` configurations per backend, all measured together."""

    models: tuple[Path, ...]
    device: str = "local"
    target: str = "local"
    count: int = 40
    multiples: tuple[int, ...] = (8, 16)
    threads: tuple[int, ...] = (1,)
    measure: MeasureSpec = WINDOW  # one window of the measurement set
    profiles: Path = Path("profiles")
    seed: int = 0
    rounds: int = 1  # measurements (records) per configuration, each a measurement set's
    backends: tuple[str, ...] = ("onnxruntime",)  # each with `count` configurations
    windows: int = 20  # windows per structure in one measurement set

    def __post_init__(self):
        if self.windows < 1 or self.rounds < 1:
            raise ConfigError(f"latency sample: windows {self.windows} and rounds "
                              f"{self.rounds} must be >= 1 (defaults: --windows 20, "
                              f"--rounds 1)")


@dataclass(frozen=True)
class SampleOutcome:
    """What a run did: each measurement made now (a configuration once per round and model),
    the configurations found in the profile database, those a model cannot be cut to."""

    measured: tuple[SampleConfig, ...]
    skipped: tuple[SampleConfig, ...]
    unbuildable: tuple[tuple[SampleConfig, str], ...] = ()  # e.g. a cut the widths cannot reach


@dataclass(frozen=True, eq=False)  # one per model of a run, compared as itself
class _Source:
    """A model to sample structures of: its TOML's config, the torch model, a few images."""

    config: object
    torch: object
    calibration: object


def _source(path: Path) -> _Source:
    from edgec.data import load_data_config
    from edgec.model import load_model_config, load_torch_model

    config = load_model_config(path)
    calibration = load_data_config(config.resolve(config.data)).load("calibration") \
        .head(CALIBRATION_IMAGES)
    return _Source(config, load_torch_model(config), calibration)


def run_sample(request: SampleRequest,
               progress: Callable[[str], None] = lambda message: None) -> SampleOutcome:
    """Build, measure and record every configuration of every model not yet in the profile
    database; a round measures the structures of all models together."""
    from edgec.devices import open_device
    from edgec.profiles import ProfileDB
    from edgec.targets import load_target

    if not request.models:
        raise ConfigError("latency sample: no model to sample; give --model MODEL.toml")
    target = load_target(request.target)
    configs = sample_configs(request.count, request.multiples, request.threads, request.seed,
                             request.backends)
    foreign = [name for name in request.backends if name not in target.backends]
    if foreign:
        raise ConfigError(f"latency sample: target {target.name!r} has no backend "
                          f"{', '.join(foreign)} (it has {', '.join(target.backends)}); drop "
                          f"--backend {foreign[0]} or sample for a target that has it")
    sources = [_source(path) for path in request.models]
    work = [(source, sample) for source in sources for sample in configs]
    folder = {item: str(index) for index, item in enumerate(work)}  # where each is built
    database = ProfileDB(request.profiles)
    device = open_device(request.device)
    measured, unbuildable = [], []
    built: dict[tuple, tuple[Path, dict]] = {}  # each structure built once, kept a run
    try:
        done = {s: _recorded(database, device.name, s.config.name) for s in sources}
        times = {(source, sample): done[source].get(_protocol_key(sample, request), 0)
                 for source, sample in work}
        skipped = [sample for source, sample in work if times[(source, sample)]]
        with tempfile.TemporaryDirectory(prefix="edgec-sample-") as scratch:
            for round_ in range(request.rounds):  # each round: one measurement set per threads
                failed = {item for item, _ in unbuildable}
                due = [item for item in work if times[item] <= round_ and item not in failed]
                _build_missing(due, built, unbuildable, progress, lambda item: _build_one(
                    item[1], item[0].torch, item[0].config, target, item[0].calibration,
                    Path(scratch) / folder[item]))
                for threads in request.threads:
                    group = [item for item in due if item in built and item[1].threads == threads]
                    if group:
                        progress(f"round {round_ + 1} of {request.rounds}: measuring "
                                 f"{len(group)} structures together, {request.windows} "
                                 f"windows each, {threads} thread(s)")
                        _measure_group(group, request, built, device, database)
                        measured += [sample for _, sample in group]
    finally:
        getattr(device, "close", lambda: None)()
    return SampleOutcome(tuple(measured), tuple(skipped),
                         tuple((sample, why) for (_, sample), why in unbuildable))


def _build_missing(due: list[tuple], built: dict, unbuildable: list, progress,
                   build: Callable[[tuple], tuple[Path, dict]]) -> None:
    """Build each (source, configuration) of ``due`` not built yet; one that is not a structure
    of its model (e.g. a cut its widths cannot reach) goes to ``unbuildable``, the others
    count."""
    for item in due:
        if item in built:
            continue
        progress(f"building {item[0].config.name}: {item[1].key()}")
        try:
            built[item] = build(item)
        except PassError as exc:
            progress(f"  not buildable: {exc}")
            unbuildable.append((item, str(exc)))


def _measure_group(group: list[tuple], request: SampleRequest, built: dict, device,
                   database) -> None:
    """The structures of ``group`` (one thread count) measured together and recorded."""
    from edgec.latency.features import profile_features

    spec = replace(request.measure, threads=group[0][1].threads)
    measurements = measure_set(device, [built[item][0] for item in group], spec,
                               request.windows)
    for item, measurement in zip(group, measurements):
        (directory, manifest), sample = built[item], item[1]
        database.record(device.name, manifest, spec, measurement,
                        profile_features(directory, sample.threads), {"sample": asdict(sample)})


def _protocol_key(sample: SampleConfig, request: SampleRequest) -> str:
    spec = replace(request.measure, threads=sample.threads)
    return _key(sample, spec, request.windows)


def _key(sample: SampleConfig, spec: MeasureSpec, windows: int) -> str:
    protocol = {k: v for k, v in asdict(spec).items() if k != "data"}
    return f"{sample.key()} windows={windows} {sorted(protocol.items())}"


def _recorded(database, device: str, model: str) -> dict[str, int]:
    """How many times the database holds each sample configuration (with its protocol: the
    window's and the number of windows of its set) of this model."""
    found: dict[str, int] = {}
    for record in database.records(device):
        sample = record.get("sample")
        current = (record.get("features") or {}).get("format") == FEATURES_FORMAT
        if sample and record.get("model") == model and current:  # older features: again
            spec = MeasureSpec(**{k: v for k, v in record["protocol"].items()
                                  if k in MeasureSpec.__dataclass_fields__})
            key = _key(SampleConfig(**sample), spec, record["summary"].get("windows", 0))
            found[key] = found.get(key, 0) + 1
    return found


def _build_one(sample: SampleConfig, model, config, target, calibration, scratch: Path
               ) -> tuple[Path, dict]:
    """The configuration's artifact directory under ``scratch`` and its manifest."""
    from edgec.build import write_artifact

    scratch.mkdir(parents=True)
    built = _structure(sample, model, config, target, calibration, scratch)
    directory = scratch / "artifact"
    directory.mkdir()
    manifest = write_artifact(built, config, target, [{"sample": asdict(sample)}], directory,
                              sample.backend)
    return directory, manifest


def _structure(sample: SampleConfig, model, config, target, calibration, scratch: Path):
    """The configuration's structure: pruned to the cut, folded, then for ONNX Runtime exported
    and quantized by the ``quantize`` pass, for ExecuTorch quantized by ``quantize_pt2e``."""
    from edgec.artifact import Artifact
    from edgec.passes import PASSES
    from edgec.pipeline import Context, Pipeline, Step

    steps = []
    if sample.cut > 0:
        steps.append(("prune", {"ratio": sample.cut, "ratio_of": "macs", "reconstruct": False,
                                "channel_multiple": sample.channel_multiple,
                                "finetune_epochs": 0.0}))
    steps.append(("fuse", {}))
    if sample.backend == "executorch":
        steps.append(("quantize_pt2e", {"per_channel": sample.per_channel,
                                        "calibration_count": len(calibration)}))
    else:
        steps.append(("export", {}))
        if sample.scheme != "fp32":
            steps.append(("quantize", {"scheme": sample.scheme,
                                       "per_channel": sample.per_channel,
                                       "calibration": "data",
                                       "calibration_count": len(calibration)}))
    pipeline = Pipeline([Step(PASSES[name](), PASSES[name].Params(**params))
                         for name, params in steps], "sample")
    ctx = Context(target, config.input, calibration, scratch, baseline=model,
                  backend=sample.backend)
    source = Artifact("torch", model, extras={"input_shape": list(config.input.shape)})
    return pipeline.run(source, ctx)
