"""TVM on this host: untuned vs MetaSchedule-tuned, beside ONNX Runtime, one table.

    python benchmarks/tvm_tune.py [--model examples/resnet20_cifar10/model.toml] [--trials 64]

Each row is an artifact built by edgec (fp32 recipe) and timed by its own runner on the local
device: batch 1, 1 thread, p50 over at least 50 runs and 2 s. A second run with the same model,
target and budget reuses the cached tuning records (the `reused` column) instead of tuning again.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from edgec.artifact import Artifact
from edgec.build import write_artifact
from edgec.devices import LocalDevice
from edgec.measure import MeasureSpec
from edgec.model import load_model_config, load_torch_model
from edgec.pipeline import Context
from edgec.recipes import load_recipe
from edgec.targets import load_target

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "examples/resnet20_cifar10/model.toml"))
    parser.add_argument("--trials", type=int, default=64)
    args = parser.parse_args()
    config = load_model_config(args.model)
    target = load_target("local")
    spec = MeasureSpec(repeat=50, min_time_s=2.0, threads=1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgec-bench-") as tmp:
        tmp = Path(tmp)
        ctx = Context(target, config.input, None, tmp)
        fp32 = load_recipe(ROOT / "passes" / "fp32.toml").run(
            Artifact("torch", load_torch_model(config)), ctx)
        for name, backend, options in [("onnxruntime", "onnxruntime", None),
                                       ("tvm untuned", "tvm", None),
                                       (f"tvm tuned ({args.trials} trials)", "tvm",
                                        {"tune_trials": args.trials}),
                                       ("tvm tuned again (cached records)", "tvm",
                                        {"tune_trials": args.trials})]:
            out = tmp / name.replace(" ", "_")
            out.mkdir()
            started = time.perf_counter()
            manifest = write_artifact(fp32, config, target, [], out, backend, options)
            build_s = time.perf_counter() - started
            latency = LocalDevice().measure(out, spec)
            reused = manifest["entry"].get("tuning", {}).get("reused", "-")
            rows.append((name, latency.p50, latency.p90, build_s, reused))
    print(f"\n{config.name} on this host, batch 1, 1 thread\n")
    print("| system | p50 ms | p90 ms | build s | tuning reused |")
    print("|---|---|---|---|---|")
    for name, p50, p90, build_s, reused in rows:
        print(f"| {name} | {p50:.3f} | {p90:.3f} | {build_s:.0f} | {reused} |")


if __name__ == "__main__":
    main()
