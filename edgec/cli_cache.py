"""``edgec cache info|clear``: the step, evaluation and measurement cache (edgec.cache)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

cache_app = typer.Typer(no_args_is_help=True,
                        help="The cache of pass outputs, evaluations and measurements.")
console = Console()


@cache_app.command("info")
def info():
    """Where the cache is, and its entries and size per kind."""
    from edgec.cache import Cache

    cache = Cache()
    console.print(f"edgec cache at {cache.root}", highlight=False, markup=False, soft_wrap=True)
    table = Table()
    for column in ("kind", "entries", "size"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    for kind, summary in cache.info().items():
        table.add_row(kind, f"{summary['entries']:,}", f"{summary['bytes'] / 1e6:,.1f} MB")
    console.print(table)


@cache_app.command("clear")
def clear(kind: list[str] = typer.Option(None, help="only this kind (steps, evaluations, "
                                                    "measurements); repeatable")):
    """Remove cached entries (all kinds unless --kind is given)."""
    from edgec.cache import KINDS, Cache
    from edgec.errors import EdgecError

    cache = Cache()
    try:
        removed = cache.clear(tuple(kind) if kind else KINDS)
    except EdgecError as exc:
        console.print(f"error: {exc}", style="red", highlight=False, markup=False)
        raise typer.Exit(1) from None
    console.print(f"removed {removed} entries from {cache.root}", highlight=False)
