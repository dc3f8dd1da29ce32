"""The one error family edgec raises. Every message names the offending value and the fix."""

from __future__ import annotations


class EdgecError(Exception):
    """Base class of every error edgec raises on purpose."""


class ConfigError(EdgecError):
    """A TOML file, a recipe, a target or a command-line value is invalid."""


class ModelError(EdgecError):
    """The model cannot be loaded, does not fit its checkpoint or its input spec."""


class DataError(EdgecError):
    """A dataset file or split is missing, malformed or overlapping."""


class PassError(EdgecError):
    """A compiler pass failed; the message names the passes already run."""


class BudgetError(PassError):
    """An accuracy or size budget cannot be met; the message names the best achievable value."""


class CompileError(EdgecError):
    """A backend could not compile the artifact for the target."""


class MissingExtraError(EdgecError):
    """An optional dependency is not installed; the message names the pip command."""


class DeviceError(EdgecError):
    """A device could not run or measure the artifact."""


class ConnectError(DeviceError):
    """The board cannot be reached."""


class AuthError(DeviceError):
    """The board refused our credentials."""


class HostKeyError(DeviceError):
    """The board's host key is unknown or does not match known_hosts."""


class DeviceTimeout(DeviceError):
    """A connection or a command on the board took too long."""


class RemoteCommandError(DeviceError):
    """A command on the board (for example the runner) failed."""


class RemoteDiskFull(DeviceError):
    """The board's work directory has no room for the artifact or the lock."""


class DeviceBusy(DeviceError):
    """Another measurement held the board's lock for longer than we were willing to wait."""


class MeasureError(EdgecError):
    """A measurement is invalid (no samples, bad protocol parameters)."""


class SearchError(EdgecError):
    """A search cannot start or resume (no recipe fits, the study was made with other choices)."""


def require(module: str, extra: str):
    """Import an optional dependency or raise MissingExtraError naming the pip command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"'{module}' is not installed; install it with: pip install 'edgec[{extra}]'"
        ) from exc
