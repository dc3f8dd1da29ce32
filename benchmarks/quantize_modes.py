"""One run, one table: int8 (real calibration), mixed int4/int8 (HAWQ-V2), data-free int8 (ZeroQ).

Each row is a recipe run through the pipeline here: top-1 on the full evaluation split (the
10,000-image CIFAR-10 test set for ResNet-20), weight bytes (all initialisers, int4 counted as
half a byte), p50/p90 latency at batch 1, 1 thread with the artifact's own runner (rounds of
all rows interleaved so machine load hits every row alike), and the pass's wall time.
Calibration, Hessian traces and the mixed bisection use the training split only.

    nice -n 10 python benchmarks/quantize_modes.py [--model examples/resnet20_cifar10/model.toml]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgec.accuracy import onnx_logits, top1  # noqa: E402
from edgec.artifact import Artifact  # noqa: E402
from edgec.build import write_artifact  # noqa: E402
from edgec.data import load_data_config  # noqa: E402
from edgec.devices import LocalDevice  # noqa: E402
from edgec.measure import MeasureSpec  # noqa: E402
from edgec.model import load_model_config, load_torch_model  # noqa: E402
from edgec.passes.quantize import weight_bytes  # noqa: E402
from edgec.pipeline import Context  # noqa: E402
from edgec.recipes import load_recipe  # noqa: E402
from edgec.targets import load_target  # noqa: E402

RECIPES = {"int8 (real calibration)": "int8.toml", "mixed int4/int8 (HAWQ-V2)": "mixed.toml",
           "data-free int8 (ZeroQ)": "datafree-int8.toml"}
SPEC = MeasureSpec(warmup=50, repeat=200, min_time_s=1.0, threads=1)
ROUNDS = 3


def run_recipe(recipe: Path, model, config, calibration, workdir: Path):
    workdir.mkdir()
    ctx = Context(load_target("local"), config.input, calibration, workdir, baseline=model,
                  progress=lambda message: print(f"  {message}", flush=True))
    started = time.perf_counter()
    built = load_recipe(recipe).run(Artifact("torch", model), ctx)
    return built, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path,
                        default=ROOT / "examples" / "resnet20_cifar10" / "model.toml")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_model_config(args.model)
    data = load_data_config(config.resolve(config.data))
    calibration, evaluation = data.load("calibration"), data.load("evaluation")
    model = load_torch_model(config)
    target = load_target("local")
    rows, latencies = {}, {}
    with tempfile.TemporaryDirectory(prefix="quantize-modes-") as tmp:
        tmp = Path(tmp)
        for i, (name, recipe) in enumerate(RECIPES.items()):
            print(f"{name}: passes/{recipe}", flush=True)
            built, seconds = run_recipe(ROOT / "passes" / recipe, model, config, calibration,
                                        tmp / f"work{i}")
            directory = tmp / f"artifact{i}"
            directory.mkdir()
            write_artifact(built, config, target, [], directory)
            accuracy = top1(onnx_logits(built.payload, evaluation, config.input), evaluation.labels)
            rows[name] = (accuracy, weight_bytes(built.payload), seconds, built.lineage[-1].report,
                          directory)
        device = LocalDevice()
        for _ in range(ROUNDS):
            for name, row in rows.items():
                latencies.setdefault(name, []).extend(device.measure(row[4], SPEC).samples_ms)
    print_table(config.name, len(evaluation), rows, latencies)


def print_table(model_name, images, rows, latencies) -> None:
    int8_bytes = next(iter(rows.values()))[1]
    print(f"\n{model_name}: top-1 on {images} images; latency batch 1, 1 thread, "
          f"{ROUNDS} interleaved rounds\n")
    print("| mode | top-1 | weight bytes | vs int8 | p50 ms | p90 ms | pass s |")
    print("|---|---|---|---|---|---|---|")
    for name, (accuracy, size, seconds, _, _) in rows.items():
        samples = latencies[name]
        print(f"| {name} | {accuracy * 100:.2f} % | {size:,.0f} | {size / int8_bytes:.3f} | "
              f"{np.percentile(samples, 50):.3f} | {np.percentile(samples, 90):.3f} | "
              f"{seconds:.1f} |")
    for name, (_, _, _, report, _) in rows.items():
        if "synthesis_seconds" in report:
            print(f"\n{name}: ZeroQ synthesis {report['synthesis_seconds']} s for "
                  f"{report['calibration_images']} inputs, BN-statistics loss "
                  f"{report['bn_loss_first']} → {report['bn_loss_last']}")
        if report.get("mode") == "mixed":
            print(f"\n{name}: bits per layer (held-out drop {report['holdout_drop_points']} points "
                  f"on {report['holdout']}; drops by #int4 layers {report['drops_by_int4_layers']})")
            print("| layer | bits | avg Hessian trace | sensitivity at 4 bits |\n|---|---|---|---|")
            for layer, bits in report["bits"].items():
                trace = report["avg_hessian_trace"].get(layer)
                omega = report["sensitivity_int4"].get(layer)
                print(f"| {layer} | {bits} | {_fmt(trace)} | {_fmt(omega)} |")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3g}"


if __name__ == "__main__":
    main()
