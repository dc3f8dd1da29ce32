"""What a board is: arch, OS, Python, runtimes, governor, temperature, free disk and memory.

The probe is one POSIX shell script (run over SSH or locally) that prints ``key=value`` lines;
every value it interpolates is quoted with shlex.quote.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

from edgec.runner import RUNNER_PATH

# Each line prints one key; a missing file gives an empty value, never an error.
STATE_SCRIPT = r"""
echo "governor=$(cat /sys/devices/system/cpu/cpu*/cpufreq/scaling_governor 2>/dev/null \
  | sort -u | tr '\n' '/' | sed 's:/$::')"
echo "temp_mc=$(cat /sys/class/thermal/thermal_zone*/temp 2>/dev/null | sort -n | tail -n 1)"
echo "throttled=$(vcgencmd get_throttled 2>/dev/null | sed 's/.*=//')"
"""

_RUNTIMES = """
import importlib.metadata as m, importlib.util as u, json
found = {}
for mod, dist in (("numpy", "numpy"), ("onnxruntime", "onnxruntime"), ("tvm", "apache-tvm"),
                  ("tflite_runtime", "tflite-runtime"), ("ai_edge_litert", "ai-edge-litert"),
                  ("executorch", "executorch")):
    if u.find_spec(mod):
        try:
            found[mod] = m.version(dist)
        except m.PackageNotFoundError:
            found[mod] = "installed"
print(json.dumps(found))
"""

ISA_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "armv7l": "armv7", "armv8l": "armv7"}


def facts_script(python: str, workdir: str) -> str:
    """The full probe for ``edgec devices check``."""
    py, wd = shlex.quote(python), shlex.quote(workdir)
    return STATE_SCRIPT + f"""
echo "arch=$(uname -m)"
echo "kernel=$(uname -r)"
echo "os=$(sed -n 's/^PRETTY_NAME=//p' /etc/os-release 2>/dev/null | tr -d '"')"
echo "mem_available_kb=$(sed -n 's/^MemAvailable: *\\([0-9]*\\).*/\\1/p' /proc/meminfo)"
mkdir -p {wd} 2>/dev/null
echo "disk_free_kb=$(df -Pk {wd} 2>/dev/null | awk 'NR==2 {{print $4}}')"
echo "python=$({py} -c 'import platform; print(platform.python_version())' 2>/dev/null)"
echo "runtimes=$({py} -c {shlex.quote(_RUNTIMES)} 2>/dev/null)"
echo "cpu=$({cpu_command(python)})"
"""


def cpu_command(python: str) -> str:
    """Run the artifact runner's CPU probe (``runner.py cpu``) on the board, from stdin, so the
    board reads its CPU exactly as the runner will: one JSON line, or nothing without numpy."""
    source = RUNNER_PATH.read_text()
    end = "EDGEC_RUNNER_SOURCE"
    assert end not in source
    return f"{shlex.quote(python)} - cpu 2>/dev/null <<'{end}'\n{source}\n{end}\n"


def parse_cpu(text: str) -> dict[str, Any] | None:
    """The ``cpu`` object of ``runner.py cpu`` output, or None."""
    try:
        return json.loads(text.strip().splitlines()[-1])["cpu"]
    except (IndexError, KeyError, TypeError, json.JSONDecodeError):
        return None


def parse(text: str) -> dict[str, Any]:
    """``key=value`` lines → typed facts (numbers as numbers, runtimes as a dict)."""
    raw = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    facts: dict[str, Any] = {"governor": raw.get("governor", "").strip()}
    temp = raw.get("temp_mc", "").strip()
    facts["temp_c"] = int(temp) / 1000.0 if temp.lstrip("-").isdigit() else None
    flags = raw.get("throttled", "").strip()
    facts["throttled"] = flags if re.fullmatch(r"0x[0-9a-fA-F]+", flags) else ""
    for key in ("arch", "kernel", "os", "python"):
        if key in raw:
            facts[key] = raw[key].strip()
    for key in ("mem_available_kb", "disk_free_kb"):
        if key in raw:
            value = raw[key].strip()
            facts[key.replace("_kb", "_mb")] = int(value) / 1024.0 if value.isdigit() else None
    if "cpu" in raw:
        facts["cpu"] = parse_cpu(raw["cpu"])
    if "runtimes" in raw:
        try:
            facts["runtimes"] = json.loads(raw["runtimes"] or "{}")
        except json.JSONDecodeError:
            facts["runtimes"] = {}
    return facts


def target_mismatches(target, facts: dict[str, Any]) -> list[str]:
    """Why this board cannot run ``target``'s artifacts (empty when it matches)."""
    problems = []
    arch = ISA_ALIASES.get(facts.get("arch", ""), facts.get("arch", ""))
    isa = ISA_ALIASES.get(target.isa, target.isa)
    if arch and arch != isa:
        problems.append(f"board is {arch}, target {target.name!r} needs {isa}")
    runtimes = facts.get("runtimes", {})
    for need in target.runtime_requires:
        present = bool(facts.get("python")) if need == "python3" else need in runtimes
        if not present:
            problems.append(f"{need} is missing on the board (pip install {need})")
    return problems
