"""One run, one table: the same model and data through PyTorch, ONNX Runtime and edgec recipes.

Rows: PyTorch eager fp32; ONNX Runtime fp32, int8 with ``quantize_static``'s defaults (s8/s8
per-tensor) and plain u8/s8 per-channel (the scheme edgec used everywhere before it chose one per
CPU); each edgec
recipe (default: int8, datafree-int8, mixed, prune-int8, exit-int8); and, with
``--prune-ratios``, prune-int8 at fixed ratios instead of its budget search (the pruning
frontier: ratio vs MACs vs top-1 vs latency). Top-1 on the full evaluation split, from each
artifact's own runner. Latency at batch 1, 1 thread (OMP_WAIT_POLICY=PASSIVE, ORT spinning
off), all rows measured in this one run by the same runner protocol:
- p50 / p90: one input repeated (the usual single-input latency);
- stream mean: the whole evaluation split streamed in order, one image at a time (the number
  that counts for early-exit cascades, whose cost depends on the image).
Every row is measured in the same measurement sets (one runner, the rows in turn, each loaded
afresh): ``--rounds`` windows on one input (default 3) and, for the stream means, ``--rounds``
passes over the split in chunks; each figure is read against edgec int8 set by set
(:func:`paired`), since this machine's speed drifts within seconds.
Under the table, each prune-int8 row's search (its seconds and every step's ratio, MACs,
fine-tune epochs and held-out drop) and each early-exit row's choice (exits, thresholds,
held-out rates and expected saving).

    nice -n 10 python benchmarks/compare.py [--model examples/resnet20_cifar10/model.toml]
        [--recipe passes/int8.toml --recipe passes/exit-int8.toml ...] [--prune-ratios 0.3 0.5]
        [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from edgec.accuracy import onnx_logits, top1, torch_logits  # noqa: E402
from edgec.analysis import total_macs  # noqa: E402
from edgec.artifact import Artifact  # noqa: E402
from edgec.build import BuildRequest, build, write_artifact  # noqa: E402
from edgec.config import resolve_path  # noqa: E402
from edgec.cpu import host_cpu  # noqa: E402
from edgec.data import load_data_config, preprocess  # noqa: E402
from edgec.devices import LocalDevice  # noqa: E402
from edgec.errors import EdgecError  # noqa: E402
from edgec.measure import MeasureSpec  # noqa: E402
from edgec.measure_set import measure_set  # noqa: E402
from edgec.model import load_model_config, load_torch_model  # noqa: E402
from edgec.onnx_export import export_onnx  # noqa: E402
from edgec.targets import load_target  # noqa: E402

SPEC = MeasureSpec(warmup=50, repeat=300, min_time_s=2.0, threads=1)
STREAM_CHUNK = 500  # images per window of the stream means: a second or two per row
RECIPES = ("int8", "datafree-int8", "mixed", "prune-int8", "exit-int8")


@dataclass
class Row:
    """One line of the table; ``directory`` is the artifact measured (None: PyTorch)."""

    name: str
    top1: float
    macs: float | None = None
    ratio: str = "-"
    p50: float = float("nan")
    p90: float = float("nan")
    stream_mean: float = float("nan")
    size: int | None = None
    exits: str = "-"
    scheme: str = "-"
    directory: Path | None = None
    note: str = ""
    predicted: dict | None = None  # an early-exit row's pass: its saving and top-1 drop


def torch_row(model, spec, evaluation, macs) -> Row:
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
    return Row("PyTorch eager fp32", accuracy, macs, p50=statistics.median(samples),
               p90=float(np.percentile(samples, 90)))


def onnx_row(name, path, config, target, evaluation, workdir, macs, scheme="-") -> Row:
    directory = workdir / re.sub(r"[^\w.-]", "_", name)
    directory.mkdir()
    manifest = write_artifact(Artifact("onnx", path), config, target, [], directory)
    accuracy = top1(onnx_logits(path, evaluation, config.input), evaluation.labels)
    return Row(name, accuracy, macs, size=manifest["size_bytes"], directory=directory,
               scheme=scheme)


def ort_baselines(model, config, target, calibration, evaluation, workdir, macs) -> list[Row]:
    from onnxruntime.quantization import QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = workdir / "ort-fp32.onnx"
    fp32.write_bytes(export_onnx(model, config.input))
    pre, int8, u8s8 = (workdir / f"ort-{n}.onnx" for n in ("pre", "int8", "u8s8"))
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)

    def reader():
        batches = iter([{"input": preprocess(calibration.images[i:i + 32], config.input)}
                        for i in range(0, 512, 32)])
        return type("Reader", (), {"get_next": lambda self: next(batches, None)})()

    quantize_static(str(pre), str(int8), reader())
    quantize_static(str(pre), str(u8s8), reader(), per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return [onnx_row("ONNX Runtime fp32", fp32, config, target, evaluation, workdir, macs),
            onnx_row("ONNX Runtime int8 (quantize_static defaults)", int8, config, target,
                     evaluation, workdir, macs, "s8s8 per-tensor"),
            onnx_row("ONNX Runtime int8 u8/s8 per-channel", u8s8, config, target, evaluation,
                     workdir, macs, "u8s8")]


def fixed_ratio(ratio: float, seconds: float) -> tuple[str, dict]:
    """(row name, overrides) for prune-int8 pruning ``ratio`` (its epochs, fine-tune capped at
    ``seconds``), with no ratio search and no budget to stop it (the ledger still measures)."""
    return f"prune-{ratio}-int8", {"prune.budget_points": None, "prune.ratio": ratio,
                                   "prune.time_budget_s": seconds, "budget.points": 100.0}


def edgec_row(model_path, recipe: Path | str, workdir: Path, base_macs: float,
              name: str = "", overrides: dict | None = None, target: str = "local",
              backend: str | None = None, budget: float | None = None) -> Row:
    """One edgec build (the recipe with ``overrides``, see ``edgec build --set``) as a row."""
    label = name or Path(recipe).stem
    name = f"edgec {label}"
    try:
        result = build(BuildRequest(model_path, target, recipe, out=workdir / "builds",
                                    profile=False, overrides=overrides or {}, backend=backend,
                                    budget=budget),
                       progress=lambda m: print(f"  [{label}] {m}", flush=True))
    except EdgecError as exc:  # e.g. a budget the recipe cannot meet: report it as a row
        print(f"{name}: {type(exc).__name__}: {exc}")
        return Row(name, float("nan"), note=f"failed: {type(exc).__name__}: {exc}")
    manifest = result.manifest
    reports = {step["pass"]: step["report"] for step in manifest["lineage"]}
    prune = reports.get("prune", {})
    row = Row(name, manifest["accuracy"]["top1"], prune.get("macs_after", base_macs),
              size=manifest["size_bytes"], directory=result.directory,
              scheme=manifest.get("int8", {}).get("scheme", "-"))
    if "ratio" in prune:
        row.ratio = f"{prune['ratio']} of {prune.get('ratio_of', 'channels')}"
    notes = [search_summary(prune) if "trials" in prune else ""]
    if "early_exit" in reports:
        row.exits = "/".join(str(n) for n in manifest["accuracy"]["exits"])
        row.macs = None  # depends on the image; see the exit histogram
        report = reports["early_exit"]
        row.predicted = {"saving": report["expected_saving"],
                         "drop": report["threshold_split"].get("predicted_drop_points")}
        notes.append(exit_summary(report))
    row.note = "; ".join(n for n in notes if n)
    return row


def exit_summary(report: dict) -> str:
    """The early_exit pass's choice: exits, thresholds, rates and saving on held-out images,
    each candidate's held-out top-1 and measured head cost, and the joint fine-tune."""
    split = report["threshold_split"]
    exits = ", ".join(f"{e['after']} (threshold {e['threshold']:.4f}, rate {e['rate']:.3f})"
                      for e in report["exits"]) or "none"
    candidates = ", ".join(f"{c['after']} {c['threshold_split_top1'] * 100:.1f} % / "
                           f"{c['head_ms']:.4f} ms" for c in report["candidates"])
    tune = report.get("finetune") or {}
    tuned = (f"; joint fine-tune {tune['epochs']} epochs, cost {tune['cost_points']:.2f} "
             f"points ({tune['cost_view']} view)") if tune else ""
    return (f"early_exit {report['seconds']:.0f} s, kept {exits}; held-out top-1 "
            f"{split['reference_top1'] * 100:.2f} % -> cascade {split['cascade_top1'] * 100:.2f} "
            f"%, expected saving {report['expected_saving'] * 100:.1f} % (streamed; cost model "
            f"{report.get('model_saving', report['expected_saving']) * 100:.1f} %"
            f"{_dropped(report)}); candidates (held-out "
            f"top-1 / head): {candidates}; boundary {report['call_ms']:.4f} ms{tuned}")


def _dropped(report: dict) -> str:
    dropped = (report.get("stream") or {}).get("dropped") or []
    return f", dropped on the stream: {', '.join(dropped)}" if dropped else ""


def search_summary(prune: dict) -> str:
    """The prune pass's search: each step's ratio, MACs, fine-tune and held-out drop."""
    steps = [f"ratio {t['ratio']}{_channels(t)}: {t['macs'] / 1e6:.2f} M MACs, "
             f"{t['finetune']['epochs']} epochs in {t['finetune'].get('seconds', 0):.0f} s, "
             f"held-out drop {t['holdout_drop_points']:.2f}" for t in prune["trials"]]
    return (f"prune search {prune['seconds']:.0f} s, kept {prune['ratio']} "
            f"({'; '.join(steps)})")


def _channels(trial: dict) -> str:
    return f" (channel ratio {trial['channel_ratio']})" if "channel_ratio" in trial else ""


def measure(rows: list[Row], test_npz: Path, count: int, rounds: int) -> None:
    """p50/p90 on one input and the stream means, every row measured in the same measurement
    sets and read against edgec int8 (else the first row) window by window (:func:`paired`)."""
    device = LocalDevice()
    measured = [r for r in rows if r.directory is not None]
    base = next((i for i, r in enumerate(measured) if r.name == "edgec int8"), 0)
    found = measure_set(device, [r.directory for r in measured], SPEC, rounds)
    p50 = paired([m.extra["window_p50_ms"] for m in found], base)
    p90 = paired([m.extra["window_p90_ms"] for m in found], base)
    for row, p50_ms, p90_ms in zip(measured, p50, p90):
        row.p50, row.p90 = p50_ms, p90_ms
    stream_means(device, measured, base, test_npz, count, rounds)


def paired(windows: list[list[float]], base: int) -> list[float]:
    """Each row's value from its windows (one per row in every set, the rows' windows of a set
    seconds apart): its mean ratio to row ``base`` in the same set, times ``base``'s median.
    This machine's speed drifts by tens of percent within seconds; a ratio taken within one
    set cancels it, a median of windows minutes apart does not."""
    reference = np.asarray(windows[base], dtype=float)
    return [float(np.median(reference) * np.mean(np.asarray(w, dtype=float) / reference))
            for w in windows]


def stream_means(device, rows: list[Row], base: int, test_npz: Path, count: int,
                 rounds: int) -> None:
    """Each row's mean ms per image over the evaluation split streamed in order: the split is
    streamed in chunks of ``STREAM_CHUNK`` images, each chunk one measurement set in which
    every row streams it in turn, loaded afresh (:func:`edgec.measure_set.measure_set`),
    ``rounds`` times over; the chunks' means read against row ``base`` (:func:`paired`)."""
    means = [[] for _ in rows]
    for _ in range(rounds):
        for start in range(0, count, STREAM_CHUNK):
            spec = MeasureSpec(warmup=20, repeat=min(STREAM_CHUNK, count - start),
                               min_time_s=0.0, threads=1, data=str(test_npz), start=start,
                               count=min(STREAM_CHUNK, count - start))
            for store, found in zip(means, measure_set(device, [r.directory for r in rows],
                                                       spec, 1)):
                store.append(found.mean)
    for row, mean in zip(rows, paired(means, base)):
        row.stream_mean = mean


def print_table(model_name: str, count: int, rows: list[Row]) -> None:
    base = next((r for r in rows if r.name == "edgec int8"), None)
    cpu = host_cpu()
    print(f"\n{model_name}: top-1 on {count} images, batch 1, 1 thread, on {cpu.model} "
          f"(int8 path {cpu.int8_path}; {' '.join(cpu.features)})\n")
    print("| system | int8 scheme | prune ratio | MACs (M) | top-1 | p50 ms | p90 ms | "
          "stream mean ms | vs edgec int8 (stream) | size KiB | exits (per exit, final last) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        size = f"{r.size / 1024:.1f}" if r.size else "-"
        macs = f"{r.macs / 1e6:.2f}" if r.macs else "-"
        versus = (f"{(r.stream_mean / base.stream_mean - 1) * 100:+.1f} %"
                  if base and np.isfinite(r.stream_mean) else "-")
        print(f"| {r.name} | {r.scheme} | {r.ratio} | {macs} | {r.top1 * 100:.2f} % | {r.p50:.3f} | "
              f"{r.p90:.3f} | {r.stream_mean:.3f} | {versus} | {size} | {r.exits} |")
    for r in rows:
        if r.note:
            print(f"{r.name}: {r.note}")
    for line in prediction_checks(rows, base):
        print(line)


def prediction_checks(rows: list[Row], base: Row | None) -> list[str]:
    """Each early-exit row's predictions against this run: the pass's saving against the
    stream mean measured here (vs edgec int8), its threshold-split top-1 drop against the test
    drop from PyTorch fp32 (quantization included)."""
    fp32 = next((r for r in rows if r.name == "PyTorch eager fp32"), None)
    lines = []
    for r in rows:
        if r.predicted is None or base is None or fp32 is None:
            continue
        measured = (1 - r.stream_mean / base.stream_mean) * 100
        saving = r.predicted["saving"] * 100
        drop, test_drop = r.predicted["drop"], (fp32.top1 - r.top1) * 100
        dropped = (f"; top-1 drop predicted {drop:.2f} points (threshold split), test "
                   f"{test_drop:.2f} vs fp32, error {test_drop - drop:+.2f}"
                   if drop is not None else "")
        lines.append(f"{r.name} predictions: saving {saving:.1f} %, measured {measured:.1f} % "
                     f"(error {measured - saving:+.1f} points){dropped}")
    return lines


def load_config_and_data(model_path: Path):
    """(model config, torch model, its MACs, calibration split, evaluation split, the
    evaluation npz the runner streams)."""
    config = load_model_config(model_path)
    data = load_data_config(config.resolve(config.data))
    calibration, evaluation = data.load("calibration"), data.load("evaluation")
    model = load_torch_model(config)
    return (config, model, total_macs(model, config.input), calibration, evaluation,
            resolve_path(data.root, data.evaluation.path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path,
                        default=ROOT / "examples" / "resnet20_cifar10" / "model.toml")
    parser.add_argument("--recipe", type=Path, action="append",
                        help=f"recipe TOML (repeatable); default: passes/{{{','.join(RECIPES)}}}")
    parser.add_argument("--prune-ratios", type=float, nargs="*", default=[])
    parser.add_argument("--prune-seconds", type=float, default=600.0,
                        help="cap on the fine-tune seconds of each --prune-ratios row")
    parser.add_argument("--rounds", type=int, default=3,
                        help="windows on one input, and passes over the split, per row")
    args = parser.parse_args()
    recipes = args.recipe or [ROOT / "passes" / f"{name}.toml" for name in RECIPES]
    config, model, macs, calibration, evaluation, test_npz = load_config_and_data(args.model)
    target = load_target("local")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        rows = [torch_row(model, config.input, evaluation, macs),
                *ort_baselines(model, config, target, calibration, evaluation, workdir, macs)]
        rows += [edgec_row(args.model, recipe, workdir, macs) for recipe in recipes]
        rows += [edgec_row(args.model, "prune-int8", workdir, macs, *fixed_ratio(
            r, args.prune_seconds)) for r in args.prune_ratios]
        measure(rows, test_npz, len(evaluation), args.rounds)
    print_table(config.name, len(evaluation), rows)


if __name__ == "__main__":
    main()
