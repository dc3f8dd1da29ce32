"""``edgec build``: model + recipe + target → measured, deployable artifact directory."""

from __future__ import annotations

import json
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgec import __version__
from edgec.accuracy import top1, torch_logits
from edgec.artifact import Artifact, atomic_directory, content_hash, sha256_file, write_json
from edgec.backends import BACKENDS
from edgec.data import Dataset, load_data_config
from edgec.devices import LocalDevice
from edgec.errors import CompileError, ConfigError, ModelError
from edgec.measure import Measurement, MeasureSpec
from edgec.model import ModelConfig, load_model_config, load_torch_model
from edgec.passes.export import ExportParams, ExportPass
from edgec.pipeline import Context, Pipeline, Step, load_recipe
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


def default_recipe() -> Path:
    from edgec.resources import builtin_dir

    return builtin_dir("passes") / "int8.toml"


def build(request: BuildRequest, progress=lambda message: None) -> BuildResult:
    """Run the whole build; the artifact directory appears only when everything succeeded."""
    config = load_model_config(request.model)
    target = load_target(request.target)
    pipeline = load_recipe(request.recipe or default_recipe())
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
        device = LocalDevice()
        reference = _reference_row(source, float_top1, ctx, target, eval_npz, device, request)
        directory, manifest, row = _write_build(built, config, target, pipeline, request,
                                                eval_npz, device, reference, progress)
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
    return Artifact("torch", load_torch_model(config))


def pick_backend(artifact: Artifact, target: Target):
    for name in target.backends:
        backend = BACKENDS[name]()
        if backend.consumes == artifact.stage and backend.supports(target) is None:
            return backend
    raise CompileError(f"no backend of target {target.name!r} ({', '.join(target.backends)}) "
                       f"accepts a {artifact.stage!r} model")


def write_artifact(artifact: Artifact, config: ModelConfig, target: Target, recipe: list,
                   directory: Path) -> dict[str, Any]:
    """Compile ``artifact`` for ``target`` into ``directory`` with runner and manifest."""
    backend = pick_backend(artifact, target)
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
    if source.stage != "torch" or not request.profile:
        return Row("fp32", float_top1 or float("nan"), 0, None)
    exported = Pipeline([Step(ExportPass(), ExportParams())], "fp32").run(source, ctx)
    directory = ctx.workdir / "fp32-reference"
    directory.mkdir()
    config = ModelConfig(name="fp32", input=ctx.input_spec, factory="-")
    manifest = write_artifact(exported, config, target, [], directory)
    return Row("fp32", float_top1, manifest["size_bytes"], device.measure(directory, request.measure))


def _write_build(built, config, target, pipeline, request, eval_npz, device, reference, progress):
    staging = Path(tempfile.mkdtemp(prefix="edgec-stage-"))
    try:
        manifest = write_artifact(built, config, target, pipeline.config(), staging)
        final = Path(request.out) / target.name / f"{config.name}-{manifest['hash'][:12]}"
        with atomic_directory(final) as tmp:
            shutil.copytree(staging, tmp, dirs_exist_ok=True)
            progress("evaluating the artifact with its own runner")
            accuracy = device.evaluate(tmp, str(eval_npz))
            manifest["accuracy"] = {"top1": accuracy["top1"], "correct": accuracy["correct"],
                                    "total": accuracy["total"],
                                    "predictions_sha256": accuracy["predictions_sha256"]}
            write_json(tmp / "manifest.json", manifest)
            latency = None
            if request.profile:
                progress("profiling on local")
                latency = device.measure(tmp, request.measure)
                write_json(tmp / "profile.json", {"device": device.name, **latency.to_json()})
            row = Row(f"built ({pipeline.name})", accuracy["top1"], manifest["size_bytes"], latency)
            (tmp / "report.md").write_text(render_report(manifest, [reference, row]))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final, manifest, row


def render_table(rows) -> str:
    """Markdown table: accuracy, latency p50/p90 and size per row."""
    lines = ["| config | top-1 | p50 ms | p90 ms | size |", "|---|---|---|---|---|"]
    for row in rows:
        lat = row.latency
        p50 = f"{lat.p50:.3f}" if lat else "-"
        p90 = f"{lat.p90:.3f}" if lat else "-"
        lines.append(f"| {row.name} | {row.top1 * 100:.2f} % | {p50} | {p90} | "
                     f"{row.size_bytes / 1024:.1f} KiB |")
    return "\n".join(lines)


def render_report(manifest: dict[str, Any], rows) -> str:
    lineage = "\n".join(f"- `{s['pass']}` {json.dumps(s['params'])} → {json.dumps(s['report'])}"
                        for s in manifest["lineage"])
    return (f"# {manifest['name']} for {manifest['target']['name']}\n\n"
            f"hash `{manifest['hash']}`, backend `{manifest['entry']['backend']}`\n\n"
            f"{render_table(rows)}\n\n## Lineage\n{lineage}\n")
