"""One run, one table: the same model and data through PyTorch, ONNX Runtime and edgec recipes.

Top-1 on the full evaluation split; latency p50/p90 at batch 1, 1 thread (OMP_WAIT_POLICY=PASSIVE,
ORT spinning off), every row measured by the same runner protocol in this one run.

    python benchmarks/compare.py [--model examples/resnet20_cifar10/model.toml]
                                 [--recipe passes/int8.toml --recipe passes/mixed.toml ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from edgec.accuracy import onnx_logits, top1, torch_logits  # noqa: E402
from edgec.artifact import Artifact  # noqa: E402
from edgec.build import BuildRequest, build, write_artifact  # noqa: E402
from edgec.data import load_data_config, preprocess  # noqa: E402
from edgec.devices import LocalDevice  # noqa: E402
from edgec.errors import EdgecError  # noqa: E402
from edgec.measure import MeasureSpec  # noqa: E402
from edgec.model import load_model_config, load_torch_model  # noqa: E402
from edgec.passes.export import export_onnx  # noqa: E402
from edgec.targets import load_target  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPEC = MeasureSpec(warmup=50, repeat=300, min_time_s=2.0, threads=1)


def torch_row(model, spec, evaluation):
    torch.set_num_threads(1)
    x = torch.from_numpy(preprocess(evaluation.images[:1], spec))
    with torch.no_grad():
        for _ in range(SPEC.warmup):
            model(x)
        samples, started = [], time.perf_counter()
        while len(samples) < SPEC.repeat or time.perf_counter() - started < SPEC.min_time_s:
            t0 = time.perf_counter()
            model(x)
            samples.append((time.perf_counter() - t0) * 1e3)
    torch.set_num_threads(2)
    accuracy = top1(torch_logits(model, evaluation, spec), evaluation.labels)
    return ("PyTorch eager fp32", accuracy, statistics.median(samples),
            float(np.percentile(samples, 90)), None)


def onnx_row(name, path, config, target, evaluation, workdir):
    directory = workdir / name.replace(" ", "_")
    directory.mkdir()
    manifest = write_artifact(Artifact("onnx", path), config, target, [], directory)
    latency = LocalDevice().measure(directory, SPEC)
    accuracy = top1(onnx_logits(path, evaluation, config.input), evaluation.labels)
    return name, accuracy, latency.p50, latency.p90, manifest["size_bytes"]


def ort_baselines(model, config, target, calibration, evaluation, workdir):
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = workdir / "ort-fp32.onnx"
    fp32.write_bytes(export_onnx(model, config.input))
    pre, int8 = workdir / "ort-pre.onnx", workdir / "ort-int8.onnx"
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    batches = iter([{"input": preprocess(calibration.images[i:i + 32], config.input)}
                    for i in range(0, 512, 32)])
    reader = type("Reader", (), {"get_next": lambda self: next(batches, None)})()
    quantize_static(str(pre), str(int8), reader)
    return [onnx_row("ONNX Runtime fp32", fp32, config, target, evaluation, workdir),
            onnx_row("ONNX Runtime int8 (quantize_static defaults)", int8, config, target,
                     evaluation, workdir)]


def edgec_row(model_path, recipe, workdir):
    try:
        result = build(BuildRequest(model_path, "local", recipe, out=workdir / "builds",
                                    measure=SPEC))
    except EdgecError as exc:  # e.g. a budget the recipe cannot meet: report it as a row
        print(f"edgec {recipe.stem}: {type(exc).__name__}: {exc}")
        return f"edgec {recipe.stem} (failed: {type(exc).__name__})", float("nan"), \
            float("nan"), float("nan"), None
    built = result.rows[-1]
    return (f"edgec {recipe.stem}", built.top1, built.latency.p50, built.latency.p90,
            built.size_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path,
                        default=ROOT / "examples" / "resnet20_cifar10" / "model.toml")
    parser.add_argument("--recipe", type=Path, action="append")
    args = parser.parse_args()
    recipes = args.recipe or [ROOT / "passes" / "int8.toml"]
    config = load_model_config(args.model)
    data = load_data_config(config.resolve(config.data))
    calibration, evaluation = data.load("calibration"), data.load("evaluation")
    model = load_torch_model(config)
    target = load_target("local")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        rows = [torch_row(model, config.input, evaluation),
                *ort_baselines(model, config, target, calibration, evaluation, workdir)]
        rows += [edgec_row(args.model, recipe, workdir) for recipe in recipes]
    print(f"\n{config.name}: top-1 on {len(evaluation)} images, batch 1, 1 thread\n")
    print("| system | top-1 | p50 ms | p90 ms | size KiB |\n|---|---|---|---|---|")
    for name, accuracy, p50, p90, size in rows:
        size_text = f"{size / 1024:.1f}" if size else "-"
        print(f"| {name} | {accuracy * 100:.2f} % | {p50:.3f} | {p90:.3f} | {size_text} |")


if __name__ == "__main__":
    main()
