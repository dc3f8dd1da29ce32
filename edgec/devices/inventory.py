"""The board inventory: ``devices/<name>.toml`` → frozen DeviceConfig. Never a secret inside.

A device file names where the board is and how to log in (a key *path*, never key material or a
password), where its host key is recorded (known_hosts) and where edgec may keep its cache.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

from edgec.config import from_dict, load_toml
from edgec.errors import ConfigError
from edgec.targets import load_target

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a device name: a safe file name
USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$")
RESERVED = ("local",)
EXAMPLE = "example"  # devices/example.toml: the documented template, never a board
SECRET_KEYS = ("password", "passphrase", "private_key", "key_data", "secret", "token")
# a pasted line of key material: long base64, or the base64 of "openssh-key-v1"
KEY_MATERIAL = re.compile(r"^(?!/)[A-Za-z0-9+/]{60,}={0,2}$|b3BlbnNzaC1rZXktdjE")
PUBLIC_KEY_TEXT = re.compile(r"^(ssh-|ecdsa-|sk-)\S+\s+AAAA")
DEFAULT_LOCK = "/tmp/edgec-board.lock"


@dataclass(frozen=True)
class DeviceConfig:
    """One board reachable over SSH. Paths are expanded and absolute once loaded."""

    name: str
    target: str
    host: str
    port: int = 22
    user: str = ""  # empty: the local user name
    key: str = ""  # path to the private key; empty: the SSH agent
    known_hosts: str = "~/.ssh/known_hosts"
    workdir: str = ".cache/edgec"  # on the board; relative to the login's home = per-user cache
    # the board lock (flock), shared by every user and device entry of the board: keep the default
    # unless the board's users do not share /tmp
    lock_path: str = DEFAULT_LOCK
    python: str = "python3"  # interpreter on the board that has numpy and the runtime
    tags: tuple[str, ...] = ()
    connect_timeout_s: float = 10.0
    command_timeout_s: float = 600.0
    keepalive_s: int = 15
    retries: int = 2  # extra attempts after a transient fault (connection refused/lost)
    retry_backoff_s: float = 1.0
    lock_wait_s: float = 900.0  # how long to queue behind another measurement

    def __post_init__(self):
        check_name(self.name)
        if not self.host or any(c.isspace() for c in self.host) or self.host.startswith("-"):
            raise ValueError(f"host {self.host!r} is not a host name or address")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} must be in 1..65535")
        if self.user and not USER_RE.match(self.user):
            raise ValueError(f"user {self.user!r} is not a login name (letters, digits, '_', '.', "
                             f"'-'; not starting with '-'); fix `user`")
        check_local_path("key", self.key)
        check_local_path("known_hosts", self.known_hosts)
        check_remote_dir(self.workdir)
        check_lock_path(self.lock_path)
        if self.connect_timeout_s <= 0 or self.command_timeout_s <= 0 or self.lock_wait_s < 0:
            raise ValueError("timeouts must be positive")
        if self.retries < 0 or self.retry_backoff_s < 0 or self.keepalive_s < 0:
            raise ValueError("retries, retry_backoff_s and keepalive_s must be >= 0")

    @property
    def login(self) -> str:
        return f"{self.user or '?'}@{self.host}:{self.port}"

    def to_toml(self) -> str:
        """The TOML text of this device, only the fields that differ from the defaults."""
        defaults = {f.name: f.default for f in fields(self)}
        lines = ["# edgec device (no secrets here: `key` is a path). See devices/example.toml."]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("name", "target", "host") or value != defaults[f.name]:
                lines.append(f"{f.name} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


def check_name(name: str) -> str:
    """A device name is a safe file name and not a reserved one."""
    if not NAME_RE.match(name or ""):
        raise ValueError(f"device name {name!r} must match {NAME_RE.pattern}")
    if name in RESERVED:
        raise ValueError(f"device name {name!r} is reserved for this machine; pick another")
    return name


def check_local_path(label: str, value: str) -> str:
    """A path on this machine (``key``, ``known_hosts``), never pasted key material."""
    if ("PRIVATE KEY" in value or "\n" in value or "\r" in value or KEY_MATERIAL.search(value)
            or PUBLIC_KEY_TEXT.match(value)):
        raise ValueError(f"{label} must be a file path, not key material (edgec never stores "
                         f"secrets); give the path of the key file, e.g. ~/.ssh/id_ed25519")
    return value


def check_remote_dir(path: str) -> str:
    """A board directory below the login's home or the root, never '/' itself: no '..', no part
    that starts with '-' or '~' (after a leading '~/'), no control characters."""
    if path in ("~", "~/"):
        return path
    parts = [p for p in (path[2:] if path.startswith("~/") else path).split("/") if p]
    if (not parts or ".." in parts or any(p.startswith(("-", "~")) for p in parts)
            or any(ord(c) < 32 for c in path)):
        raise ValueError(f"workdir {path!r} must be a plain directory path (not '/', no '..', no "
                         f"part starting with '-' or '~'), e.g. '.cache/edgec'")
    return path


def check_lock_path(path: str) -> str:
    """The board lock file: an absolute path of a file, no '..', no control characters."""
    parts = path.split("/")
    if (not path.startswith("/") or path.endswith("/") or ".." in parts
            or any(ord(c) < 32 for c in path)):
        raise ValueError(f"lock_path {path!r} must be an absolute file path without '..', the "
                         f"same for every device entry of the board (default {DEFAULT_LOCK})")
    return path


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string


def devices_dir(directory: str | Path | None = None) -> Path:
    """The inventory folder: the argument, ``$EDGEC_DEVICES_DIR`` or ``./devices``."""
    return Path(directory or os.environ.get("EDGEC_DEVICES_DIR") or "devices")


def device_paths(directory: str | Path | None = None) -> dict[str, Path]:
    folder = devices_dir(directory)
    return {p.stem: p for p in sorted(folder.glob("*.toml")) if p.stem != EXAMPLE}


def parse_device(path: Path) -> DeviceConfig:
    """Read one device TOML; secrets, unknown keys and bad values are ConfigErrors."""
    raw = load_toml(path)
    for key in raw:
        if key.lower() in SECRET_KEYS:
            raise ConfigError(f"{path}: key {key!r} is not allowed; edgec never stores passwords "
                              f"or key material. Use key = \"~/.ssh/id_ed25519\" (a path) and "
                              f"key-based login")
    config = from_dict(DeviceConfig, {"name": path.stem, **raw}, str(path))
    if config.name != path.stem:
        raise ConfigError(f"{path}: name {config.name!r} differs from the file name; "
                          f"rename the file to {config.name}.toml")
    try:
        load_target(config.target)
    except ConfigError as exc:
        raise ConfigError(f"{path}: key 'target': {exc}") from exc
    return replace(config, key=_resolve(config.key, path.parent),
                   known_hosts=_resolve(config.known_hosts, path.parent))


def _resolve(value: str, root: Path) -> str:
    if not value:
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (root / path).resolve())


def load_device(name: str, directory: str | Path | None = None) -> DeviceConfig:
    """A device by inventory name (or a .toml path); an unknown name lists the known ones."""
    if name.endswith(".toml"):
        return parse_device(Path(name))
    known = device_paths(directory)
    if name not in known:
        listed = ", ".join(known) or "none yet"
        raise ConfigError(f"unknown device {name!r} in {devices_dir(directory)}/ (known: "
                          f"{listed}); add it with `edgec devices add {name} --host ... "
                          f"--target ...`")
    return parse_device(known[name])


def load_inventory(directory: str | Path | None = None,
                   ) -> tuple[list[DeviceConfig], list[ConfigError]]:
    """Every device of the inventory, and an error for each file that is not one (a bad file
    does not hide the good ones)."""
    good, bad = [], []
    for path in device_paths(directory).values():
        try:
            good.append(parse_device(path))
        except ConfigError as exc:
            bad.append(exc)
    return good, bad


def save_device(config: DeviceConfig, directory: str | Path | None = None,
                overwrite: bool = False) -> Path:
    """Write ``devices/<name>.toml`` (atomically); an existing file needs ``overwrite``."""
    check_not_example(config.name)
    folder = devices_dir(directory)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{config.name}.toml"
    if path.exists() and not overwrite:
        raise ConfigError(f"device {config.name!r} already exists ({path}); remove it first "
                          f"with `edgec devices remove {config.name}` or pass --force")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(config.to_toml())
    os.replace(tmp, path)
    return path


def remove_device(name: str, directory: str | Path | None = None) -> Path:
    path = devices_dir(directory) / f"{check_not_example(check_name_or_error(name))}.toml"
    if not path.is_file():
        raise ConfigError(f"no device {name!r} in {path.parent}/; see `edgec devices list`")
    path.unlink()
    return path


def check_not_example(name: str) -> str:
    """``example`` names the shipped template: edgec never writes or removes it."""
    if name == EXAMPLE:
        raise ConfigError(f"devices/{EXAMPLE}.toml is the documented example, not a board, and "
                          f"edgec never writes or removes it; pick another name (or copy it: "
                          f"`cp devices/{EXAMPLE}.toml devices/NAME.toml`)")
    return name


def check_name_or_error(name: str) -> str:
    try:
        return check_name(name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
