"""Early exit + int8 against the same int8 model without exits (issue 4's acceptance run).

For ResNet-20 and ResNet-56 on CIFAR-10: `edgec build` with passes/int8.toml and with
passes/exit-int8.toml (exit points per model below, 1-point budget), then both artifacts'
runners stream the full 10,000-image test set in order at batch 1, 1 thread: mean and
p50/p90/p99 per image (wall clock), top-1 and the exit histogram. The two artifacts are
measured in alternation (``--rounds``) and the samples pooled, so machine noise hits both
alike; the thread CPU time per image (``cpu_stream``) is reported beside it, because on a
machine shared with other jobs wall-clock means mostly measure waiting.

    nice -n 10 python benchmarks/early_exit.py [--models resnet20,resnet56] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgec.build import BuildRequest, build  # noqa: E402
from edgec.data import shared_data_dir  # noqa: E402
from edgec.devices import LocalDevice  # noqa: E402
from edgec.measure import Measurement, MeasureSpec  # noqa: E402

FP32_TOP1 = {"resnet20": 0.9173, "resnet56": 0.9339}
MODELS = {
    "resnet20": ROOT / "examples/resnet20_cifar10/model.toml",
    "resnet56": ROOT / "examples/resnet20_cifar10/resnet56.toml",
}
EXIT_POINTS = {
    "resnet20": ["layer2.2", "layer3.0", "layer3.1"],
    "resnet56": ["layer2.8", "layer3.2", "layer3.5"],
}


def exit_recipe(model: str, folder: Path) -> Path:
    """passes/exit-int8.toml with this model's exit points."""
    text = (ROOT / "passes/exit-int8.toml").read_text()
    points = json.dumps(EXIT_POINTS[model])
    assert 'after = "auto"' in text
    path = folder / f"exit-int8-{model}.toml"
    path.write_text(text.replace('after = "auto"', f"after = {points}"))
    tomllib.loads(path.read_text())
    return path


def stream_spec(test_npz: Path) -> MeasureSpec:
    return MeasureSpec(warmup=20, repeat=10000, min_time_s=0.0, threads=1, data=str(test_npz))


def cpu_stream(directories: dict[str, Path], test_npz: Path, chunk: int = 500) -> dict:
    """Per-image thread CPU time (ms) of each artifact's own runner over the test stream.

    In-process, batch 1, 1 thread (ONNX Runtime then runs in the calling thread, so the
    thread's CPU clock counts exactly its work). The artifacts take turns every ``chunk``
    images. On a machine shared with other jobs wall-clock means mostly measure waiting;
    CPU time does not.
    """
    import importlib.util

    predictors = {}
    for name, directory in directories.items():
        spec = importlib.util.spec_from_file_location(f"runner_{name}", directory / "runner.py")
        runner = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(runner)
        runner.HERE = Path(directory)
        manifest = json.loads((Path(directory) / "manifest.json").read_text())
        predict, _ = runner.load(manifest, 1)
        images, _ = runner.read_split(str(test_npz), 0, 0)
        predictors[name] = (predict, runner.preprocess(images, manifest["input"]))
    cpu = {name: [] for name in predictors}
    total = len(next(iter(predictors.values()))[1])
    for start in range(0, total, chunk):
        for name, (predict, x) in predictors.items():
            for i in range(start, min(start + chunk, total)):
                t0 = time.thread_time_ns()
                predict(x[i:i + 1])
                cpu[name].append((time.thread_time_ns() - t0) / 1e6)
    return {name: float(np.mean(v)) for name, v in cpu.items()}


def run_model(model: str, out: Path, rounds: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as scratch:
        recipes = {"int8": ROOT / "passes/int8.toml", "exit-int8": exit_recipe(model, Path(scratch))}
        built, seconds = {}, {}
        for name, recipe in recipes.items():
            started = time.perf_counter()
            built[name] = build(BuildRequest(MODELS[model], "local", recipe, out=out, profile=False),
                                progress=lambda m, name=name: print(f"  [{model} {name}] {m}",
                                                                   flush=True))
            seconds[name] = time.perf_counter() - started
    test_npz = shared_data_dir() / "cifar10_test.npz"
    device, samples, exits = LocalDevice(), {name: [] for name in built}, {}
    for _ in range(rounds):
        for name, result in built.items():
            measured = device.measure(result.directory, stream_spec(test_npz))
            samples[name] += measured.samples_ms
            exits[name] = measured.extra.get("exits")
    cpu_ms = cpu_stream({name: result.directory for name, result in built.items()}, test_npz)
    rows = []
    for name, result in built.items():
        stats = Measurement(tuple(samples[name]), 0.0)
        accuracy = result.manifest["accuracy"]
        lineage = result.manifest["lineage"]
        report = next((s["report"] for s in lineage if s["pass"] == "early_exit"), {})
        rows.append({"model": model, "config": name, "top1": accuracy["top1"],
                     "exits_eval": accuracy.get("exits"), "exits_stream": exits[name],
                     "mean_ms": stats.mean, "cpu_mean_ms": cpu_ms[name], "ci95_ms": stats.ci95,
                     "p50_ms": stats.p50,
                     "p90_ms": stats.p90, "p99_ms": stats.p99, "n": len(stats.samples_ms),
                     "build_s": seconds[name], "artifact": str(result.directory),
                     "expected_saving": report.get("expected_saving"),
                     "exit_report": report.get("exits")})
    base, base_cpu = rows[0]["mean_ms"], rows[0]["cpu_mean_ms"]
    for row in rows:
        row["vs_int8"] = row["mean_ms"] / base - 1.0
        row["cpu_vs_int8"] = row["cpu_mean_ms"] / base_cpu - 1.0
        row["vs_fp32_points"] = (row["top1"] - FP32_TOP1[model]) * 100
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | config | top-1 | Δ vs fp32 | mean ms | p50 | p90 | p99 | vs int8 | "
             "CPU ms/image | CPU vs int8 | exits (eval) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['config']} | {r['top1'] * 100:.2f} % | "
                     f"{r['vs_fp32_points']:+.2f} | {r['mean_ms']:.3f} ± {r['ci95_ms']:.3f} | "
                     f"{r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['p99_ms']:.3f} | "
                     f"{r['vs_int8'] * 100:+.1f} % | {r['cpu_mean_ms']:.3f} | "
                     f"{r['cpu_vs_int8'] * 100:+.1f} % | {r['exits_eval'] or '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,resnet56")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench-early-exit")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if shared_data_dir() is None:
        raise SystemExit("../shared/data (CIFAR-10 and the ResNet weights) is missing")
    rows = []
    for model in args.models.split(","):
        rows += run_model(model, args.out, args.rounds)
        print(table(rows), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print("\nbatch 1, 1 thread, full CIFAR-10 test stream in order; mean/p50/p90/p99: wall clock "
          "per image from the runner (`measure --data`); CPU ms/image: thread CPU time per image "
          "(in-process, the artifacts' own runners, alternating every 500 images); exits: images "
          "per exit (last = final output)")
    print(table(rows))


if __name__ == "__main__":
    main()
