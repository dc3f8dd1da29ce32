"""Backend ``tvm``: ONNX → TVM Relax → the target's pipeline → a shared object for the board.

The backend consumes the export pass's ONNX (not the torch stage) so one recipe serves every
target, and the Jetson backend reuses the same Relax module for its CUDA kernels. Relax's ONNX
frontend rejects the symbolic pads of the dynamic-batch export, so the model is first fixed to
batch 1 and constant-folded by ONNX Runtime's basic (standard-ops-only) optimiser.

The .so holds weights and code; the runner needs only the TVM runtime and numpy on the board.
MetaSchedule tuning (``tune_trials``) measures candidates on this machine, so it is offered only
for targets whose code runs here; records are cached under a key of model, target and budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgec.artifact import Artifact
from edgec.errors import CompileError, ConfigError, require
from edgec.runner import runner

BATCH = 1
EVOLUTIONARY_MIN_TRIALS = 64


def tuning_cache_root() -> Path:
    """Where MetaSchedule records live: $EDGEC_CACHE or ~/.cache/edgec, then tvm-tuning/."""
    base = os.environ.get("EDGEC_CACHE") or Path.home() / ".cache" / "edgec"
    return Path(base) / "tvm-tuning"


def is_quantized(onnx_path: Path) -> bool:
    """Whether the model carries QDQ (int8) nodes."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def static_onnx(onnx_path: Path, batch: int = BATCH) -> bytes:
    """The model with its batch fixed to ``batch`` and shape arithmetic constant-folded."""
    import onnx

    model = onnx.load(str(onnx_path))
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].dim_value = batch
    with tempfile.TemporaryDirectory(prefix="edgec-tvm-") as tmp:
        fixed, folded = Path(tmp) / "fixed.onnx", Path(tmp) / "folded.onnx"
        onnx.save(model, str(fixed))
        runner.ort_session(fixed, optimization="basic", optimized_path=folded)
        return folded.read_bytes()


def relax_module(onnx_bytes: bytes):
    """Import a static ONNX model into a Relax IRModule with weights bound as constants."""
    import onnx

    require("tvm", "tvm")
    from tvm.relax.frontend.onnx import from_onnx

    try:
        return from_onnx(onnx.load_from_string(onnx_bytes), keep_params_in_input=False)
    except Exception as exc:
        raise CompileError(f"TVM's ONNX frontend cannot import the model: "
                           f"{type(exc).__name__}: {exc}; run `edgec check` to see the ops") from exc


def tvm_target(target):
    """The target's ``tvm_target`` table as a tvm.target.Target."""
    tvm = require("tvm", "tvm")
    spec = dict(target.tvm_target)
    if spec.get("kind") == "llvm":
        spec.setdefault("num-cores", target.cores)  # MetaSchedule refuses a CPU without it
    try:
        return tvm.target.Target(spec)
    except Exception as exc:
        raise ConfigError(f"target {target.name!r}: key 'tvm_target' {target.tvm_target} is not a "
                          f"valid TVM target: {exc}") from exc


def tuning_key(onnx_bytes: bytes, tvm_target_json: dict, trials: int) -> str:
    """Content hash naming a tuning cache entry: the same model, target and budget reuse it."""
    import tvm

    blob = json.dumps({"target": tvm_target_json, "trials": trials, "tvm": tvm.__version__},
                      sort_keys=True, default=str).encode()
    return hashlib.sha256(hashlib.sha256(onnx_bytes).digest() + blob).hexdigest()


def tune(mod, target, trials: int, work_dir: Path) -> None:
    """MetaSchedule-tune the fused TIR kernels of ``mod`` with at most ``trials`` candidates."""
    require("xgboost", "tvm")
    from tvm.s_tir import meta_schedule as ms

    work_dir.mkdir(parents=True, exist_ok=True)
    # evolutionary search samples thousands of candidates per task before measuring any: worth it
    # for real budgets, minutes of overhead for a handful of trials, where random replay suffices
    strategy = "evolutionary" if trials >= EVOLUTIONARY_MIN_TRIALS else "replay-trace"
    ms.relax_integration.tune_relax(
        mod, {}, target, str(work_dir), max_trials_global=trials,
        num_trials_per_iter=min(64, trials), strategy=strategy,
        # the builder compiles candidates in subprocesses; on a loaded 2-core VM the default
        # 30 s timeout fails most of them
        builder=ms.builder.LocalBuilder(timeout_sec=300), seed=0)


def compile_relax(mod, target, trials: int, onnx_bytes: bytes, progress=lambda m: None):
    """Relax module → VM executable: untuned (zero pipeline; default GPU schedules) or tuned.

    Tuning runs on the zero pipeline's fused kernels and the same pipeline applies the records,
    so workloads match. Returns the executable and the tuning record ({} when untuned).
    """
    tvm = require("tvm", "tvm")
    from tvm import relax

    if target.kind.name == "cuda":
        return tvm.compile(mod, target=target), {}
    with target:
        fused = relax.get_pipeline("zero")(mod)
    if trials <= 0:
        return tvm.compile(fused, target=target), {}
    from tvm.s_tir import meta_schedule as ms

    key = tuning_key(onnx_bytes, dict(target.export()), trials)
    work_dir = tuning_cache_root() / key
    reused = (work_dir / "done").is_file()
    if not reused:
        progress(f"tvm: MetaSchedule tuning, {trials} trials")
        shutil.rmtree(work_dir, ignore_errors=True)
        tune(fused, target, trials, work_dir)
        (work_dir / "done").write_text("ok\n")
    database = ms.database.JSONDatabase(work_dir=str(work_dir))
    with target, database:
        tuned = relax.get_pipeline("zero")(mod)
    return tvm.compile(tuned, target=target), {"trials": trials, "key": key, "reused": reused,
                                               "records": len(database.get_all_tuning_records())}


class TvmBackend:
    """ONNX → Relax → ``tvm.compile`` → ``model.so`` (cross-linked for the target's ISA)."""

    name = "tvm"
    consumes = "onnx"

    def __init__(self, tune_trials: int = 0):
        if tune_trials < 0:
            raise ConfigError(f"--tune {tune_trials}: give a trial budget >= 0")
        self.tune_trials = tune_trials

    def supports(self, target) -> str | None:
        if not target.tvm_target:
            return f"target {target.name!r} has no tvm_target table"
        if not target.runs_on_host and not target.cross_compiler:
            return f"target {target.name!r} is not this machine's ISA and names no cross_compiler"
        return None

    def accepts(self, artifact: Artifact) -> str | None:
        """TVM compiles float models; int8 QDQ models go to a backend with int8 kernels."""
        if artifact.extras.get("precision") == "int8" or is_quantized(artifact.payload):
            return "int8 QDQ models run as float fake-quantisation in TVM; use onnxruntime"
        return None

    def versions(self) -> dict[str, str]:
        tvm = require("tvm", "tvm")
        import tvm_ffi

        return {"tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__}

    def compile(self, artifact: Artifact, target, out_dir: Path) -> dict[str, Any]:
        """Compile into ``out_dir/model.so``; return the manifest's ``entry``."""
        if artifact.stage != "onnx":
            raise CompileError(f"backend tvm needs the export pass's ONNX model, got stage "
                               f"{artifact.stage!r}; end the recipe with 'export'")
        if self.tune_trials and not target.runs_on_host:
            raise ConfigError(f"--tune {self.tune_trials}: MetaSchedule measures candidates on the "
                              f"machine that runs them; target {target.name!r} ({target.isa}) is "
                              f"not this machine, so build untuned or tune on the board")
        onnx_bytes = static_onnx(artifact.payload)
        target_tvm = tvm_target(target)
        executable, tuning = compile_relax(relax_module(onnx_bytes), target_tvm, self.tune_trials,
                                           onnx_bytes)
        export(executable, out_dir / "model.so", target)
        return {"backend": self.name, "files": ["model.so"], "batch": BATCH,
                "tvm_target": json.loads(json.dumps(dict(target_tvm.export()), default=str)),
                "device": "cuda" if target_tvm.kind.name == "cuda" else "cpu",
                "runs_on_host": target.runs_on_host, "tuning": tuning}


def export(executable, path: Path, target) -> None:
    """Link the executable into a shared object, with the cross compiler for another ISA."""
    cc = None if target.runs_on_host else target.cross_compiler
    if cc and shutil.which(cc) is None:
        raise CompileError(f"cross compiler {cc!r} for target {target.name!r} is not installed; "
                           f"on Debian: apt-get install g++-aarch64-linux-gnu")
    try:
        executable.export_library(str(path), cc=cc) if cc else executable.export_library(str(path))
    except Exception as exc:
        raise CompileError(f"linking {path.name} for {target.name!r} failed: {exc}") from exc
