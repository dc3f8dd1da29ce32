"""known_hosts read the way OpenSSH reads it, for one board.

Plain, wildcard (``*``, ``?``, ``!``) and hashed (``|1|``) host patterns; ``@revoked`` keys are
never accepted (for any host); ``@cert-authority`` lines are not supported: a board trusted only
through one is a HostKeyError that says how to record its own key, and they are ignored otherwise.
A line edgec cannot read is skipped with a warning naming it, never a traceback.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from edgec.errors import HostKeyError

log = logging.getLogger(__name__)


@dataclass
class KnownHosts:
    """The keys recorded for one host name, and every revoked key blob."""

    name: str  # as known_hosts writes it: ``host`` or ``[host]:port``
    keys: list[paramiko.PKey] = field(default_factory=list)
    revoked: set[bytes] = field(default_factory=set)
    authority_line: int = 0  # a @cert-authority line for this host (0: none)

    def is_revoked(self, key: paramiko.PKey) -> bool:
        return key.asbytes() in self.revoked


def host_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def matches(patterns: str, name: str) -> bool:
    """OpenSSH host pattern list: any positive match and no negated one; hashed entries too."""
    if patterns.startswith("|1|"):
        return _hashed_matches(patterns, name)
    hit = False
    for pattern in patterns.split(","):
        negated = pattern.startswith("!")
        if _wildcard(pattern.lstrip("!")).fullmatch(name.lower()):
            if negated:
                return False
            hit = True
    return hit


def _wildcard(pattern: str) -> re.Pattern:
    """OpenSSH wildcards: only ``*`` and ``?`` (``[host]:port`` brackets are literal)."""
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower())
    return re.compile("".join(parts))


def _hashed_matches(entry: str, name: str) -> bool:
    try:
        salt = entry.split("|")[2]
        expected = paramiko.HostKeys.hash_host(name, salt)
    except (IndexError, binascii.Error, ValueError):
        return False
    return hmac.compare_digest(expected, entry)


def load(path: Path, host: str, port: int) -> KnownHosts:
    """The entries of ``path`` that concern ``host:port`` (missing file: no entries)."""
    known = KnownHosts(host_name(host, port))
    if not path.is_file():
        return known
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        raise HostKeyError(f"cannot read {path} ({exc.strerror}); fix `known_hosts` in the device "
                           f"file or the file's permissions") from exc
    plain = []
    for number, line in enumerate(lines, 1):
        entry = _parse(line, number, path)
        if entry is None:
            continue
        marker, patterns, key = entry
        if marker == "@revoked":
            known.revoked.add(key.asbytes())
        elif matches(patterns, known.name):
            if marker == "@cert-authority":
                known.authority_line = known.authority_line or number
            else:
                plain.append(key)
    known.keys = [k for k in plain if not known.is_revoked(k)]
    return known


def _parse(line: str, number: int, path: Path) -> tuple[str, str, paramiko.PKey] | None:
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        return None
    marker = fields.pop(0) if fields[0].startswith("@") else ""
    if marker not in ("", "@revoked", "@cert-authority") or len(fields) < 3:
        log.warning("%s line %d: not a known_hosts entry edgec can read; skipped", path, number)
        return None
    patterns, kind, blob = fields[:3]
    try:
        key = paramiko.PKey.from_type_string(kind, base64.b64decode(blob, validate=True))
    except paramiko.UnknownKeyType:
        log.debug("%s line %d: key type %s is not supported; skipped", path, number, kind)
        return None
    except (binascii.Error, ValueError, paramiko.SSHException) as exc:
        log.warning("%s line %d: unreadable %s key (%s); skipped", path, number, kind, exc)
        return None
    return marker, patterns, key


def install(client: paramiko.SSHClient, known: KnownHosts, path: Path, board: str,
            accept_new: bool) -> None:
    """Give ``client`` the board's recorded keys; a board trusted only through a certificate
    authority is refused here, before any connection (unless a new key may be recorded)."""
    if known.authority_line and not known.keys and not accept_new:
        raise HostKeyError(
            f"board {board} ({known.name}) is trusted only through a @cert-authority line "
            f"({path} line {known.authority_line}); edgec verifies plain host keys, not host "
            f"certificates. Check the board's key fingerprint on the board (`ssh-keygen -lf "
            f"/etc/ssh/ssh_host_ed25519_key.pub`), then record it with `edgec devices check "
            f"{board} --accept-new-host-key`")
    keys = client.get_host_keys()
    for key in known.keys:
        keys.add(known.name, key.get_name(), key)
