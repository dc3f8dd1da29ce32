"""Pruning frontier for ResNet-20 (or -56): prune ratio vs MACs vs top-1 vs p50 latency.

Rows, all from one run and measured the same way (int8 ONNX Runtime, batch 1, 1 thread,
latencies interleaved round-robin so machine load hits every row alike):
- int8, no prune: fuse → export → quantize (passes/int8.toml: ONNX Runtime static int8);
- ratio r: prune r at a fixed ratio (fine-tune ``--row-seconds``) → fuse → export → quantize;
- recipe: passes/prune-int8.toml as is (the pass picks the ratio inside its 1-point budget).
Top-1 on the full 10,000-image CIFAR-10 test split; fine-tuning and every choice use the
training split only.

    nice -n 10 python benchmarks/prune_frontier.py [--model examples/resnet20_cifar10/model.toml]
        [--ratios 0.2 0.3 0.4] [--row-seconds 150] [--recipe passes/prune-int8.toml]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
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
from edgec.analysis import onnx_layer_costs  # noqa: E402
from edgec.artifact import Artifact  # noqa: E402
from edgec.data import load_data_config  # noqa: E402
from edgec.errors import EdgecError  # noqa: E402
from edgec.model import load_model_config, load_torch_model  # noqa: E402
from edgec.pipeline import Context, Pipeline, load_recipe  # noqa: E402
from edgec.targets import load_target  # noqa: E402


def p50_latencies(paths: dict[str, Path], shape, rounds: int = 15, per_round: int = 100):
    """Median batch-1 latency (ms) per model, 1 thread, sampled round-robin across models."""
    import onnxruntime as ort

    sessions = {}
    for name, path in paths.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions[name] = ort.InferenceSession(str(path), options,
                                              providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    samples = {name: [] for name in paths}
    for _ in range(rounds):
        for name, session in sessions.items():
            for i in range(per_round + 10):
                t0 = time.perf_counter()
                session.run(None, {"input": x})
                if i >= 10:
                    samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def run_pipeline(pipeline: Pipeline, model, ctx: Context):
    started = time.perf_counter()
    built = pipeline.run(Artifact("torch", model), ctx,
                         lambda name, s: print(f"    {name}: {s:.1f} s", flush=True))
    return built, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "examples/resnet20_cifar10/model.toml"))
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.2, 0.3, 0.4])
    parser.add_argument("--row-seconds", type=float, default=150.0)
    parser.add_argument("--recipe", default=str(ROOT / "passes/prune-int8.toml"))
    parser.add_argument("--no-recipe", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    config = load_model_config(args.model)
    data = load_data_config(config.resolve(config.data))
    train, test = data.load("calibration"), data.load("evaluation")
    target = load_target("local")
    int8 = load_recipe(ROOT / "passes/int8.toml")
    recipe = load_recipe(args.recipe)
    prune_step = recipe.steps[0]
    rows, failures = [], []
    with tempfile.TemporaryDirectory(prefix="edgec-frontier-") as scratch:
        def context(name):
            workdir = Path(scratch) / name
            workdir.mkdir()
            return Context(target, config.input, train, workdir, baseline=base,
                           progress=lambda m: print(f"    {m}", flush=True))

        base = load_torch_model(config)
        configs = [("int8, no prune", None)]
        configs += [(f"ratio {r}", dataclasses.replace(
            prune_step.params, budget_points=None, ratio=r, time_budget_s=args.row_seconds))
            for r in args.ratios]
        if not args.no_recipe:
            configs.append((f"recipe {recipe.name}", prune_step.params))
        for i, (name, params) in enumerate(configs):
            print(f"[{name}]", flush=True)
            steps = int8.steps if params is None else \
                [dataclasses.replace(prune_step, params=params), *recipe.steps[1:]]
            try:
                built, seconds = run_pipeline(Pipeline(steps, name), load_torch_model(config),
                                              context(f"row{i}"))
            except EdgecError as exc:
                print(f"    {type(exc).__name__}: {exc}", flush=True)
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            report = built.lineage[0].report if params is not None else {}
            accuracy = top1(onnx_logits(built.payload, test, config.input), test.labels)
            macs = sum(c.macs for c in onnx_layer_costs(built.payload))
            rows.append({"name": name, "path": built.payload, "top1": accuracy, "macs": macs,
                         "ratio": report.get("ratio", 0.0), "seconds": seconds,
                         "finetune": report.get("finetune", {}),
                         "continued": report.get("continued"),
                         "holdout": report.get("holdout_top1"),
                         "holdout_drop": report.get("holdout_drop_points")})
            print(f"    top-1 {accuracy * 100:.2f} %, {macs / 1e6:.2f} M MACs", flush=True)
        latency = p50_latencies({r["name"]: r["path"] for r in rows}, config.input.shape)
    print_table(rows, latency, config.name)
    for failure in failures:
        print(f"not built: {failure}")


def print_table(rows, latency, model_name: str) -> None:
    base_macs, base_ms = rows[0]["macs"], latency[rows[0]["name"]]
    print(f"\n{model_name}, CIFAR-10 test (10,000), int8 ONNX Runtime, batch 1, 1 thread, p50")
    print("| config | ratio | MACs (M) | MACs cut | top-1 | p50 ms | vs int8 | fine-tune "
          "| held-out train top-1 | held-out drop |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ms = latency[row["name"]]
        ft = row["finetune"]
        tune = (f"{ft.get('epochs', 0)} ep / {ft.get('seconds', 0):.0f} s"
                if ft.get("epochs") else "-")
        if row["continued"] and row["continued"].get("kept"):
            tune += f" + {row['continued']['epochs']} ep / {row['continued']['seconds']:.0f} s"
        drop = "-" if row["holdout_drop"] is None else f"{row['holdout_drop']:.2f}"
        held = "-" if row["holdout"] is None else f"{row['holdout']:.2f} %"
        print(f"| {row['name']} | {row['ratio']} | {row['macs'] / 1e6:.2f} | "
              f"{(1 - row['macs'] / base_macs) * 100:.1f} % | {row['top1'] * 100:.2f} % | "
              f"{ms:.3f} | {ms / base_ms:.2f}× | {tune} | {held} | {drop} |")


if __name__ == "__main__":
    main()
