"""CPU capabilities as data: what the machine that runs an artifact offers its int8 kernels.

``local`` (``cpu = "native"``) is probed on this host; board targets declare ``cpu_features`` in
their TOML (Linux /proc/cpuinfo flag names: Pi 4's Cortex-A72 has ``asimd`` only, Pi 5's A76
adds the dot product ``asimddp``); a board reached over SSH reports its own. The detection code
is the artifact runner's (:mod:`edgec.runner.runner`), so the build and the board read a CPU the
same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgec.runner import runner

DOT_PRODUCT_PATHS = ("x86-vnni", "arm64-dotprod", "arm64-i8mm")


@dataclass(frozen=True)
class CpuInfo:
    """A CPU: ISA, model, int8-relevant features, and where this description came from."""

    arch: str
    model: str
    features: tuple[str, ...]
    source: str  # "this host", "target rpi4 (declared)", "device pi-lab"

    @property
    def int8_path(self) -> str:
        """The int8 kernel family this CPU runs, e.g. 'x86-vnni', 'x86-avx2', 'arm64-neon'."""
        return runner.int8_path(self.arch, self.features)

    @property
    def int8_dot(self) -> bool:
        """Whether the CPU has an int8 dot-product instruction (VNNI, SDOT/UDOT, i8mm)."""
        return self.int8_path in DOT_PRODUCT_PATHS

    def to_json(self) -> dict[str, Any]:
        return {"arch": self.arch, "model": self.model, "features": list(self.features),
                "int8_path": self.int8_path, "source": self.source}

    @classmethod
    def from_runner(cls, info: dict[str, Any], source: str) -> CpuInfo:
        """From the runner's ``cpu`` JSON (``runner.py cpu`` on a board, or on this host)."""
        return cls(info["arch"], info["model"], tuple(info["features"]), source)

    def describe(self) -> str:
        return f"{self.model} ({self.int8_path})"


def host_cpu() -> CpuInfo:
    """This machine's CPU, probed now."""
    return CpuInfo.from_runner(runner.cpu_info(), "this host")


def declared_cpu(target) -> CpuInfo:
    """The CPU a board target declares (its ``cpu`` and ``cpu_features``)."""
    arch = runner.ISA_ALIASES.get(target.isa, target.isa)
    return CpuInfo(arch, target.cpu, tuple(sorted(target.cpu_features)),
                   f"target {target.name} (declared)")


def target_cpu(target) -> CpuInfo:
    """The CPU that will run ``target``'s artifacts: probed for ``cpu = "native"``, else declared."""
    return host_cpu() if target.cpu == "native" else declared_cpu(target)
