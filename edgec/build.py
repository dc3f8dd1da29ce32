"""``edgec build``: model + recipe + target → measured, deployable artifact directory."""

from __future__ import annotations

import platform
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgec import __version__, step_outputs
from edgec.accuracy import top1, torch_logits
from edgec.artifact import (
    Artifact,
    atomic_directory,
    content_hash,
    read_manifest,
    sha256_file,
    write_json,
)
from edgec.backends import BACKENDS
from edgec.budget import BudgetSpec, Ledger
from edgec.cache import Cache, dataset_identity, digest, library_versions
from edgec.cpu import CpuInfo, host_cpu, target_cpu
from edgec.data import Dataset, load_data_config
from edgec.devices import LocalDevice, open_device
from edgec.errors import CompileError, ConfigError, EdgecError, ModelError
from edgec.latency.features import layer_table_from_onnx, profile_features
from edgec.measure import Measurement, MeasureSpec
from edgec.model import ModelConfig, load_model_config, load_torch_model
from edgec.passes.export import ExportParams, ExportPass
from edgec.pipeline import Context, Pipeline, Step
from edgec.profiles import ProfileDB
from edgec.recipes import load_recipe, resolve_recipe
from edgec.report import Row, cpu_words, write_reports
from edgec.runner import RUNNER_PATH
from edgec.targets import Target, load_target


@dataclass(frozen=True)
class BuildRequest:
    """Everything ``edgec build`` needs; paths as the user gave them."""

    model: Path
    target: str = "local"
    recipe: Path | str | None = None  # a TOML path or a built-in recipe's name
    data: Path | None = None
    out: Path = Path("build")
    measure: MeasureSpec = field(default_factory=MeasureSpec)
    profile: bool = True
    device: str = "local"  # profile and evaluate there too (devices/NAME.toml)
    eval_count: int = 0  # images the device evaluates (0: the whole evaluation split)
    profiles: Path = Path("profiles")  # a board's profiles are appended to <profiles>/<device>/
    backend: str | None = None  # one of the target's backends instead of its first that fits
    tune: int = 0  # MetaSchedule trial budget for the tvm backend (0: untuned)
    overrides: dict[str, Any] = field(default_factory=dict)  # {"prune.ratio": 0.2}: see --set
    budget: float | None = None  # top-1 points the build may lose (None: the recipe's [budget])
    cache: bool = True  # look steps, evaluations and measurements up in the cache (edgec.cache)
    evaluate: bool = True  # top-1 on the evaluation split here (a search skips it: see search)
    recheck: bool = True  # the budget's re-check now (a search defers it to :func:`recheck`)
    reference: bool = True  # time the plain fp32 export for the table (a search has it as a trial)
    # called with the finished artifact folder and manifest before profiling: False skips the
    # measurement (a search measuring only promising trials: edgec.search.predict)
    profile_when: Callable[[Path, dict[str, Any]], bool] | None = None


DISAGREEMENT_POINTS = 0.1  # host and device top-1 further apart than this: the build says so


@dataclass(frozen=True)
class BuildResult:
    directory: Path
    manifest: dict[str, Any]
    rows: tuple[Row, ...]
    warnings: tuple[str, ...] = ()


def default_recipe(target: Target | None = None) -> Path:
    """The target's ``[options] recipe`` (e.g. "fpga" for hls4ml targets), else int8."""
    return resolve_recipe(target.options.get("recipe", "int8") if target else "int8")


@dataclass(frozen=True)
class _Inputs:
    """What a build starts from: its files read, its budget's ledger set up."""

    config: ModelConfig
    target: Target
    pipeline: Pipeline
    calibration: Dataset  # what the passes may use (the ledger's slices taken out)
    evaluation: Dataset
    source: Artifact
    cache: Cache
    ledger: Ledger | None


def _inputs(request: BuildRequest, progress) -> _Inputs:
    config = load_model_config(request.model)
    target = load_target(request.target)
    overrides = request.overrides  # --budget first: budget.* overrides may then refine it
    if request.budget is not None:
        overrides = {"budget.points": request.budget, **overrides}
    pipeline = load_recipe(request.recipe or default_recipe(target)).with_overrides(overrides)
    pipeline.check_target(target)
    calibration, evaluation = _load_data(config, request.data)
    progress(f"loading model {config.name}")
    source = _load_source(config)
    cache = Cache(enabled=request.cache)
    budget = budget_spec(pipeline, request.budget)
    ledger = None
    if budget is not None:
        calibration, ledger = _ledger(budget, calibration, source, config, cache, pipeline,
                                      progress)
    return _Inputs(config, target, pipeline, calibration, evaluation, source, cache, ledger)


def _run_pipeline(inputs: _Inputs, request: BuildRequest, scratch: Path, profiler, cpu: CpuInfo,
                  progress) -> tuple[Context, Artifact]:
    ctx = Context(inputs.target, inputs.config.input, inputs.calibration, scratch,
                  baseline=inputs.source.payload, evaluation=inputs.evaluation,
                  progress=progress, cpu=cpu, backend=request.backend, device=profiler,
                  cache=inputs.cache, ledger=inputs.ledger)
    built = inputs.pipeline.run(inputs.source, ctx,
                                lambda name, s: progress(f"pass {name} done in {s:.1f} s"))
    return ctx, built


def build(request: BuildRequest, progress=lambda message: None) -> BuildResult:
    """Run the whole build; the artifact directory appears only when everything succeeded."""
    inputs = _inputs(request, progress)
    config, target, ledger = inputs.config, inputs.target, inputs.ledger
    float_top1 = _float_top1(inputs.source, inputs.evaluation, config, inputs.cache, progress) \
        if request.evaluate else None
    device, profiler = LocalDevice(), open_device(request.device)
    try:
        cpu = runs_on_cpu(target, profiler)
        progress(f"int8 kernels of {cpu.source}: {cpu.describe()}")
        with tempfile.TemporaryDirectory(prefix="edgec-") as scratch:
            scratch = Path(scratch)
            ctx, built = _run_pipeline(inputs, request, scratch, profiler, cpu, progress)
            if request.recheck and ledger is not None and ledger.recheck_slice is not None:
                _recheck(ledger, inputs.source, built, inputs.cache, progress)
            eval_npz = scratch / "evaluation.npz"
            np.savez(eval_npz, images=inputs.evaluation.images, labels=inputs.evaluation.labels)
            reference = _reference_row(inputs.source, float_top1, ctx, target, eval_npz,
                                       profiler, request)
            directory, manifest, rows = _write_build(built, config, target, inputs.pipeline,
                                                     request, eval_npz, device, reference,
                                                     progress, profiler, cpu, ctx)
    finally:
        getattr(profiler, "close", lambda: None)()
    latency = rows[0].latency
    if latency and request.device != "local" and not latency.extra.get("from_cache"):
        ProfileDB(request.profiles).record(profiler.name, manifest, request.measure, latency,
                                           profile_features(directory, request.measure.threads))
    return BuildResult(directory, manifest, (reference, *rows),
                       tuple(manifest.get("warnings", ())))


def recheck(request: BuildRequest, progress=lambda message: None) -> dict[str, Any] | None:
    """The re-check a build with ``recheck=False`` left out: the pipeline's output (its steps
    from the step cache) and the float model on the budget's re-check tail, as
    :class:`edgec.budget.Ledger` records it (``{"drop": ..., "images": ...}``); None when the
    budget has no re-check tail. Nothing is compiled, measured or written."""
    inputs = _inputs(request, progress)
    if inputs.ledger is None or inputs.ledger.recheck_slice is None:
        return None
    profiler = open_device(request.device)
    try:
        cpu = runs_on_cpu(inputs.target, profiler)
        with tempfile.TemporaryDirectory(prefix="edgec-") as scratch:
            _, built = _run_pipeline(inputs, request, Path(scratch), profiler, cpu, progress)
            _recheck(inputs.ledger, inputs.source, built, inputs.cache, progress)
    finally:
        getattr(profiler, "close", lambda: None)()
    return inputs.ledger.rechecked


def budget_spec(pipeline: Pipeline, points: float | None) -> BudgetSpec | None:
    """The build's accuracy budget: the recipe's ``[budget]`` with ``--budget`` as its points."""
    if points is None:
        return pipeline.budget
    return replace(pipeline.budget, points=points) if pipeline.budget else BudgetSpec(points)


def _float_top1(source: Artifact, evaluation: Dataset, config: ModelConfig, cache: Cache,
                progress) -> float | None:
    """The float model's top-1 on the evaluation split (PyTorch; cached)."""
    if source.stage != "torch":
        return None

    def counted(done: int, total: int) -> None:
        progress(f"evaluating the float model: {done:,} / {total:,} images")

    document = {"what": "torch top-1", "model": step_outputs.source_key(source),
                "data": dataset_identity(evaluation), "versions": library_versions()}
    return cache.remember("evaluations", document, lambda: top1(
        torch_logits(source.payload, evaluation, config.input, on_batch=counted),
        evaluation.labels))


def _ledger(spec: BudgetSpec, calibration: Dataset, source: Artifact, config: ModelConfig,
            cache: Cache, pipeline: Pipeline, progress) -> tuple[Dataset, Ledger]:
    """(the calibration images the passes may use, the ledger measuring on the rest)."""
    if calibration is None or len(calibration) == 0:
        raise ConfigError("an accuracy budget needs calibration data to measure on; give --data "
                          "with a [calibration] split or drop --budget / [budget]")
    usable, holdout, recheck = spec.split(calibration)
    ledger = Ledger(spec, holdout, config.input, float("nan"),
                    steps=[step.pass_.name for step in pipeline.steps], recheck=recheck,
                    progress=progress)
    progress(f"accuracy budget: measuring the float model on {holdout.origin} ({spec.view})")
    document = {"what": "ledger reference", "model": step_outputs.source_key(source),
                "holdout": dataset_identity(holdout), "view": spec.view,
                "versions": library_versions()}
    ledger.reference_top1 = cache.remember("evaluations", document, lambda: ledger.top1(source))
    return usable, ledger


def _recheck(ledger: Ledger, source: Artifact, built: Artifact, cache: Cache, progress) -> None:
    """Measure the float model and the pipeline's output on the re-check tail (both cached by
    content) and record it in the ledger; nothing is charged."""
    progress(f"accuracy budget: re-checking on {ledger.recheck_slice.origin} "
             f"({ledger.spec.view})")

    def top1_of(artifact: Artifact, what: str) -> float:
        document = {"what": what, "content": step_outputs.content_key(artifact),
                    "data": dataset_identity(ledger.recheck_slice), "view": ledger.spec.view,
                    "seed": ledger.seed, "versions": library_versions()}
        return cache.remember("evaluations", document,
                              lambda: ledger.top1(artifact, ledger.recheck_slice))

    entry = ledger.recheck(top1_of(source, "recheck reference"), top1_of(built, "recheck"))
    progress(f"accuracy budget: re-check drop {entry['drop']:+.2f} points on "
             f"{entry['images']} images the build did not choose on")


def runs_on_cpu(target: Target, device) -> CpuInfo:
    """The CPU whose int8 kernels will run the artifact: the board's when one is given (its
    runner probes it), else the target's (probed for ``local``, declared for boards)."""
    if device.name == "local":
        return target_cpu(target)
    return CpuInfo.from_runner(device.cpu(), f"device {device.name}")


def _load_data(config: ModelConfig, data: Path | None) -> tuple[Dataset, Dataset]:
    data_path = data or (config.resolve(config.data) if config.data else None)
    if data_path is None:
        raise ConfigError(f"model {config.name!r} names no data; pass --data DATA.toml")
    data_config = load_data_config(data_path)
    return data_config.load("calibration"), data_config.load("evaluation")


def _load_source(config: ModelConfig) -> Artifact:
    if config.file.endswith(".onnx"):
        path = config.resolve(config.file)
        if not path.is_file():
            raise ModelError(f"model file {str(path)!r} does not exist; check the path")
        return Artifact("onnx", path)
    return Artifact("torch", load_torch_model(config),
                    extras={"input_shape": list(config.input.shape)})  # torch backends export


def pick_backend(artifact: Artifact, target: Target, only: str | None = None,
                 options: dict[str, Any] | None = None):
    """The first of the target's backends (or just ``only``) that takes this artifact."""
    if only is not None and only not in target.backends:
        raise ConfigError(f"--backend {only!r} is not a backend of target {target.name!r}; "
                          f"choose one of {', '.join(target.backends)}")
    if artifact.extras.get("cascade") and only is None:
        return _cascade_backend(target)
    reasons = []
    for name in [only] if only else target.backends:
        if name not in BACKENDS:
            reasons.append(f"{name}: not registered in edgec.backends.BACKENDS")
            continue
        try:
            backend = BACKENDS[name](**(options or {}))
        except TypeError as exc:
            raise ConfigError(f"backend {name!r} takes no option {sorted(options or {})}") from exc
        accepts = getattr(backend, "accepts", lambda artifact: None)
        reason = (f"consumes {backend.consumes!r}" if backend.consumes != artifact.stage
                  else backend.supports(target) or accepts(artifact))
        if reason is None:
            return backend
        reasons.append(f"{name}: {reason}")
    raise CompileError(f"no backend of target {target.name!r} accepts this {artifact.stage!r} "
                       f"model ({'; '.join(reasons)})")


def _cascade_backend(target: Target):
    """An early-exit model goes to the cascade backend: only it really stops early."""
    backend = BACKENDS["cascade"]()
    reason = backend.supports(target)
    if reason:
        raise CompileError(f"cannot deploy the early-exit model for {target.name!r}: {reason}")
    return backend


def write_artifact(artifact: Artifact, config: ModelConfig, target: Target, recipe: list,
                   directory: Path, backend_name: str | None = None,
                   backend_options: dict[str, Any] | None = None,
                   cpu: CpuInfo | None = None) -> dict[str, Any]:
    """Compile ``artifact`` for ``target`` into ``directory`` with runner and manifest.

    ``cpu``: the CPU the build made its choices for (default: the target's)."""
    backend = pick_backend(artifact, target, backend_name, backend_options)
    entry = backend.compile(artifact, target, directory)
    shutil.copyfile(RUNNER_PATH, directory / "runner.py")
    files = {name: sha256_file(directory / name) for name in [*entry["files"], "runner.py"]}
    identity = {"model": config.name, "input": config.input.to_json(), "target": target.name,
                "recipe": recipe, "source": [step.to_json() for step in artifact.lineage]}
    manifest = {
        "format": 1, "name": config.name, "hash": content_hash(files, identity),
        "target": target.to_json(), "entry": entry, "input": config.input.to_json(),
        "num_classes": config.num_classes, "files": files, "recipe": recipe,
        "lineage": [{**step.to_json(), **({"cache": step.cache} if step.cache else {})}
                    for step in artifact.lineage],
        "versions": {"edgec": __version__, "python": platform.python_version(),
                     **_torch_version(), **backend.versions()},
        "size_bytes": sum((directory / name).stat().st_size for name in entry["files"]),
        "cpu": {"build_host": host_cpu().to_json(),
                "runs_on": (cpu or target_cpu(target)).to_json()},
    }
    if "int8" in artifact.extras:
        manifest["int8"] = artifact.extras["int8"]
    layers = layer_table(artifact)
    if layers:
        manifest["layers"] = layers  # features of the latency model (edgec.latency)
    write_json(directory / "manifest.json", manifest)
    return manifest


def layer_table(artifact: Artifact) -> list[dict] | None:
    """The artifact's layer table: a pass's (``extras['layers']``, e.g. before PT2E lowering),
    else read from a single ONNX file; None for what neither covers (a cascade is read from
    its stage files later)."""
    if "layers" in artifact.extras:
        return artifact.extras["layers"]
    if artifact.stage != "onnx" or artifact.extras.get("cascade"):
        return None
    try:
        return layer_table_from_onnx(artifact.payload)
    except EdgecError:  # a graph the table does not understand: the build goes on without it
        return None


def _torch_version() -> dict[str, str]:
    torch = sys.modules.get("torch")
    return {"torch": torch.__version__} if torch else {}


def _reference_row(source, float_top1, ctx, target, eval_npz, device, request) -> Row:
    """fp32 row: the float model's accuracy, and its plain ONNX export's latency on the target."""
    takes_onnx = any(BACKENDS[name].consumes == "onnx" for name in target.backends
                     if name in BACKENDS)  # an hls4ml-only target has no ONNX runtime to time
    top1_on = f"{_where('local', target)}, PyTorch" if float_top1 is not None else ""
    if source.stage != "torch" or not (request.profile and request.reference) or not takes_onnx:
        return Row("fp32", float_top1 or float("nan"), 0, None, top1_on)
    exported = Pipeline([Step(ExportPass(), ExportParams())], "fp32").run(
        source, replace(ctx, ledger=None, progress=lambda message: None))  # not the recipe's
    directory = ctx.workdir / "fp32-reference"
    directory.mkdir()
    config = ModelConfig(name="fp32", input=ctx.input_spec, factory="-")
    manifest = write_artifact(exported, config, target, [], directory)
    latency = cached_measure(ctx.cache, device, directory, request.measure, manifest, ctx.cpu)
    return Row("fp32", float("nan") if float_top1 is None else float_top1,
               manifest["size_bytes"], latency, top1_on,
               _where(device.name, target))


def _measure_spec(spec: MeasureSpec, manifest: dict[str, Any], eval_npz: Path,
                  device: str) -> MeasureSpec:
    """A cascade's latency depends on its input: stream the evaluation images in order
    (on this host; a board measures what its spec names)."""
    if manifest["entry"]["backend"] == "cascade" and not spec.data and device == "local":
        return replace(spec, data=str(eval_npz))
    return spec


def _write_build(built, config, target, pipeline, request, eval_npz, device, reference, progress,
                 profiler, cpu, ctx):
    """Compile, evaluate (here and on the device), profile and report, into the final directory
    (atomically); returns it, the manifest and the built rows (host first)."""
    staging = Path(tempfile.mkdtemp(prefix="edgec-stage-"))
    try:
        manifest = write_artifact(built, config, target, pipeline.config(), staging,
                                  request.backend, {"tune_trials": request.tune} if request.tune
                                  else None, cpu)
        if ctx.ledger is not None:
            manifest["budget"] = ctx.ledger.to_json()
        final = Path(request.out) / target.name / f"{config.name}-{manifest['hash'][:12]}"
        with atomic_directory(final) as tmp:
            shutil.copytree(staging, tmp, dirs_exist_ok=True)
            on_host = manifest["entry"].get("runs_on_host", True)
            count = manifest["entry"].get("eval_count", 0)  # hls4ml's C simulation is slow
            if on_host and not request.evaluate:
                manifest["accuracy"] = {"skipped": "not evaluated (edgec search evaluates its "
                                                   "pick only)"}
            elif on_host:
                progress("evaluating the artifact with its own runner")
                manifest["accuracy"] = accuracy_record(
                    cached_evaluate(ctx.cache, device, tmp, eval_npz, count, manifest), "local")
            else:  # e.g. a TVM aarch64 .so: only the board (or its emulation) can run it
                manifest["accuracy"] = {"skipped": f"{target.isa} code does not run on this host;"
                                                   f" evaluate it on the board (--device)"}
            write_json(tmp / "manifest.json", manifest)
            if request.device != "local":
                progress(f"evaluating the artifact on {profiler.name}")
                manifest["accuracy_on_device"] = _device_accuracy(
                    tmp, eval_npz, request.eval_count or count, manifest, device, profiler)
                manifest["warnings"] = _accuracy_warnings(manifest)
                write_json(tmp / "manifest.json", manifest)
            latency = None
            profile = request.profile and (on_host or request.device != "local") and (
                request.profile_when is None or request.profile_when(tmp, manifest))
            if profile:
                progress(f"profiling on {profiler.name}")
                latency = cached_measure(ctx.cache, profiler, tmp, _measure_spec(
                    request.measure, manifest, eval_npz, request.device), manifest, cpu)
                # summaries only: a board's samples go to the profile database (ProfileDB)
                write_json(tmp / "profile.json", {"device": profiler.name, **latency.summary()})
            rows = _built_rows(manifest, pipeline, latency, profiler.name, eval_npz, target)
            efficiency = None
            if profile and request.device == "local":
                from edgec.analysis import artifact_efficiency

                efficiency = artifact_efficiency(tmp, manifest)
            write_reports(tmp, manifest, [reference, *rows], efficiency)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final, manifest, rows


def evaluate_built(directory: Path, model: Path, data: Path | None = None) -> float | None:
    """Top-1 (fraction) of a built artifact on its model's evaluation split, here, through the
    cache; the artifact is not touched. None when its code does not run on this host."""
    manifest = read_manifest(directory)
    if not manifest["entry"].get("runs_on_host", True):
        return None
    _, evaluation = _load_data(load_model_config(model), data)
    with tempfile.TemporaryDirectory(prefix="edgec-eval-") as scratch:
        eval_npz = Path(scratch) / "evaluation.npz"
        np.savez(eval_npz, images=evaluation.images, labels=evaluation.labels)
        result = cached_evaluate(Cache(), LocalDevice(), directory, eval_npz,
                                 manifest["entry"].get("eval_count", 0), manifest)
    return result["top1"]


def cached_evaluate(cache: Cache, device, artifact: Path, eval_npz: Path, count: int,
                    manifest: dict[str, Any]) -> dict[str, Any]:
    """``device.evaluate`` keyed by the artifact's files, the data and the device's CPU."""
    document = {"what": "runner eval", "files": manifest["files"], "entry": manifest["entry"],
                "data": sha256_file(eval_npz), "count": count, "device": device.name,
                "cpu": host_cpu().to_json() if device.name == "local" else None}
    return cache.remember("evaluations", document,
                          lambda: device.evaluate(artifact, str(eval_npz), count=count))


def cached_measure(cache: Cache, device, artifact: Path, spec: MeasureSpec,
                   manifest: dict[str, Any], cpu: CpuInfo | None) -> Measurement:
    """``device.measure`` keyed by the artifact's files, the device (its CPU), the
    MeasureSpec (its data by content) and the runtime versions; a cached one says so in
    ``extra['from_cache']``."""
    data = sha256_file(Path(spec.data)) if spec.data else ""
    document = {"what": "measure", "files": manifest["files"], "entry": manifest["entry"],
                "device": device.name, "spec": {**asdict(spec), "data": data},
                "cpu": host_cpu().to_json() if device.name == "local" else
                (cpu.to_json() if cpu else None), "versions": manifest["versions"]}
    key = digest(document)
    stored = cache.load_json("measurements", key)
    if stored is not None:
        return Measurement.from_json(stored, from_cache=True)
    measurement = device.measure(artifact, spec)
    cache.store_json("measurements", key, measurement.to_json())
    return measurement


def accuracy_record(result: dict[str, Any], device: str) -> dict[str, Any]:
    """The manifest's view of one runner evaluation, with where (device, CPU) it ran."""
    record = {key: result[key] for key in ("top1", "correct", "total", "predictions_sha256")}
    if "exits" in result:  # early-exit cascade: images that left at each exit
        record["exits"] = result["exits"]
    record["measured_on"] = {"device": device, "cpu": result.get("cpu")}
    if result.get("warnings"):
        record["runner_warnings"] = result["warnings"]
    return record


def _device_accuracy(artifact: Path, eval_npz: Path, count: int, manifest: dict[str, Any],
                     device, profiler) -> dict[str, Any]:
    """Evaluate on the board (the split uploaded once, content-hashed) and compare it with this
    host on the same images."""
    record = accuracy_record(profiler.evaluate(artifact, str(eval_npz), count=count),
                             profiler.name)
    host = manifest["accuracy"]
    if "top1" in host and host["total"] != record["total"]:
        host = accuracy_record(device.evaluate(artifact, str(eval_npz), count=record["total"]),
                               "local")
    if "top1" in host:
        record["host_top1_same_images"] = host["top1"]
        record["same_predictions_as_host"] = \
            host["predictions_sha256"] == record["predictions_sha256"]
    return record


def _accuracy_warnings(manifest: dict[str, Any]) -> list[str]:
    """Where host and device disagree by more than DISAGREEMENT_POINTS, and the runner's own."""
    on_device = manifest["accuracy_on_device"]
    # the runner can only suspect a difference; the build knows whether there was one
    same = on_device.get("same_predictions_as_host", False)
    notes = [] if same else list(on_device.get("runner_warnings", ()))
    if "host_top1_same_images" in on_device:
        gap = (on_device["top1"] - on_device["host_top1_same_images"]) * 100
        if abs(gap) > DISAGREEMENT_POINTS:
            where = on_device["measured_on"]
            notes.append(
                f"top-1 on {where['device']} ({cpu_words(where['cpu'])}) is "
                f"{on_device['top1'] * 100:.2f} %, on this host "
                f"({cpu_words(manifest['accuracy']['measured_on']['cpu'])}) "
                f"{on_device['host_top1_same_images'] * 100:.2f} % on the same "
                f"{on_device['total']} images ({gap:+.2f} points): the device's number is the one "
                f"that holds there")
    return notes


def _built_rows(manifest, pipeline, latency, profiler_name, eval_npz, target) -> list[Row]:
    """The built row (accuracy on this host, or on the device when only it can run the code),
    and a row for the device's accuracy when there is one."""
    scheme = manifest.get("int8", {}).get("scheme")
    name = f"built ({pipeline.name}{', ' + scheme if scheme else ''}"
    latency_on = _where(profiler_name, target, latency)
    host, on_device = manifest["accuracy"], manifest.get("accuracy_on_device")
    rows = []
    if "top1" in host:
        rows.append(Row(f"{name}{_subset_note(host, eval_npz)})", host["top1"],
                        manifest["size_bytes"], latency, _where("local", target), latency_on))
    if on_device:
        rows.append(Row(f"{name}{_subset_note(on_device, eval_npz)})", on_device["top1"],
                        manifest["size_bytes"], None if rows else latency,
                        _where(profiler_name, target), "" if rows else latency_on))
    if not rows:
        rows.append(Row(f"{name})", float("nan"), manifest["size_bytes"], latency, "",
                        latency_on))
    return rows


def _where(device: str, target: Target, measured=True) -> str:
    """Where a number was measured: a device's name, or this host (marked when the target is a
    board that this host only stands in for)."""
    if not measured:
        return ""
    if device != "local":
        return device
    return "host" if target.cpu == "native" else f"host, not {target.name}"


def _subset_note(accuracy: dict[str, Any], eval_npz: Path) -> str:
    """", first N images" when the runner evaluated only part of the evaluation split."""
    with np.load(eval_npz) as npz:
        size = len(npz["labels"])
    total = accuracy.get("total", size)
    return "" if total == size else f", first {total} images"
