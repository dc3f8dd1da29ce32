"""Where built-in targets/ and passes/ live: in the source tree or in the installed wheel."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def builtin_dir(kind: str) -> Path:
    """The folder of built-in ``targets`` or ``passes`` TOMLs."""
    installed = _PACKAGE / "_builtin" / kind
    return installed if installed.is_dir() else _PACKAGE.parent / kind
