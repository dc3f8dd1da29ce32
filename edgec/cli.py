"""The ``edgec`` command line."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from edgec.errors import EdgecError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Compile a PyTorch model into a measured artifact for an edge device.")
console = Console()


def _fail(exc: EdgecError) -> None:
    console.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}", highlight=False)
    raise typer.Exit(2)


@app.command()
def build(
    model: Path = typer.Argument(..., help="model TOML (factory/checkpoint/input/data)"),
    target: str = typer.Option("local", help="target name (see `edgec targets`) or TOML path"),
    recipe: Path = typer.Option(None, help="pass recipe TOML (default: passes/int8.toml)"),
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
):
    """Run the recipe's passes, compile for TARGET, evaluate and profile; print the table."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from edgec.build import BuildRequest
    from edgec.build import build as run_build
    from edgec.measure import MeasureSpec

    try:
        request = BuildRequest(model, target, recipe, data, out,
                               MeasureSpec(repeat=repeat, min_time_s=min_time, threads=threads),
                               profile, device=device, eval_count=eval_count, backend=backend,
                               tune=tune)
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("building", total=None)
            result = run_build(request, lambda message: bar.update(task, description=message))
    except EdgecError as exc:
        _fail(exc)
    from edgec.build import report_notes

    console.print(_rows_table(result.rows, f"{result.manifest['name']} → {target}"))
    for line in report_notes(result.manifest):
        console.print(line, highlight=False, markup=False)
    console.print(f"artifact: {result.directory}")


def _rows_table(rows, title: str) -> Table:
    from edgec.build import TABLE_COLUMNS, table_cells

    table = Table(title=title)
    for column in TABLE_COLUMNS:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*table_cells(row))
    return table


@app.command()
def targets():
    """List the built-in targets."""
    from edgec.cpu import target_cpu
    from edgec.targets import load_target, target_paths

    table = Table(title="targets")
    for column in ("name", "isa", "cpu", "int8 kernels", "precisions", "backends", "description"):
        table.add_column(column)
    try:
        for name in target_paths():
            t = load_target(name)
            cpu = target_cpu(t)
            table.add_row(name, t.isa, cpu.model if t.cpu == "native" else t.cpu, cpu.int8_path,
                          ",".join(t.precisions), ",".join(t.backends), t.description)
    except EdgecError as exc:
        _fail(exc)
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
        _fail(exc)
    console.print(render_check(report), highlight=False, markup=False, soft_wrap=True)


from edgec.cli_devices import devices_app, profile  # noqa: E402  (they reuse _fail above)

app.add_typer(devices_app, name="devices")
app.command("profile")(profile)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
