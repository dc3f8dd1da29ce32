"""``edgec ci build|merge|diff|workflow|report``: one verified artifact per device on every commit.

Exit status: 0 when everything is ok; 1 when a target failed, missed its budget or regressed
(the message names it and the numbers); 2 for bad input (an EdgecError).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from edgec.cli_errors import fail
from edgec.errors import ConfigError, EdgecError

ci_app = typer.Typer(no_args_is_help=True,
                     help="CI artifacts per device: build, merge, diff, workflow, report.")
console = Console()
errors = Console(stderr=True)


def _targets(text: str | None) -> tuple[str, ...]:
    return tuple(name.strip() for name in (text or "").split(",") if name.strip())


@ci_app.command("build")
def ci_build(
    model: Path = typer.Argument(..., help="model TOML (factory/checkpoint/input/data)"),
    targets: str = typer.Option(None, help="comma-separated targets, e.g. local,rpi4,pynq-z2 "
                                           "(with --devices: only these of the inventory's)"),
    devices: Path = typer.Option(None, help="inventory folder: build for its boards' targets, "
                                            "evaluate and profile on each board"),
    device: str = typer.Option(None, help="only this board (a CI runner on the board)"),
    recipe: str = typer.Option(None, help="every target's recipe (default: the target's own)"),
    set_: list[str] = typer.Option(None, "--set", help="override a recipe parameter: "
                                   "PASS.PARAM=VALUE (TOML value), as in `edgec build`"),
    from_study: str = typer.Option(None, help="build the pick of this `edgec search` study"),
    storage: str = typer.Option(None, help="the study's storage URL"),
    budget: float = typer.Option(None, help="top-1 points each build may lose (default: the "
                                            "recipe's [budget])"),
    out: Path = typer.Option(Path("dist"), help="the artifacts and index.json go here"),
    data: Path = typer.Option(None, help="data TOML (default: the model TOML's `data`)"),
    rounds: int = typer.Option(3, help="separate latency measurements per artifact"),
    repeat: int = typer.Option(50, help="minimum timed runs per measurement"),
    min_time: float = typer.Option(1.0, help="minimum seconds of timed runs per measurement"),
    threads: int = typer.Option(1, help="runtime threads during measurement"),
    eval_count: int = typer.Option(0, help="images a board evaluates (0: all)"),
    latency_model: Path = typer.Option(None, help="predict latency where no board measures "
                                                  "(`edgec latency fit`)"),
    cache: bool = typer.Option(True, help="reuse cached pass outputs and evaluations"),
):
    """Build MODEL for every target (once per target), evaluate and profile it on each board
    that is reachable, publish OUT/<model>-<target>-<hash12>/ and OUT/index.json."""
    from edgec.ci.build import CiRequest, failures, run_ci
    from edgec.config import parse_overrides
    from edgec.measure import MeasureSpec

    try:
        if rounds < 1:
            raise ConfigError(f"--rounds {rounds}: measure at least once (--rounds 1)")
        request = CiRequest(model, _targets(targets), devices, device, recipe,
                            parse_overrides(set_ or []), from_study, storage, budget, out, data,
                            MeasureSpec(repeat=repeat, min_time_s=min_time, threads=threads),
                            eval_count, rounds, latency_model, cache)
        index = run_ci(request, lambda message: errors.print(message, highlight=False,
                                                             markup=False))
    except EdgecError as exc:
        fail(exc)
    console.print(entries_table(index["entries"], f"{index['model']}: {out}/index.json"))
    problems = failures(index)
    for line in problems:
        errors.print(f"error: {line}", highlight=False, markup=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)


@ci_app.command("merge")
def ci_merge(
    indexes: list[Path] = typer.Argument(..., help="index.json files (or dist folders)"),
    out: Path = typer.Option(Path("dist/index.json"), help="the merged index"),
):
    """Merge the per-target indexes of a CI matrix into one."""
    from edgec.ci.index import merge_indexes, write_index

    try:
        merged = merge_indexes(indexes)
        write_index(out, merged)
    except EdgecError as exc:
        fail(exc)
    console.print(f"{len(merged['entries'])} entries → {out}", highlight=False, markup=False)


@ci_app.command("diff")
def ci_diff(
    old: Path = typer.Argument(..., help="the baseline index.json (e.g. main's)"),
    new: Path = typer.Argument(..., help="this commit's index.json"),
    max_latency_regress: str = typer.Option("5%", help="latency rise allowed beyond the noise"),
    max_accuracy_drop: float = typer.Option(0.2, help="top-1 points a target may lose"),
):
    """Accuracy, latency and size changes per target and device; exit 1 on a regression."""
    from edgec.ci.diff import Thresholds, compare, parse_fraction
    from edgec.ci.index import load_index

    try:
        limits = Thresholds(parse_fraction(max_latency_regress, "--max-latency-regress"),
                            max_accuracy_drop)
        changes = compare(load_index(old), load_index(new), limits)
    except EdgecError as exc:
        fail(exc)
    console.print(changes_table(changes))
    regressed = [c for c in changes if c.regressions]
    for change in regressed:
        where = change.target + (f" on {change.device}" if change.device else "")
        errors.print(f"regression: {where}: {'; '.join(change.regressions)}", highlight=False,
                     markup=False, soft_wrap=True)
    if regressed:
        raise typer.Exit(1)
    console.print(f"no regression beyond {limits.max_latency_regress:.0%} latency (outside the "
                  f"noise) or {limits.max_accuracy_drop:g} top-1 points", highlight=False)


@ci_app.command("workflow")
def ci_workflow(
    model: Path = typer.Argument(..., help="the model TOML the workflow builds"),
    provider: str = typer.Option("github", help="github or gitlab"),
    targets: str = typer.Option(None, help="comma-separated targets (default: the inventory's)"),
    devices: Path = typer.Option(Path("devices"), help="inventory folder: a profiling job per "
                                                       "board, on a self-hosted runner "
                                                       "labelled with its name"),
    budget: float = typer.Option(None, help="top-1 points each build may lose"),
    root: Path = typer.Option(Path("."), help="repository root the file is written under"),
):
    """Write the CI workflow: a build matrix over the targets (the budget gate), a profiling
    job per board, a comparison with main's index."""
    from edgec.ci.workflow import write_workflow
    from edgec.devices.inventory import load_inventory
    from edgec.targets import load_target

    try:
        boards, bad = load_inventory(devices) if devices.is_dir() else ([], [])
        if bad:
            raise bad[0]
        board_targets = {b.name: load_target(b.target).name for b in boards}
        names = _targets(targets) or tuple(dict.fromkeys(board_targets.values()))
        if not names:
            raise ConfigError(f"no targets: give --targets a,b,c or boards in {devices}/")
        names = tuple(load_target(name).name for name in names)
        boards_of = {name: target for name, target in board_targets.items() if target in names}
        path = write_workflow(provider, list(names), boards_of, str(model), root, budget)
    except EdgecError as exc:
        fail(exc)
    console.print(f"wrote {path}", highlight=False, markup=False)


@ci_app.command("report")
def ci_report(dist: Path = typer.Argument(Path("dist"), help="the folder of index.json")):
    """Write DIST/index.html: one row per device, and a latency/accuracy chart."""
    from edgec.ci.report import write_report

    try:
        path = write_report(dist)
    except EdgecError as exc:
        fail(exc)
    console.print(f"wrote {path}", highlight=False, markup=False)


def entries_table(entries: list[dict], title: str) -> Table:
    """One row per index entry."""
    table = Table(title=title)
    for column in ("target", "device", "status", "top-1", "latency ms", "size KiB", "artifact"):
        table.add_column(column, justify="right" if column in ("top-1", "latency ms",
                                                              "size KiB") else "left")
    for entry in entries:
        table.add_row(entry["target"], entry["device"] or "-", entry["status"],
                      _top1_text(entry), _latency_text(entry.get("latency")),
                      f"{entry['size_bytes'] / 1024:.1f}", entry["artifact"] or "-")
    return table


def changes_table(changes) -> Table:
    """One row per (target, device) of either index."""
    table = Table()
    for column in ("target", "device", "top-1 old → new", "latency ms old → new", "change",
                   "size KiB", "verdict"):
        table.add_column(column)
    for change in changes:
        old, new = change.old or {}, change.new or {}
        lat = change.latency_change
        table.add_row(change.target, change.device or "-",
                      f"{_top1_text(old)} → {_top1_text(new)}",
                      f"{_latency_text(old.get('latency'))} → {_latency_text(new.get('latency'))}",
                      "-" if lat is None else f"{lat:+.1%}",
                      f"{old.get('size_bytes', 0) / 1024:.1f} → {new.get('size_bytes', 0) / 1024:.1f}",
                      "REGRESSION" if change.regressions else "ok")
    return table


def _top1_text(entry: dict) -> str:
    accuracy = entry.get("accuracy")
    return "-" if not accuracy else f"{accuracy['top1'] * 100:.2f} %"


def _latency_text(latency: dict | None) -> str:
    if not latency:
        return "-"
    mark = " (predicted)" if latency.get("source") == "predicted" else ""
    return f"{latency['mean_ms']:.4g} ± {latency['ci95_ms']:.2g}{mark}"
