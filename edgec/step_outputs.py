"""A pipeline step's output in the step cache: its key, and how it is stored and restored.

The key of step *i* is the digest of the key of its input (step *i-1*, or the source model's
content), the pass and its params, the target fields and CPU the pass reads, library versions,
the seed, the data, and the accuracy ledger's state (see :func:`step_key`). Keys chain, so a hit
at step *i* stands for the whole prefix, and the prefix's outputs need not be loaded.

What is stored depends on the output: an ONNX file as is; a torch model whose pass declares
``cached_torch = "widths"`` (structured pruning) as widths and weights
(:mod:`edgec.module_state`); any other torch model (a rewritten FX graph) is not stored: its
entry keeps the lineage, and when a later step needs it, the pass is re-run on its restored
input (these passes take seconds).
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgec.artifact import Artifact, LineageStep, sha256_file
from edgec.cache import Cache, Entry, dataset_identity, digest, library_versions, module_identity

KIND = "steps"


def content_key(artifact: Artifact) -> str:
    """What an artifact computes: a torch module's structure and weights or an ONNX file's
    bytes, and its extras (e.g. a cascade's thresholds); not how it was made."""
    content = module_identity(artifact.payload) if artifact.stage == "torch" \
        else sha256_file(Path(artifact.payload))
    return digest({"stage": artifact.stage, "content": content, "extras": artifact.extras})


def source_key(artifact: Artifact) -> str:
    """The pipeline's input: :func:`content_key` plus its lineage."""
    return digest({"content": content_key(artifact),
                   "lineage": [step.to_json() for step in artifact.lineage]})


def step_key(input_key: str, step, ctx) -> str:
    """The key of ``step`` applied to the input keyed ``input_key`` in ``ctx``."""
    return digest({
        "input": input_key, "pass": step.pass_.name, "params": asdict(step.params),
        "context": _context_read(step.pass_, ctx), "versions": library_versions(),
        "seed": ctx.seed, "data": dataset_identity(ctx.calibration),  # passes never read the
        # evaluation split (Context.evaluation is for reporting), so it is not keyed
        "ledger": ctx.ledger.key() if ctx.ledger is not None else None,
    })


def _context_read(pass_, ctx) -> dict[str, Any]:
    """The target fields a pass declares it reads (``target_fields``); a pass that declares
    none is keyed on the whole target, the CPU, the backend and the measuring device."""
    fields = getattr(pass_, "target_fields", None)
    if fields is not None:
        return {"target": {name: getattr(ctx.target, name, None) for name in fields}}
    device = getattr(ctx, "device", None)
    return {"target": ctx.target.to_json(), "cpu": ctx.cpu.to_json() if ctx.cpu else None,
            "backend": ctx.backend, "device": getattr(device, "name", None)}


def store_output(cache: Cache, key: str, pass_, artifact: Artifact, seconds: float,
                 ledger_spends: list[dict[str, Any]]) -> None:
    """Store what ``pass_`` produced (see the module docstring); extras that are not JSON
    (a live object) leave the step uncached."""
    try:
        extras = json.loads(json.dumps(artifact.extras))
    except (TypeError, ValueError):
        return
    meta = {"stage": artifact.stage, "pass": pass_.name, "seconds": round(seconds, 3),
            "lineage": [step.to_json() for step in artifact.lineage], "extras": extras,
            "ledger": ledger_spends}
    if artifact.stage == "onnx":
        cache.store(KIND, key, {**meta, "payload": "onnx"}, {"model.onnx": Path(artifact.payload)})
    elif getattr(pass_, "cached_torch", None) == "widths":
        from edgec.module_state import save_widths_and_weights

        with tempfile.TemporaryDirectory(prefix="edgec-cache-") as scratch:
            path = Path(scratch) / "model.pt"
            save_widths_and_weights(artifact.payload, path)
            cache.store(KIND, key, {**meta, "payload": "widths"}, {"model.pt": path})
    else:
        cache.store(KIND, key, {**meta, "payload": "none"})


def restored_artifact(entry: Entry, base: Artifact | None, workdir: Path) -> Artifact:
    """The output an entry holds: its ONNX file copied into ``workdir``, or ``base`` (the
    restored input, a torch model) resized and loaded with the entry's weights."""
    meta = entry.meta
    lineage = tuple(LineageStep(s["pass"], s["params"], s.get("report", {}), "hit")
                    for s in meta["lineage"])
    if meta["payload"] == "onnx":
        path = Path(tempfile.mkdtemp(prefix="cached-", dir=workdir)) / "model.onnx"
        shutil.copyfile(entry.file("model.onnx"), path)
        payload = path
    else:
        from edgec.module_state import load_widths_and_weights

        payload = load_widths_and_weights(copy.deepcopy(base.payload), entry.file("model.pt"))
    return Artifact(meta["stage"], payload, lineage, meta["extras"])


def needs_input(entry: Entry) -> bool:
    """Whether restoring the entry's output needs its input restored first."""
    return entry.meta["payload"] != "onnx"
