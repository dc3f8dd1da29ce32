"""Backend ``hls4ml``: torch model → hls4ml HLS project (fixed point, io_stream) for an FPGA.

The project is what Vivado/Vitis HLS synthesises into a bitstream on a machine that has them.
Here hls4ml's bit-accurate C simulation is compiled with g++ into ``csim.so``, which the runner
calls through ctypes (numpy only), so the fixed-point design is evaluated without the tools.

Fixed-point width: the lineage's weight bits when a quantize step recorded them (``bits``),
else the target's ``options.fixed_width`` (default 24: ResNet-20 agreed on 97 % of images at 16
or 18 bits, 100 % at 24), with ``options.fixed_integer`` integer bits (default 8: ResNet-20's
logits reach ±39); hls4ml then
infers accumulator and result widths per layer ("auto").
Reuse factor, FPGA part, HLS backend, io type and clock come from the target's ``[options]``.
hls4ml reports resources only after HLS synthesis, which needs Vivado/Vitis; the manifest carries
edgec's static estimate (multipliers → DSPs, weight bits → BRAM) and says so.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

from edgec.artifact import Artifact
from edgec.errors import CompileError, require

PROJECT = "edgec_model"
BRAM_18K_BITS = 18 * 1024
CSIM_IMAGES = 200  # ~1.5 s per ResNet-20 image; the local runner times out at 600 s


def fixed_point_type(artifact: Artifact, target) -> str:
    """``ap_fixed<W,I>``: W from the quantize step's bits in the lineage, or the target's default."""
    width = int(target.options.get("fixed_width", 24))
    for step in reversed(artifact.lineage):
        bits = step.report.get("bits", step.params.get("bits"))
        if isinstance(bits, int) and not isinstance(bits, bool):
            width = bits
            break
    integer = min(int(target.options.get("fixed_integer", 8)), width - 2)  # >= 2 fraction bits
    return f"ap_fixed<{width},{integer}>"


class Hls4mlBackend:
    """hls4ml project + its C simulation library; the runner evaluates the simulation."""

    name = "hls4ml"
    consumes = "torch"

    def supports(self, target) -> str | None:
        if "fpga_part" not in target.options:
            return f"target {target.name!r} names no [options] fpga_part"
        if shutil.which("g++") is None:
            return "g++ is not installed (hls4ml's C simulation needs it): apt-get install g++"
        return None

    def versions(self) -> dict[str, str]:
        hls4ml = require("hls4ml", "fpga")
        gxx = subprocess.run(["g++", "-dumpfullversion"], capture_output=True, text=True)
        return {"hls4ml": hls4ml.__version__, "g++": gxx.stdout.strip()}

    def compile(self, artifact: Artifact, target, out_dir: Path) -> dict[str, Any]:
        hls4ml = require("hls4ml", "fpga")
        shape = artifact.extras.get("input_shape")
        if shape is None:
            raise CompileError("the torch model carries no input shape; build it through "
                               "edgec.build")
        options = target.options
        precision = fixed_point_type(artifact, target)
        reuse = int(options.get("reuse_factor", 1))
        backend = options.get("hls_backend", "Vitis")
        project_dir = out_dir / "hls"
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")  # hls4ml prints its topology and g++ progress
                config = hls4ml.utils.config_from_pytorch_model(
                    artifact.payload, tuple(shape), granularity="name", backend=backend,
                    default_precision=precision, default_reuse_factor=reuse)
                model = hls4ml.converters.convert_from_pytorch_model(
                    artifact.payload, output_dir=str(project_dir), project_name=PROJECT,
                    backend=backend, io_type=options.get("io_type", "io_stream"),
                    hls_config=config, part=options["fpga_part"],
                    clock_period=options.get("clock_period_ns", 10))
                model.write()
            _compile_csim(project_dir)
        except CompileError:
            raise
        except Exception as exc:
            raise CompileError(f"hls4ml could not convert or compile the model: "
                               f"{type(exc).__name__}: {exc}; run `edgec check` to see which "
                               f"layers need the hls_rewrite pass") from exc
        library = sorted((project_dir / "firmware").glob(f"{PROJECT}-*.so"))[-1]
        shutil.move(library, out_dir / "csim.so")
        _reproducible_project(project_dir)
        files = sorted(str(p.relative_to(out_dir)) for p in project_dir.rglob("*") if p.is_file())
        return {
            "backend": self.name, "files": ["csim.so", *files], "library": "csim.so",
            "function": f"{PROJECT}_float", "input_layout": "NCHW",
            "input_shape": list(shape), "output_size": _output_size(artifact, shape),
            "hls_backend": backend, "io_type": options.get("io_type", "io_stream"),
            "part": options["fpga_part"], "precision": precision, "reuse_factor": reuse,
            "project": "hls", "eval_count": int(options.get("csim_images", CSIM_IMAGES)),
            "resources": estimate_resources(artifact.payload, shape, precision,
                                                              reuse, target),
        }


def _reproducible_project(project_dir: Path) -> None:
    """Take out what makes two conversions of one model differ: hls4ml's own record of the
    conversion (``hls4ml_config.yml``: the absolute output folder, a random stamp and the
    weights pickled with storage ids; synthesis does not read it) and the random library stamp
    in ``build_lib.sh`` (it only names the C-simulation library, which is ``csim.so`` here)."""
    (project_dir / "hls4ml_config.yml").unlink(missing_ok=True)
    script = project_dir / "build_lib.sh"
    if script.is_file():
        script.write_text(re.sub(r"(?m)^LIB_STAMP=\S+$", "LIB_STAMP=edgec", script.read_text()))


def _compile_csim(project_dir: Path) -> None:
    """hls4ml's build_lib.sh, with the C simulation's weight folder relative to the artifact.

    The simulation reads its weights from text files at WEIGHTS_DIR on the first call; hls4ml
    bakes in an absolute path, which would not survive moving the artifact to a board.
    """
    script = project_dir / "build_lib.sh"
    absolute = 'WEIGHTS_DIR="\\"${BASEDIR}/firmware/weights\\""'
    text = script.read_text()
    if absolute not in text:
        raise CompileError(f"hls4ml's {script.name} has no WEIGHTS_DIR line edgec understands; "
                           f"use hls4ml 1.3")
    script.write_text(text.replace(absolute, 'WEIGHTS_DIR="\\"hls/firmware/weights\\""'))
    done = subprocess.run(["bash", script.name], cwd=project_dir, capture_output=True, text=True)
    if done.returncode:
        raise CompileError(f"g++ could not compile hls4ml's C simulation: {done.stderr[-2000:]}")


def _output_size(artifact: Artifact, shape) -> int:
    import torch

    with torch.no_grad():
        return int(artifact.payload(torch.zeros((1, *shape))).numel())


def estimate_resources(model, shape, precision: str, reuse: int, target) -> dict[str, Any]:
    """Static estimate: one DSP per multiplier instance (MACs per output / reuse factor) and
    weight bits in 18 Kb BRAMs. Not a synthesis report: hls4ml gives one only after Vivado/Vitis."""
    from torch import nn

    width = int(precision.split("<")[1].split(",")[0])
    dsp, weight_bits, layers = 0, 0, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] \
                * module.kernel_size[1] * module.out_channels
        elif isinstance(module, nn.Linear):
            per_output = module.in_features * module.out_features
        else:
            continue
        multipliers = -(-per_output // reuse)
        dsp += multipliers
        weight_bits += module.weight.numel() * width
        layers.append({"layer": name, "multipliers": multipliers})
    available = {k: target.options[k] for k in ("dsp", "bram_18k") if k in target.options}
    bram = -(-weight_bits // BRAM_18K_BITS)
    return {"source": "edgec static estimate (hls4ml reports resources only after synthesis)",
            "dsp": dsp, "bram_18k_weights": bram, "weight_bits": weight_bits,
            "available": available,
            "fits": all([dsp <= available.get("dsp", dsp), bram <= available.get("bram_18k", bram)]),
            "layers": layers}
