"""One table: an early-exit artifact at the thresholds its build chose, against the best its
exits could do.

The ceiling: thresholds chosen on the evaluation split's own labels by the pass's rule
(:func:`edgec.exits.choose_thresholds`, the build's cost model, the same top-1 budget below
``--reference``). No threshold chosen on training images can beat it on this split, so it
bounds what better threshold calibration could win with these exits and heads; it is a
measurement, never a configuration to deploy. Only the exits the build kept are considered.

Rows, each streamed over the first ``--images`` evaluation images in order (batch 1, one
thread, one ONNX Runtime session per stage as the cascade deploys, ``--rounds`` rounds visiting
every row in turn, the rounds' drift taken out by :func:`edgec.measure_set.interleaved_levels`):
the plain int8 artifact, the cascade at the build's thresholds and at the ceiling's. Top-1 and
the exit histogram over the whole split; the cost model's saving on this split beside the
measured one.

    python benchmarks/exit_ceiling.py --int8 DIR --exit DIR --data TEST.npz [--reference 93.39]
        [--budget 1.0] [--images 10000] [--rounds 3]

DIR: artifact folders printed by ``edgec build`` (``--recipe passes/int8.toml`` and
``--recipe passes/exit-int8.toml`` of the same model). ``--reference``: the top-1 (%) the
budget counts from, e.g. the fp32 model's from ``benchmarks/compare.py``; default: the plain
int8 artifact's on this split.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from cascade_graph import artifact_arguments, plain_row, staged_row, streamed_levels  # noqa: E402

from edgec import exits as ee  # noqa: E402
from edgec.artifact import read_manifest  # noqa: E402
from edgec.cpu import host_cpu  # noqa: E402
from edgec.passes.early_exit import costs_from_report, evaluate_choice  # noqa: E402
from edgec.runner import runner  # noqa: E402

BATCH = 500


def stage_outputs(directory: Path, images, spec) -> tuple[list[np.ndarray], np.ndarray]:
    """(each exit's logits, the final logits) of the cascade's stages over ``images``, every
    image through every stage (batches of ``BATCH``)."""
    stages = json.loads((directory / "cascade.json").read_text())["stages"]
    sessions = [runner.ort_session((directory / f).read_bytes(), threads=2) for f in stages]
    exits, final = [[] for _ in sessions[:-1]], []
    for i in range(0, len(images), BATCH):
        x = runner.preprocess(images[i:i + BATCH], spec)
        for store, session in zip(exits, sessions):
            x, logits, _ = session.run(None, {session.get_inputs()[0].name: x})
            store.append(logits)
        final.append(sessions[-1].run(None, {sessions[-1].get_inputs()[0].name: x})[0])
    return [np.concatenate(e) for e in exits], np.concatenate(final)


def plain_top1(directory: Path, images, labels, spec) -> float:
    session = runner.ort_session((directory / "model.onnx").read_bytes(), threads=2)
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: runner.preprocess(images[i:i + BATCH],
                                                                          spec)})[0]
                             for i in range(0, len(images), BATCH)])
    return float((logits.argmax(1) == labels).mean())


def main() -> None:
    parser = artifact_arguments(__doc__.splitlines()[0])
    parser.add_argument("--reference", type=float, default=None,
                        help="top-1 (%%) the budget counts from; default: the int8 artifact's")
    parser.add_argument("--budget", type=float, default=1.0, help="top-1 points")
    parser.add_argument("--images", type=int, default=10000, help="images streamed")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    manifest = read_manifest(args.exit)
    report = next(step["report"] for step in manifest["lineage"] if step["pass"] == "early_exit")
    all_costs, kept = costs_from_report(report)
    costs = all_costs.subset(kept)
    built = json.loads((args.exit / "cascade.json").read_text())["thresholds"]
    images, labels = runner.read_split(args.data, 0, None)
    spec = manifest["input"]
    exit_logits, final = stage_outputs(args.exit, images, spec)
    reference = (args.reference / 100 if args.reference is not None
                 else plain_top1(args.int8, images, labels, spec))
    ceiling = ee.choose_thresholds(exit_logits, final, labels, costs, args.budget, reference,
                                   candidates=256)
    cascades = {"build's thresholds": built, "ceiling (thresholds on these labels)": ceiling}
    found = {name: evaluate_choice([final, *exit_logits], labels, ts, costs)
             for name, ts in cascades.items()}
    xs = [runner.preprocess(images[i:i + 1], spec) for i in range(min(args.images, len(images)))]
    rows = {"plain int8": plain_row(args.int8),
            **{name: staged_row(args.exit, ts) for name, ts in cascades.items()}}
    levels, _ = streamed_levels(rows, xs, args.rounds)
    cpu = host_cpu()
    names = [report["candidates"][k]["after"] for k in kept]
    print(f"\n{manifest['name']}: exits {names}, {len(labels)} images for top-1, {len(xs)} "
          f"streamed, batch 1, 1 thread, {args.rounds} rounds, on {cpu.model} "
          f"({' '.join(cpu.features)}); budget {args.budget} points below {reference:.2%}\n")
    print("| stream | thresholds | top-1 | exits (final last) | cost model saving | µs per "
          "image | measured saving |")
    print("|---|---|---|---|---|---|---|")
    plain = levels["plain int8"]
    print(f"| plain int8 | - | - | - | - | {plain:.1f} | - |")
    for name, ts in cascades.items():
        row = found[name]
        print(f"| {name} | {', '.join(f'{t:.4f}' for t in ts)} | {row['cascade_top1']:.2%} | "
              f"{'/'.join(map(str, row['histogram']))} | {row['expected_saving']:.1%} | "
              f"{levels[name]:.1f} | {1 - levels[name] / plain:.1%} |")


if __name__ == "__main__":
    main()
