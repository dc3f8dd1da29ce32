"""One run, one table: the pick of an `edgec search` study against what a user has without it.

Rows: PyTorch eager fp32; ONNX Runtime fp32; plain ONNX Runtime int8 (``quantize_static`` u8/s8
per-channel QDQ, what a user picks, and its defaults, s8/s8 per-tensor); the edgec int8 recipe;
and the search's pick (rebuilt from the study through the step cache: ``--from-study``). Top-1
on the full evaluation split from each artifact's own runner; latency at batch 1, 1 thread, by
the protocol of ``benchmarks/compare.py`` (p50/p90 on one input, stream mean over the split in
order), each the median of ``--rounds`` rounds that visit every row in turn. Under the table:
the pick's stream-mean speed-up over plain ONNX Runtime int8 (u8/s8 per-channel).

    python -m edgec.cli search examples/resnet20_cifar10/model.toml --target local --study r20
    nice -n 10 python benchmarks/search.py --study r20 [--storage URL] [--rounds 3]

``--versus STUDY`` adds another study's pick (same storage), e.g. a search of the same space
screened by a latency model against the fully measured one; the last line gives their ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import (  # noqa: E402
    ROOT,
    Row,
    edgec_row,
    load_config_and_data,
    measure,
    ort_baselines,
    print_table,
    torch_row,
)

from edgec.search.study import load_pick  # noqa: E402
from edgec.targets import load_target  # noqa: E402

PLAIN_ORT_INT8 = "ONNX Runtime int8 u8/s8 per-channel"


def pick_row(model_path: Path, study: str, storage: str | None, workdir: Path,
             base_macs: float, trial: int | None = None, named: bool = False) -> Row:
    """The study's pick (or its trial ``trial``) as a row (its recipe, backend, overrides and
    budget; cached steps); ``named``: the row names the study."""
    pick = load_pick(study, storage, trial)
    what = ("search pick" if trial is None else "search trial") + (f" of {study}" if named else "")
    row = edgec_row(model_path, pick.recipe, workdir, base_macs, f"{what} (trial "
                    f"{pick.trial}: {pick.recipe})", pick.overrides, target=pick.target,
                    backend=pick.backend, budget=pick.budget)
    row.note = "; ".join(f"{k}={v}" for k, v in pick.overrides.items()) or "recipe as written"
    return row


def study_model(study: str, storage: str | None) -> Path:
    """The model TOML the study searched (relative paths from the repository root)."""
    model = load_pick(study, storage).model
    if model is None:
        raise SystemExit(f"study {study!r} does not record its model; give --model")
    return model if model.is_absolute() else ROOT / model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="the model TOML (default: the study's)")
    parser.add_argument("--study", required=True, help="the `edgec search` study to compare")
    parser.add_argument("--storage", help="its storage URL (default: the search's default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--also", type=int, action="append", default=[],
                        help="another trial of the study to compare (repeatable)")
    parser.add_argument("--versus", help="another study (same storage) whose pick to compare")
    args = parser.parse_args()
    args.model = args.model or study_model(args.study, args.storage)
    config, model, macs, calibration, evaluation, test_npz = load_config_and_data(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        rows = [torch_row(model, config.input, evaluation, macs),
                *ort_baselines(model, config, load_target("local"), calibration, evaluation,
                               workdir, macs),
                edgec_row(args.model, "int8", workdir, macs),
                *(pick_row(args.model, args.study, args.storage, workdir, macs, trial)
                  for trial in args.also),
                *([pick_row(args.model, args.versus, args.storage, workdir, macs, named=True)]
                  if args.versus else []),
                pick_row(args.model, args.study, args.storage, workdir, macs,
                         named=bool(args.versus))]
        measure(rows, test_npz, len(evaluation), args.rounds)
    print_table(config.name, len(evaluation), rows)
    plain = next(r for r in rows if r.name == PLAIN_ORT_INT8)
    for row in rows[rows.index(plain) + 1:]:
        print(f"{row.name} vs plain ONNX Runtime int8 (stream mean): "
              f"{plain.stream_mean / row.stream_mean:.2f}x faster, top-1 "
              f"{(row.top1 - plain.top1) * 100:+.2f} points")
    if args.versus:
        versus, pick = rows[-2], rows[-1]
        print(f"pick of {args.versus} / pick of {args.study} (stream mean): "
              f"{versus.stream_mean / pick.stream_mean:.3f}, p50 {versus.p50 / pick.p50:.3f}")


if __name__ == "__main__":
    main()
