"""The ``edgec`` command line."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from edgec.cli_cache import cache_app
from edgec.cli_ci import ci_app
from edgec.cli_devices import devices_app, profile
from edgec.cli_errors import fail
from edgec.cli_latency import latency_app
from edgec.cli_search import search, search_worker
from edgec.cli_space import space
from edgec.config import parse_overrides
from edgec.errors import EdgecError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Compile a PyTorch model into a measured artifact for an edge device.")
console = Console()


def _version(value: bool) -> None:
    if value:
        from edgec import __version__

        console.print(f"edgec {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")):
    """Compile a PyTorch model into a measured artifact for an edge device."""


@app.command()
def build(
    model: Path = typer.Argument(..., help="model TOML (factory/checkpoint/input/data)"),
    target: str = typer.Option("local", help="target name (see `edgec targets`) or TOML path"),
    recipe: str = typer.Option(None, help="built-in recipe name (int8, mixed, prune-int8, ...; see "
                                          "`edgec recipes`) or a recipe TOML path (default: the "
                                          "target's, else int8)"),
    data: Path = typer.Option(None, help="data TOML (default: the model TOML's `data`)"),
    out: Path = typer.Option(Path("build"), help="root of build/<target>/<model>-<hash>/"),
    repeat: int = typer.Option(50, help="minimum timed runs per latency measurement"),
    min_time: float = typer.Option(1.0, help="minimum seconds of timed runs"),
    threads: int = typer.Option(1, help="runtime threads during measurement"),
    profile: bool = typer.Option(True, help="measure latency on the device"),
    device: str = typer.Option("local", help="profile and evaluate on this device "
                                             "(devices/NAME.toml)"),
    eval_count: int = typer.Option(0, help="images the device evaluates (0: all; for slow or "
                                           "emulated boards)"),
    backend: str = typer.Option(None, help="one of the target's backends (default: first that fits)"),
    tune: int = typer.Option(0, help="MetaSchedule trials for the tvm backend (0: untuned)"),
    set_: list[str] = typer.Option(None, "--set", help="override a recipe parameter: "
                                   "PASS.PARAM=VALUE (TOML value), e.g. --set quantize.mode=mixed"),
    budget: float = typer.Option(None, help="top-1 points the whole build may lose against the "
                                            "float model (default: the recipe's [budget])"),
    cache: bool = typer.Option(True, help="reuse cached steps, evaluations and measurements "
                                          "(see `edgec cache info`)"),
    from_study: str = typer.Option(None, help="build the pick of this `edgec search` study "
                                              "(its recipe, backend, --set values and budget)"),
    storage: str = typer.Option(None, help="the study's storage URL (default: "
                                           "sqlite:///search/STUDY/STUDY.db)"),
):
    """Run the recipe's passes, compile for TARGET, evaluate and profile; print the table."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from edgec.build import BuildRequest
    from edgec.build import build as run_build
    from edgec.measure import MeasureSpec

    try:
        if from_study:
            target, recipe, backend, budget, set_ = _from_study(from_study, storage, target,
                                                               recipe, backend, budget, set_)
        request = BuildRequest(model, target, recipe, data, out,
                               MeasureSpec(repeat=repeat, min_time_s=min_time, threads=threads),
                               profile, device=device, eval_count=eval_count, backend=backend,
                               tune=tune, overrides=parse_overrides(set_ or []), budget=budget,
                               cache=cache)
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("building", total=None)
            result = run_build(request, lambda message: _progress(bar, task, message))
    except EdgecError as exc:
        fail(exc)
    from edgec.report import report_notes

    console.print(_rows_table(result.rows, f"{result.manifest['name']} → {target}"))
    for line in report_notes(result.manifest):
        console.print(line, highlight=False, markup=False)
    console.print(f"artifact: {result.directory}")


def _from_study(study: str, storage: str | None, target: str, recipe: str | None,
                backend: str | None, budget: float | None, set_: list[str] | None):
    """The build options of a study's pick; --set values given too are applied after its own,
    an explicit --recipe or a different --target is an error."""
    from edgec.errors import ConfigError
    from edgec.search.study import load_pick, toml_text

    pick = load_pick(study, storage)
    if recipe is not None:
        raise ConfigError(f"--from-study {study} builds the pick's recipe ({pick.recipe}); "
                          f"drop --recipe")
    if target not in ("local", pick.target):
        raise ConfigError(f"--from-study {study}: the study searched target {pick.target!r}, "
                          f"not {target!r}; drop --target")
    console.print(f"study {study}: building trial {pick.trial} ({pick.recipe})",
                  highlight=False, markup=False)
    sets = [f"{key}={toml_text(value)}" for key, value in pick.overrides.items()]
    return (pick.target, pick.recipe, backend or pick.backend,
            pick.budget if budget is None else budget, [*sets, *(set_ or [])])


def _progress(bar, task, message: str) -> None:
    """Step outcomes (ran, cache hit, budget spent) stay on screen; the rest is the spinner."""
    if message.startswith("pass "):
        bar.console.print(message, highlight=False, markup=False)
    bar.update(task, description=message)


def _rows_table(rows, title: str) -> Table:
    from edgec.report import TABLE_COLUMNS, table_cells

    table = Table(title=title)
    for column in TABLE_COLUMNS:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*table_cells(row))
    return table


@app.command()
def targets():
    """List the built-in targets and the int8 kernels of their CPUs."""
    from edgec.cpu import target_cpu
    from edgec.targets import load_target, target_paths

    table = Table(title="targets")
    for column in ("name", "isa", "cpu", "int8 kernels"):  # what you type is never cut
        table.add_column(column, no_wrap=True)
    for column in ("precisions", "backends"):
        table.add_column(column, overflow="fold")
    described = []
    try:
        for name in target_paths():
            t = load_target(name)
            cpu = target_cpu(t)
            table.add_row(name, t.isa, cpu.model if t.cpu == "native" else t.cpu, cpu.int8_path,
                          ", ".join(t.precisions), ", ".join(t.backends))
            also = f" (also {', '.join(t.aliases)})" if t.aliases else ""
            described.append(f"{name}{also}: {t.description}")
    except EdgecError as exc:
        fail(exc)
    console.print(table)
    for line in described:
        console.print(line, highlight=False, markup=False)


@app.command()
def recipes():
    """List the built-in recipes (usable by name: --recipe int8)."""
    from edgec.config import load_toml
    from edgec.recipes import recipe_paths

    table = Table(title="recipes")
    for column in ("name", "passes", "description"):
        table.add_column(column, overflow="fold")
    for name, path in recipe_paths().items():
        raw = load_toml(path)
        table.add_row(name, " → ".join(s.get("pass", "?") for s in raw.get("step", [])),
                      raw.get("description", ""))
    console.print(table)


@app.command()
def check(
    model: Path = typer.Argument(..., help="model TOML (factory/checkpoint/input)"),
    target: str = typer.Option("local", help="target name (see `edgec targets`) or TOML path"),
):
    """Lowering preflight: which ops each backend of TARGET supports, falls back on or rejects."""
    from edgec.check import check_model, render_check

    try:
        report = check_model(model, target)
    except EdgecError as exc:
        fail(exc)
    console.print(render_check(report), highlight=False, markup=False, soft_wrap=True)


app.add_typer(devices_app, name="devices")
app.add_typer(cache_app, name="cache")
app.add_typer(latency_app, name="latency")
app.add_typer(ci_app, name="ci")
app.command("profile")(profile)
app.command("space")(space)
app.command("search")(search)
app.command("search-worker")(search_worker)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
