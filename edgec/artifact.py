"""Artifacts: a model at one stage with its lineage, and atomic, content-hashed directories."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgec.errors import EdgecError
from edgec.runner import RUNNER_PATH

STAGES = ("torch", "onnx", "build")


@dataclass(frozen=True)
class LineageStep:
    """One pass applied to an artifact: its name, params and what it reported; ``cache`` says
    whether this build ran it ("run"), took it from the step cache ("hit") or re-ran a pass
    whose output the cache does not keep ("re-run"); it is not part of the artifact's
    identity."""

    pass_name: str
    params: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)
    cache: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"pass": self.pass_name, "params": self.params, "report": self.report}


@dataclass(frozen=True)
class Artifact:
    """A model at one stage.

    ``stage`` is 'torch' (``payload`` is an nn.Module) or 'onnx' (``payload`` is a path to a
    .onnx file). ``extras`` carries stage-specific metadata (e.g. bits per layer) for later passes.
    """

    stage: str
    payload: Any
    lineage: tuple[LineageStep, ...] = ()
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise EdgecError(f"unknown artifact stage {self.stage!r}; known: {STAGES}")

    def derive(self, stage: str, payload: Any, step: LineageStep, **extras) -> Artifact:
        """The artifact a pass produced from this one, lineage extended by ``step``."""
        return replace(self, stage=stage, payload=payload, lineage=(*self.lineage, step),
                       extras={**self.extras, **extras})


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_hash(files: dict[str, str], config: dict[str, Any]) -> str:
    """Hash of the deployable content: file digests plus the configuration that made them."""
    blob = json.dumps({"files": files, "config": config}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def seal_runner_bundle(directory: Path, kind: str, meta: dict[str, Any]) -> Path:
    """Finish a directory the runner reads like an artifact (a timing bundle, a measurement
    set): copy ``runner.py`` in and write ``manifest.json`` with every file's digest, ``kind``
    and ``meta``, hashed together, so a board caches the bundle by its content."""
    shutil.copyfile(RUNNER_PATH, directory / "runner.py")
    files = {path.relative_to(directory).as_posix(): sha256_file(path)
             for path in sorted(directory.rglob("*")) if path.is_file()}
    manifest = {"hash": content_hash(files, meta), "kind": kind, "files": files, **meta}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return directory


@contextmanager
def atomic_directory(final: Path):
    """Yield a temporary directory next to ``final``; rename it into place only on success.

    A failure leaves nothing at ``final``. An existing ``final`` (same hash: same content) is
    replaced. The directory gets the mode the user's umask gives new directories (mkdtemp's is
    0o700).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~current_umask())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def current_umask() -> int:
    """The process umask (reading it means setting it; it is put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` under a temporary name in the same folder, renamed into place
    (readers never see half a file); the mode is what the umask gives new files (mkstemp's is
    0o600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise EdgecError(f"{str(directory)!r} is not an edgec artifact (no manifest.json)")
    return json.loads(path.read_text())
