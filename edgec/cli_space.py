"""``edgec space RECIPE --target T``: the search space a recipe's passes declare for a target."""

from __future__ import annotations

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgec.cli_errors import fail
from edgec.errors import EdgecError

console = Console()
errors = Console(stderr=True)
COLUMNS = ("pass.param", "kind", "range", "condition", "recipe")


def space(
    recipe: str = typer.Argument(..., help="recipe name (see `edgec recipes`) or TOML path"),
    target: str = typer.Option("local", help="target name (see `edgec targets`) or TOML path"),
):
    """Print the search space of RECIPE for TARGET: every parameter its passes declare a range
    for, the choices the target cannot take removed, narrowed by the recipe's [search] table."""
    from edgec.recipes import load_recipe, recipe_search
    from edgec.space import pipeline_space
    from edgec.targets import load_target

    try:
        pipeline, board = load_recipe(recipe), load_target(target)
        result = pipeline_space(pipeline, board, recipe_search(recipe))
    except EdgecError as exc:
        fail(exc)
    console.print(space_table(result, f"search space of {pipeline.name} for {board.name}"))
    for line in space_notes(result, [step.pass_.name for step in pipeline.steps]):
        console.print(line, highlight=False, markup=False)


def space_table(result, title: str) -> Table:
    """The rows of :meth:`edgec.space.Space.to_table` as a rich table."""
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)  # 80 columns
    for column in COLUMNS:  # names are never cut; choice lists and conditions fold
        folds = column in ("range", "condition")
        table.add_column(column, no_wrap=not folds, overflow="fold", min_width=12 if folds else None)
    for row in result.to_table():
        table.add_row(*(escape(row[column]) for column in COLUMNS))
    return table


def space_notes(result, passes: list[str]) -> list[str]:
    """What the table does not show: passes that take no part, and why."""
    searched = {dim.pass_name for dim in result.dimensions}
    skipped = dict(result.skipped)
    quiet = [name for name in dict.fromkeys(passes) if name not in searched | set(skipped)]
    lines = [f"not searched: {name} ({reason})" for name, reason in skipped.items()]
    if quiet:
        lines.append(f"no declared ranges: {', '.join(quiet)}")
    return lines
