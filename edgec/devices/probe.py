"""What a board is: arch, OS, Python, runtimes, governor, temperature, free disk and memory.

The probe is one POSIX shell script (run over SSH or locally) that prints ``key=value`` lines;
every value it interpolates is quoted with shlex.quote. What a target needs of a board is data
(``Target.requirements``: Python version, modules, commands), checked against these facts.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

from edgec.runner import RUNNER_PATH
from edgec.targets import version_satisfies

# Each line prints one key; a missing file gives an empty value, never an error.
STATE_SCRIPT = r"""
echo "governor=$(cat /sys/devices/system/cpu/cpu*/cpufreq/scaling_governor 2>/dev/null \
  | sort -u | tr '\n' '/' | sed 's:/$::')"
echo "temp_mc=$(cat /sys/class/thermal/thermal_zone*/temp 2>/dev/null | sort -n | tail -n 1)"
echo "throttled=$(vcgencmd get_throttled 2>/dev/null | sed 's/.*=//')"
"""

# module -> the pip distribution that provides it (its version is the module's version)
DISTRIBUTIONS = {"numpy": "numpy", "onnxruntime": "onnxruntime", "tvm": "apache-tvm",
                 "tflite_runtime": "tflite-runtime", "ai_edge_litert": "ai-edge-litert",
                 "executorch": "executorch"}
MIN_FREE_MB = 64.0  # less than this in the workdir and artifacts (a TVM .so, an engine) won't fit

# argv: module=distribution pairs; prints {module: version} for those importable
_RUNTIMES = """
import importlib.util as u, json, sys
try:
    import importlib.metadata as m
except ImportError:
    m = None
found = {}
for pair in sys.argv[1:]:
    mod, dist = pair.split("=")
    try:
        spec = u.find_spec(mod)
    except (ImportError, ValueError):
        spec = None
    if spec:
        try:
            found[mod] = m.version(dist) if m else "installed"
        except Exception:
            found[mod] = "installed"
print(json.dumps(found))
"""

ISA_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "armv7l": "armv7", "armv8l": "armv7"}


def facts_script(python: str, workdir: str, modules=(), commands=()) -> str:
    """The full probe for ``edgec devices check``: the runtimes edgec knows plus ``modules``,
    and where each of ``commands`` is (empty when missing)."""
    py, wd = shlex.quote(python), shlex.quote(workdir)
    pairs = " ".join(shlex.quote(f"{m}={DISTRIBUTIONS.get(m, m)}")
                     for m in dict.fromkeys([*DISTRIBUTIONS, *modules]))
    found = "".join(f"printf 'command=%s\\t%s\\n' {shlex.quote(c)} "
                    f"\"$(command -v {shlex.quote(c)} 2>/dev/null)\"\n" for c in commands)
    return STATE_SCRIPT + f"""
echo "arch=$(uname -m)"
echo "kernel=$(uname -r)"
echo "os=$(sed -n 's/^PRETTY_NAME=//p' /etc/os-release 2>/dev/null | tr -d '"')"
echo "mem_available_kb=$(sed -n 's/^MemAvailable: *\\([0-9]*\\).*/\\1/p' /proc/meminfo)"
mkdir -p {wd} 2>/dev/null
echo "disk_free_kb=$(df -Pk {wd} 2>/dev/null | awk 'NR==2 {{print $4}}')"
echo "python_path=$(command -v {py})"
echo "python=$({py} -c 'import platform; print(platform.python_version())' 2>/dev/null)"
echo "runtimes=$({py} -c {shlex.quote(_RUNTIMES)} {pairs} 2>/dev/null)"
{found}echo "cpu=$({cpu_command(python)})"
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
    for key in ("arch", "kernel", "os", "python_path", "python"):
        if key in raw:
            facts[key] = raw[key].strip()
    for key in ("mem_available_kb", "disk_free_kb"):
        if key in raw:
            value = raw[key].strip()
            facts[key.replace("_kb", "_mb")] = int(value) / 1024.0 if value.isdigit() else None
    if "cpu" in raw:
        facts["cpu"] = parse_cpu(raw["cpu"])
    commands = [line[len("command="):].split("\t", 1) for line in text.splitlines()
                if line.startswith("command=") and "\t" in line]
    if commands:
        facts["commands"] = {name: path.strip() for name, path in commands}
    if "runtimes" in raw:
        try:
            facts["runtimes"] = json.loads(raw["runtimes"] or "{}")
        except json.JSONDecodeError:
            facts["runtimes"] = {}
    return facts


def target_mismatches(target, facts: dict[str, Any], python: str = "python3") -> list[str]:
    """Why this board cannot run ``target``'s artifacts (empty when it matches): its arch, and
    ``target.requirements`` against what the probe found for the device file's ``python``."""
    problems = []
    arch = ISA_ALIASES.get(facts.get("arch", ""), facts.get("arch", ""))
    isa = ISA_ALIASES.get(target.isa, target.isa)
    if arch and arch != isa:
        problems.append(f"board is {arch}, target {target.name!r} needs {isa}")
    needs = target.requirements
    if needs.python or needs.modules:
        problems += _python_problems(target.name, needs, facts, python)
    found = facts.get("commands", {})
    problems += [f"{c} is missing on the board (target {target.name!r} runs it)"
                 for c in needs.commands if not found.get(c)]
    return problems


def _python_problems(target: str, needs, facts: dict[str, Any], python: str) -> list[str]:
    q = shlex.quote(python)
    if "python_path" in facts and not facts["python_path"]:
        return [f"python {python!r} (the `python` of the device file) was not found on the "
                f"board; set it to the board's interpreter that has numpy and the runtime "
                f"(`command -v python3` on the board tells where one is)"]
    version = facts.get("python", "")
    if not version:
        return [f"python {python!r} on the board did not run; set `python` in the device file "
                f"to a working interpreter"]
    problems = []
    if needs.python and not version_satisfies(version, needs.python):
        problems.append(f"the board's {python} is Python {version}, target {target!r} needs "
                        f"{needs.python}; install one that is and set `python` in the device "
                        f"file to it")
    runtimes = facts.get("runtimes") or {}
    for need in needs.modules:
        options = need.split("|")
        if not any(m in runtimes for m in options):
            pip = " or ".join(f"`{q} -m pip install {DISTRIBUTIONS.get(m, m)}`" for m in options)
            problems.append(f"{' or '.join(options)} cannot be imported by {python} on the "
                            f"board; install it there: {pip}")
    return problems


def readiness_problems(facts: dict[str, Any], workdir: str) -> list[str]:
    """What keeps a matching board from taking artifacts: ~no free disk in its workdir."""
    free = facts.get("disk_free_mb")
    if free is not None and free < MIN_FREE_MB:
        return [f"only {free:.1f} MiB free in {workdir} on the board (edgec wants "
                f"{MIN_FREE_MB:.0f} MiB for artifacts); free disk space there or set another "
                f"`workdir` in the device file"]
    return []
