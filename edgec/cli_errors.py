"""How every ``edgec`` command reports an EdgecError: one line on stderr, exit status 2."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from edgec.errors import EdgecError

errors = Console(stderr=True)


def print_error(exc: EdgecError) -> None:
    """``error: ClassName: message`` on stderr (the message's brackets are not markup)."""
    errors.print(f"[bold red]error:[/] {type(exc).__name__}: {escape(str(exc))}", highlight=False,
                 soft_wrap=True)


def fail(exc: EdgecError) -> None:
    """Report ``exc`` and end the command with exit status 2."""
    print_error(exc)
    raise typer.Exit(2) from None
