"""ResNet-20 through the FPGA path: hls_rewrite → hls4ml project → bit-accurate C simulation.

Prints one table: g++ compile time, C-simulation time per image, argmax agreement with the float
model and top-1 of both on the first N CIFAR-10 test images, and edgec's resource estimate.
Slow (about 2.5 min of g++ and ~1 s per simulated image on this 2-core VM), so not a unit test.

    python benchmarks/fpga_resnet20.py [--images 500] [--target pynq-z2] [--model resnet56.toml]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--target", default="pynq-z2")
    parser.add_argument("--model", default=str(ROOT / "examples/resnet20_cifar10/model.toml"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    from test_hls import artifact_predict

    from edgec.accuracy import top1, torch_logits
    from edgec.artifact import Artifact
    from edgec.build import write_artifact
    from edgec.data import load_data_config, preprocess
    from edgec.model import load_model_config, load_torch_model
    from edgec.pipeline import Context
    from edgec.recipes import load_recipe
    from edgec.targets import load_target

    config = load_model_config(args.model)
    target = load_target(args.target)
    model = load_torch_model(config)
    evaluation = load_data_config(config.resolve(config.data)).load("evaluation").head(args.images)
    with tempfile.TemporaryDirectory(prefix="edgec-fpga-") as tmp:
        tmp = Path(tmp)
        source = Artifact("torch", model, extras={"input_shape": list(config.input.shape)})
        built = load_recipe(ROOT / "passes/fpga.toml").run(source, Context(target, config.input,
                                                                           None, tmp))
        directory = tmp / "artifact"
        directory.mkdir()
        started = time.perf_counter()
        manifest = write_artifact(built, config, target, [], directory)
        compile_s = time.perf_counter() - started
        x = preprocess(evaluation.images, config.input)
        started = time.perf_counter()
        simulated = artifact_predict(directory)(x)
        per_image = (time.perf_counter() - started) / len(x)
    reference = torch_logits(model, evaluation, config.input)
    entry, resources = manifest["entry"], manifest["entry"]["resources"]
    agreement = float((np.argmax(simulated, 1) == np.argmax(reference, 1)).mean())
    print(f"| model | images | precision | reuse | compile s | C-sim s/img | agreement | "
          f"top-1 C-sim | top-1 float | DSP est. | BRAM18K est. (weights) |\n|{'---|' * 11}")
    print(f"| {config.name} | {len(x)} | {entry['precision']} | {entry['reuse_factor']} | "
          f"{compile_s:.0f} | {per_image:.2f} | {agreement * 100:.1f} % | "
          f"{top1(simulated, evaluation.labels) * 100:.1f} % | "
          f"{top1(reference, evaluation.labels) * 100:.1f} % | {resources['dsp']} / "
          f"{resources['available'].get('dsp', '?')} | {resources['bram_18k_weights']} / "
          f"{resources['available'].get('bram_18k', '?')} |")


if __name__ == "__main__":
    main()
