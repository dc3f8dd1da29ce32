"""One table: an early-exit artifact streamed as it deploys (one ONNX Runtime session per stage,
the runner's ``Cascade``) against the same stages as one graph with an ``If`` per exit
(:func:`edgec.stages.cascade_graph`), and the plain int8 artifact.

Rows: each at the artifact's thresholds, and never exiting (thresholds 2) and always at the
first exit (thresholds 0), so that each path's cost shows apart from the exit rates. Batch 1,
one thread, the first ``--images`` test images streamed in order; ``--rounds`` rounds visit
every row in turn, each row's sessions created afresh per round, and the rounds' drift is taken
out (:func:`edgec.measure_set.interleaved_levels`). In-process, the runner's own session
options.

    python benchmarks/cascade_graph.py --int8 DIR --exit DIR --data TEST.npz [--images 2000]
        [--rounds 10]

DIR: an artifact folder printed by ``edgec build`` (e.g. ``--recipe passes/int8.toml`` and
``--recipe passes/exit-int8.toml`` of the same model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

from edgec.artifact import read_manifest  # noqa: E402
from edgec.cpu import host_cpu  # noqa: E402
from edgec.measure_set import interleaved_levels  # noqa: E402
from edgec.runner import runner  # noqa: E402
from edgec.stages import cascade_graph  # noqa: E402


def plain_row(directory: Path):
    def load():
        session = runner.ort_session((directory / "model.onnx").read_bytes(), threads=1)
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0], None
    return load


def staged_row(directory: Path, thresholds):
    spec = json.loads((directory / "cascade.json").read_text())

    def load():
        sessions = [runner.ort_session((directory / f).read_bytes(), threads=1)
                    for f in spec["stages"]]
        cascade = runner.Cascade(sessions, thresholds)
        return cascade, cascade.exits
    return load


def graph_row(directory: Path, thresholds):
    spec = json.loads((directory / "cascade.json").read_text())
    graph = cascade_graph([onnx.load(str(directory / f)) for f in spec["stages"]],
                          thresholds).SerializeToString()

    def load():
        session = runner.ort_session(graph, threads=1)
        name, exits = session.get_inputs()[0].name, [0] * (len(thresholds) + 1)

        def one(x):
            logits, index = session.run(None, {name: x})
            exits[int(index[0])] += 1
            return logits
        return one, exits
    return load


def artifact_arguments(description: str) -> argparse.ArgumentParser:
    """A parser with --int8, --exit (artifact folders) and --data (an npz split)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--int8", type=Path, required=True, help="the plain int8 artifact")
    parser.add_argument("--exit", type=Path, required=True, help="the early-exit artifact")
    parser.add_argument("--data", required=True,
                        help="npz with 'images' (uint8 NHWC) and 'labels', e.g. the test split")
    return parser


def streamed_levels(rows: dict, xs, rounds: int) -> tuple[dict[str, float], dict]:
    """(µs per image of each row, each row's exit histogram or None): ``rounds`` rounds visit
    every row in turn, loaded afresh and warmed on 50 images, then streaming ``xs`` in order;
    the rounds' drift taken out (:func:`interleaved_levels`)."""
    means, histograms = {name: [] for name in rows}, {}
    for _ in range(rounds):
        for name, load in rows.items():
            run, exits = load()
            for x in xs[:50]:
                run(x)
            if exits is not None:
                exits[:] = [0] * len(exits)
            started = time.perf_counter()
            for x in xs:
                run(x)
            means[name].append((time.perf_counter() - started) * 1e6 / len(xs))
            histograms[name] = list(exits) if exits is not None else None
    return dict(zip(means, interleaved_levels(list(means.values())))), histograms


def main() -> None:
    parser = artifact_arguments(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    manifest = read_manifest(args.exit)
    thresholds = json.loads((args.exit / "cascade.json").read_text())["thresholds"]
    images, _ = runner.read_split(args.data, 0, args.images)
    spec = manifest["input"]
    xs = [runner.preprocess(images[i:i + 1], spec) for i in range(len(images))]
    never, always = [2.0] * len(thresholds), [0.0] * len(thresholds)
    rows = {"plain int8": plain_row(args.int8)}
    for label, chosen in (("", thresholds), (", never exits", never), (", always exit 0", always)):
        rows[f"sessions per stage{label}"] = staged_row(args.exit, chosen)
        rows[f"one graph{label}"] = graph_row(args.exit, chosen)
    levels, histograms = streamed_levels(rows, xs, args.rounds)
    cpu = host_cpu()
    print(f"\n{manifest['name']}: {len(xs)} test images streamed, batch 1, "
          f"1 thread, {args.rounds} rounds, on {cpu.model} ({' '.join(cpu.features)})\n")
    print("| stream | µs per image | vs plain int8 | exits (final last) |")
    print("|---|---|---|---|")
    for name, level in levels.items():
        print(f"| {name} | {level:.1f} | {(level / levels['plain int8'] - 1) * 100:+.1f} % | "
              f"{histograms[name] or '-'} |")


if __name__ == "__main__":
    main()
