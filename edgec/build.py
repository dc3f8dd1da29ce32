"""``edgec build``: model + recipe + target → measured, deployable artifact directory."""

from __future__ import annotations

import json
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgec import __version__
from edgec.accuracy import top1, torch_logits
from edgec.artifact import Artifact, atomic_directory, content_hash, sha256_file, write_json
from edgec.backends import BACKENDS
from edgec.data import Dataset, load_data_config
from edgec.devices import LocalDevice, open_device
from edgec.errors import CompileError, ConfigError, ModelError
from edgec.measure import Measurement, MeasureSpec
from edgec.model import ModelConfig, load_model_config, load_torch_model
from edgec.passes.export import ExportParams, ExportPass
from edgec.pipeline import Context, Pipeline, Step, load_recipe
from edgec.profiles import ProfileDB
from edgec.runner import RUNNER_PATH
from edgec.targets import Target, load_target


@dataclass(frozen=True)
class BuildRequest:
    """Everything ``edgec build`` needs; paths as the user gave them."""

    model: Path
    target: str = "local"
    recipe: Path | None = None
    data: Path | None = None
    out: Path = Path("build")
    measure: MeasureSpec = field(default_factory=MeasureSpec)
    profile: bool = True
    device: str = "local"  # profile there (devices/NAME.toml); evaluation stays on this host
    profiles: Path = Path("profiles")  # a board's profiles are appended to <profiles>/<device>/
    backend: str | None = None  # one of the target's backends instead of its first that fits
    tune: int = 0  # MetaSchedule trial budget for the tvm backend (0: untuned)


@dataclass(frozen=True)
class Row:
    """One line of the result table."""

    name: str
    top1: float
    size_bytes: int
    latency: Measurement | None

    def to_json(self) -> dict[str, Any]:
        latency = self.latency.summary() if self.latency else None
        return {"name": self.name, "top1": self.top1, "size_bytes": self.size_bytes,
                "latency": latency}


@dataclass(frozen=True)
class BuildResult:
    directory: Path
    manifest: dict[str, Any]
    rows: tuple[Row, ...]


def default_recipe(target: Target | None = None) -> Path:
    """The target's ``[options] recipe`` (e.g. "fpga" for hls4ml targets), else int8."""
    from edgec.resources import builtin_dir

    name = target.options.get("recipe", "int8") if target else "int8"
    return builtin_dir("passes") / f"{name}.toml"


def build(request: BuildRequest, progress=lambda message: None) -> BuildResult:
    """Run the whole build; the artifact directory appears only when everything succeeded."""
    config = load_model_config(request.model)
    target = load_target(request.target)
    pipeline = load_recipe(request.recipe or default_recipe(target))
    pipeline.check_target(target)
    calibration, evaluation = _load_data(config, request.data)
    progress(f"loading model {config.name}")
    source = _load_source(config)
    float_top1 = top1(torch_logits(source.payload, evaluation, config.input), evaluation.labels) \
        if source.stage == "torch" else None
    with tempfile.TemporaryDirectory(prefix="edgec-") as scratch:
        scratch = Path(scratch)
        ctx = Context(target, config.input, calibration, scratch, baseline=source.payload,
                      evaluation=evaluation, progress=progress)
        built = pipeline.run(source, ctx, lambda name, s: progress(f"pass {name} done in {s:.1f} s"))
        eval_npz = scratch / "evaluation.npz"
        np.savez(eval_npz, images=evaluation.images, labels=evaluation.labels)
        device, profiler = LocalDevice(), open_device(request.device)
        try:
            reference = _reference_row(source, float_top1, ctx, target, eval_npz, profiler,
                                       request)
            directory, manifest, row = _write_build(built, config, target, pipeline, request,
                                                    eval_npz, device, reference, progress, profiler)
        finally:
            getattr(profiler, "close", lambda: None)()
    if row.latency and request.device != "local":
        ProfileDB(request.profiles).record(profiler.name, manifest, request.measure, row.latency)
    return BuildResult(directory, manifest, (reference, row))


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
                   backend_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compile ``artifact`` for ``target`` into ``directory`` with runner and manifest."""
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
        "lineage": [step.to_json() for step in artifact.lineage],
        "versions": {"edgec": __version__, "python": platform.python_version(),
                     **_torch_version(), **backend.versions()},
        "size_bytes": sum((directory / name).stat().st_size for name in entry["files"]),
    }
    write_json(directory / "manifest.json", manifest)
    return manifest


def _torch_version() -> dict[str, str]:
    torch = sys.modules.get("torch")
    return {"torch": torch.__version__} if torch else {}


def _reference_row(source, float_top1, ctx, target, eval_npz, device, request) -> Row:
    """fp32 row: the float model's accuracy, and its plain ONNX export's latency on the target."""
    takes_onnx = any(BACKENDS[name].consumes == "onnx" for name in target.backends
                     if name in BACKENDS)  # an hls4ml-only target has no ONNX runtime to time
    if source.stage != "torch" or not request.profile or not takes_onnx:
        return Row("fp32", float_top1 or float("nan"), 0, None)
    exported = Pipeline([Step(ExportPass(), ExportParams())], "fp32").run(source, ctx)
    directory = ctx.workdir / "fp32-reference"
    directory.mkdir()
    config = ModelConfig(name="fp32", input=ctx.input_spec, factory="-")
    manifest = write_artifact(exported, config, target, [], directory)
    return Row("fp32", float_top1, manifest["size_bytes"], device.measure(directory, request.measure))


def _measure_spec(spec: MeasureSpec, manifest: dict[str, Any], eval_npz: Path,
                  device: str) -> MeasureSpec:
    """A cascade's latency depends on its input: stream the evaluation images in order
    (on this host; a board measures what its spec names)."""
    if manifest["entry"]["backend"] == "cascade" and not spec.data and device == "local":
        return replace(spec, data=str(eval_npz))
    return spec


def _write_build(built, config, target, pipeline, request, eval_npz, device, reference, progress,
                 profiler=None):
    profiler = profiler or device
    staging = Path(tempfile.mkdtemp(prefix="edgec-stage-"))
    try:
        manifest = write_artifact(built, config, target, pipeline.config(), staging,
                                  request.backend, {"tune_trials": request.tune} if request.tune
                                  else None)
        final = Path(request.out) / target.name / f"{config.name}-{manifest['hash'][:12]}"
        with atomic_directory(final) as tmp:
            shutil.copytree(staging, tmp, dirs_exist_ok=True)
            on_host = manifest["entry"].get("runs_on_host", True)
            if on_host:
                progress("evaluating the artifact with its own runner")
                # a slow runtime (hls4ml's C simulation) evaluates only the first eval_count images
                accuracy = device.evaluate(tmp, str(eval_npz),
                                           count=manifest["entry"].get("eval_count", 0))
                manifest["accuracy"] = {"top1": accuracy["top1"], "correct": accuracy["correct"],
                                        "total": accuracy["total"],
                                        "predictions_sha256": accuracy["predictions_sha256"]}
                if "exits" in accuracy:  # early-exit cascade: images that left at each exit
                    manifest["accuracy"]["exits"] = accuracy["exits"]
            else:  # e.g. a TVM aarch64 .so: only the board (or its emulation) can run it
                accuracy = {"top1": float("nan")}
                manifest["accuracy"] = {"skipped": f"{target.isa} code does not run on this host;"
                                                   f" evaluate it on the board"}
            write_json(tmp / "manifest.json", manifest)
            latency = None
            if request.profile and (on_host or request.device != "local"):
                progress(f"profiling on {profiler.name}")
                latency = profiler.measure(tmp, _measure_spec(request.measure, manifest, eval_npz,
                                                                 request.device))
                write_json(tmp / "profile.json", {"device": profiler.name, **latency.to_json()})
            row = Row(f"built ({pipeline.name}{_subset_note(accuracy, eval_npz)})",
                      accuracy["top1"], manifest["size_bytes"], latency)
            report = render_report(manifest, [reference, row])
            if request.profile and request.device == "local":
                from edgec.analysis import efficiency_section

                report += efficiency_section(tmp, manifest)
            (tmp / "report.md").write_text(report)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final, manifest, row


def _subset_note(accuracy: dict[str, Any], eval_npz: Path) -> str:
    """", first N images" when the runner evaluated only part of the evaluation split."""
    with np.load(eval_npz) as npz:
        size = len(npz["labels"])
    total = accuracy.get("total", size)
    return "" if total == size else f", first {total} images"


def format_top1(value: float | None) -> str:
    """Top-1 as a percentage; "n/a" where the artifact cannot run on this host."""
    return "n/a" if value is None or value != value else f"{value * 100:.2f} %"


def render_table(rows) -> str:
    """Markdown table: accuracy, latency p50/p90 and size per row."""
    lines = ["| config | top-1 | p50 ms | p90 ms | size |", "|---|---|---|---|---|"]
    for row in rows:
        lat = row.latency
        p50 = f"{lat.p50:.3f}" if lat else "-"
        p90 = f"{lat.p90:.3f}" if lat else "-"
        lines.append(f"| {row.name} | {format_top1(row.top1)} | {p50} | {p90} | "
                     f"{row.size_bytes / 1024:.1f} KiB |")
    return "\n".join(lines)


def render_report(manifest: dict[str, Any], rows) -> str:
    lineage = "\n".join(f"- `{s['pass']}` {json.dumps(s['params'])} → {json.dumps(s['report'])}"
                        for s in manifest["lineage"])
    return (f"# {manifest['name']} for {manifest['target']['name']}\n\n"
            f"hash `{manifest['hash']}`, backend `{manifest['entry']['backend']}`\n\n"
            f"{render_table(rows)}\n\n## Lineage\n{lineage}\n")
