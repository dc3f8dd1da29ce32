"""Backend ``tensorrt`` (Jetson): ONNX variants, an on-board TensorRT build step, TVM CUDA kernels.

TensorRT engines are specific to the GPU, TensorRT version and clocks, so they cannot be built
here: the artifact carries the ONNX model as an int8 QDQ variant (explicit quantisation, from the
int8 recipe) and an fp16 variant, plus ``build_engine.sh`` whose trtexec command lines (also in
the manifest, quoted with shlex) make ``model.<variant>.plan`` on the board before it is first
profiled. Alongside, the TVM CUDA module is compiled ahead of time for the target's GPU
architecture (sm_87 for Orin) and its kernels are turned into a fatbin with nvcc when nvcc is
installed. The runner executes the ONNX variant with ONNX Runtime (TensorRT / CUDA providers
where the board has them, CPU elsewhere), so the artifact is also evaluated on the build host.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edgec.artifact import Artifact
from edgec.errors import CompileError
from edgec.onnx_export import INPUT_NAME

TRTEXEC = "/usr/src/tensorrt/bin/trtexec"


def strip_qdq(model):
    """The float model behind a QDQ model: weights dequantised, each activation Q→DQ pair
    replaced by a Clip to the range it could represent (the quantiser folds ReLUs into that
    range, so dropping the pair would drop the ReLU)."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}
    keep, new_inits = [], []
    for node in graph.node:
        source = producers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            new_inits.append(numpy_helper.from_array(_dequantize(node, inits), node.output[0]))
        elif source is not None and source.op_type == "QuantizeLinear":
            low, high = _representable_range(source, inits)
            names = (f"{node.output[0]}_min", f"{node.output[0]}_max")
            new_inits += [numpy_helper.from_array(np.array(v, np.float32), n)
                          for v, n in zip((low, high), names, strict=True)]
            keep.append(onnx.helper.make_node("Clip", [source.input[0], *names], [node.output[0]]))
        elif node.op_type != "QuantizeLinear":
            keep.append(node)
    used = {name for node in keep for name in node.input}
    del graph.node[:]
    graph.node.extend(keep)
    old = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(old + [t for t in new_inits if t.name in used])
    return model


def _representable_range(quantize, inits) -> tuple[float, float]:
    from onnx import numpy_helper

    scale = float(numpy_helper.to_array(inits[quantize.input[1]]))
    zero = numpy_helper.to_array(inits[quantize.input[2]])
    info = np.iinfo(zero.dtype)
    return (info.min - int(zero)) * scale, (info.max - int(zero)) * scale


def _dequantize(node, inits) -> np.ndarray:
    from onnx import numpy_helper

    q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
    scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    zero = (numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
            if len(node.input) > 2 and node.input[2] else np.zeros_like(scale))
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (q - zero) * scale


def fp16_variant(float_model):
    """fp16 weights and activations, fp32 input/output (what trtexec --fp16 builds from)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(float_model, keep_io_types=True)


def trtexec_command(onnx_file: str, plan_file: str, variant: str, input_shape: tuple[int, ...],
                    trtexec: str = TRTEXEC, workspace_mb: int = 1024) -> list[str]:
    """The trtexec argv that builds ``plan_file`` on the board (batch 1 optimised, up to 64)."""
    dims = "x".join(str(d) for d in input_shape)
    shapes = {k: f"{INPUT_NAME}:{b}x{dims}" for k, b in (("min", 1), ("opt", 1), ("max", 64))}
    precision = ["--fp16", "--int8"] if variant == "int8" else ["--fp16"]
    return [trtexec, f"--onnx={onnx_file}", f"--saveEngine={plan_file}", *precision,
            f"--minShapes={shapes['min']}", f"--optShapes={shapes['opt']}",
            f"--maxShapes={shapes['max']}", f"--memPoolSize=workspace:{workspace_mb}M",
            "--skipInference"]


def build_script(commands: dict[str, list[str]]) -> str:
    """build_engine.sh: run from the artifact directory; skips engines that already exist."""
    lines = ["#!/bin/sh", "# Build the TensorRT engines on the board (engines are device-specific).",
             'set -eu', 'cd "$(dirname "$0")"']
    for plan, argv in commands.items():
        lines.append(f"[ -f {shlex.quote(plan)} ] || {shlex.join(argv)}")
    return "\n".join(lines) + "\n"


class TensorRTBackend:
    """Jetson artifact: ONNX int8/fp16 variants + trtexec build step + TVM CUDA module."""

    name = "tensorrt"
    consumes = "onnx"

    def supports(self, target) -> str | None:
        return None if "fp16" in target.precisions else f"target {target.name!r} has no fp16"

    def accepts(self, artifact: Artifact) -> str | None:
        return None

    def versions(self) -> dict[str, str]:
        import onnx
        import onnxruntime

        versions = {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
        nvcc = shutil.which("nvcc")
        if nvcc:
            versions["nvcc"] = nvcc_version(nvcc)
        try:
            import tvm

            versions["tvm"] = tvm.__version__
        except ImportError:
            pass
        return versions

    def compile(self, artifact: Artifact, target, out_dir: Path) -> dict[str, Any]:
        """Write the variants, build_engine.sh and the TVM CUDA module; return the entry."""
        import onnx

        from edgec.backends.tvm import is_quantized

        if artifact.stage != "onnx":
            raise CompileError(f"backend tensorrt needs an ONNX model, got {artifact.stage!r}; "
                               f"end the recipe with 'export' (and 'quantize' for int8)")
        model = onnx.load(str(artifact.payload))
        shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])
        variants = {}
        if is_quantized(artifact.payload):
            shutil.copyfile(artifact.payload, out_dir / "model.int8.onnx")
            variants["int8"] = "model.int8.onnx"
            model = strip_qdq(model)
        onnx.save(fp16_variant(model), str(out_dir / "model.fp16.onnx"))
        variants["fp16"] = "model.fp16.onnx"
        options = target.options
        commands = {f"model.{v}.plan": trtexec_command(
            f, f"model.{v}.plan", v, shape, options.get("trtexec", TRTEXEC),
            int(options.get("workspace_mb", 1024))) for v, f in variants.items()}
        (out_dir / "build_engine.sh").write_text(build_script(commands))
        (out_dir / "build_engine.sh").chmod(0o755)
        files = [variants.get("int8", "model.fp16.onnx"), *[f for f in variants.values()
                 if f != variants.get("int8", "model.fp16.onnx")], "build_engine.sh"]
        cuda = compile_tvm_cuda(artifact, target, out_dir)
        files += cuda.get("files", [])
        return {"backend": self.name, "files": files, "variants": variants,
                "on_board_build": {"when": "before the first profile on the board",
                                   "script": "build_engine.sh", "creates": sorted(commands),
                                   "commands": {plan: shlex.join(argv)
                                                for plan, argv in commands.items()}},
                "tvm_cuda": cuda, "runs_on_host": True}


def compile_tvm_cuda(artifact: Artifact, target, out_dir: Path) -> dict[str, Any]:
    """TVM CUDA module (aarch64 host code + kernels) and an nvcc fatbin for the GPU's arch.

    The PyPI TVM wheel has no CUDA runtime, so its CUDA module carries CUDA C; nvcc turns that
    into machine code for ``target.tvm_target['arch']`` here, ahead of time.
    """
    from edgec.backends.tvm import compile_relax, export, relax_module, static_onnx, tvm_target

    try:
        import tvm  # noqa: F401
    except ImportError:
        return {"skipped": "apache-tvm is not installed (pip install 'edgec[tvm]')"}
    cc = target.cross_compiler
    if cc and not target.runs_on_host and shutil.which(cc) is None:
        return {"skipped": f"cross compiler {cc!r} is not installed (on Debian: apt-get install "
                           f"g++-aarch64-linux-gnu)"}
    source = artifact.payload
    if _is_int8(artifact):
        source = out_dir / ".float.onnx"
        import onnx

        onnx.save(strip_qdq(onnx.load(str(artifact.payload))), str(source))
    try:
        onnx_bytes = static_onnx(source)
    finally:
        if source != artifact.payload:
            Path(source).unlink()
    cuda_target = tvm_target(target)
    executable, _ = compile_relax(relax_module(onnx_bytes), cuda_target, 0, onnx_bytes)
    export(executable, out_dir / "model_cuda.so", target)
    arch = str(cuda_target.attrs["arch"])
    result = {"files": ["model_cuda.so"], "arch": arch, "batch": 1}
    code = cuda_source(executable)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        result["fatbin"] = "skipped: nvcc not installed"
        return result
    from tvm.support import nvcc as tvm_nvcc

    try:
        with cuda_target:  # nvcc's wrapper reads the compute version from the current target
            binary = tvm_nvcc.compile_cuda(code, target_format="fatbin", arch=arch,
                                           compiler="nvcc")
    except Exception as exc:
        raise CompileError(f"nvcc could not compile the TVM CUDA kernels for {arch}: {exc}") from exc
    fatbin = f"kernels_{arch}.fatbin"
    (out_dir / fatbin).write_bytes(bytes(binary))
    result["files"].append(fatbin)
    result["fatbin"] = fatbin
    return result


def _is_int8(artifact: Artifact) -> bool:
    from edgec.backends.tvm import is_quantized

    return is_quantized(artifact.payload)


def cuda_source(executable) -> str:
    """The CUDA C of the kernels inside a TVM executable (the module of kind 'cuda')."""
    stack = [executable.mod]
    while stack:
        module = stack.pop()
        if module.kind == "cuda":
            return module.inspect_source("")
        stack.extend(module.imports)
    raise CompileError("the TVM executable holds no CUDA module; is tvm_target's kind 'cuda'?")


def nvcc_version(nvcc: str) -> str:
    import subprocess

    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1] if out.strip() else "unknown"
