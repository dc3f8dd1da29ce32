"""What a build tells a person: the result table, where each number was measured, the int8
scheme, the lineage as a table, and the per-layer efficiency chart; as report.md and as a
self-contained report.html (the chart embedded as a PNG)."""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edgec.measure import Measurement

TABLE_COLUMNS = ("config", "top-1", "top-1 on", "p50 ms", "p90 ms", "latency on", "size KiB")


@dataclass(frozen=True)
class Row:
    """One line of the result table; ``top1_on`` / ``latency_on`` say where each was measured."""

    name: str
    top1: float
    size_bytes: int
    latency: Measurement | None
    top1_on: str = ""
    latency_on: str = ""

    def to_json(self) -> dict[str, Any]:
        latency = self.latency.summary() if self.latency else None
        return {"name": self.name, "top1": self.top1, "size_bytes": self.size_bytes,
                "latency": latency, "top1_on": self.top1_on, "latency_on": self.latency_on}


def format_top1(value: float | None) -> str:
    """Top-1 as a percentage; "n/a" where the artifact cannot run on this host."""
    return "n/a" if value is None or value != value else f"{value * 100:.2f} %"


def table_cells(row: Row) -> tuple[str, ...]:
    """One row's cells, in TABLE_COLUMNS order."""
    lat = row.latency
    return (row.name, format_top1(row.top1), row.top1_on or "-",
            f"{lat.p50:.3f}" if lat else "-", f"{lat.p90:.3f}" if lat else "-",
            row.latency_on if lat else "-", f"{row.size_bytes / 1024:.1f}")


def cpu_words(cpu: dict[str, Any] | None) -> str:
    return f"{cpu['model']}, {cpu['int8_path']}" if cpu else "CPU unknown"


def where_line(manifest: dict[str, Any]) -> str:
    """'measured on host: AMD EPYC, x86-vnni; pi-lab: Cortex-A72, arm64-neon'."""
    places = {"host": manifest["cpu"]["build_host"]}
    on_device = manifest.get("accuracy_on_device")
    if on_device and on_device["measured_on"]["cpu"]:
        places[on_device["measured_on"]["device"]] = on_device["measured_on"]["cpu"]
    return "measured on " + "; ".join(f"{name}: {cpu_words(cpu)}" for name, cpu in places.items())


def int8_line(manifest: dict[str, Any]) -> str:
    """'int8 scheme `u8s8-reduce-range` for x86-avx2 (AMD EPYC, this host): why', or ''."""
    choice = manifest.get("int8")
    if not choice:
        return ""
    cpu = manifest["cpu"]["runs_on"]
    return (f"int8 scheme `{choice['scheme']}` for {choice['int8_path']} ({cpu['model']}, "
            f"{cpu['source']}): {choice['reason']}")


def size_line(manifest: dict[str, Any]) -> str:
    """What the size column counts: the deployable model files (not the runner or reports)."""
    files = manifest["entry"]["files"]
    return f"size counts {', '.join(files)}" if len(files) > 1 else ""


def skipped_lines(manifest: dict[str, Any]) -> list[str]:
    """Parts of the artifact the backend could not build here, and what adds them."""
    return [f"{key} not built: {value['skipped']}" for key, value in manifest["entry"].items()
            if isinstance(value, dict) and "skipped" in value]


def report_notes(manifest: dict[str, Any]) -> list[str]:
    """The lines under the table: where, which int8 scheme and why, sizes, what was skipped,
    warnings."""
    return [line for line in (where_line(manifest), int8_line(manifest), size_line(manifest),
                              *skipped_lines(manifest), *manifest.get("warnings", ())) if line]


# ----- lineage ----------------------------------------------------------------------------
def lineage_rows(manifest: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(pass, parameters that differ from the pass's defaults, the report's scalar findings)."""
    from edgec.passes import PASSES

    rows = []
    for step in manifest["lineage"]:
        params = step["params"]
        if step["pass"] in PASSES:
            defaults = {f.name: getattr(PASSES[step["pass"]].Params(), f.name)
                        for f in fields(PASSES[step["pass"]].Params)}
            params = {k: v for k, v in params.items() if _plain(defaults.get(k)) != _plain(v)}
        rows.append((step["pass"], _pairs(params) or "defaults", _pairs(step["report"])))
    return rows


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _pairs(values: dict[str, Any]) -> str:
    """'k=v' for scalars and small flat dicts; larger dicts and lists shown by their size."""
    shown = []
    for key, value in values.items():
        small = isinstance(value, dict) and len(value) <= 3 and not any(
            isinstance(v, dict | list) for v in value.values())
        if small:
            value = f"({_pairs(value)})"
        elif isinstance(value, dict):
            value = f"{{{len(value)} entries}}"
        elif isinstance(value, list):
            value = f"[{len(value)} items]"
        elif isinstance(value, float):
            value = f"{value:.4g}"
        shown.append(f"{key}={value}")
    return ", ".join(shown)


# ----- report.md --------------------------------------------------------------------------
def markdown_table(header, rows) -> str:
    lines = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    lines += [f"| {' | '.join(str(c) for c in row)} |" for row in rows]
    return "\n".join(lines)


def render_table(rows) -> str:
    """Markdown table: accuracy, latency p50/p90 and size per row, and where each was measured."""
    return markdown_table(TABLE_COLUMNS, [table_cells(row) for row in rows])


def render_markdown(manifest: dict[str, Any], rows, efficiency=None) -> str:
    notes = "".join(f"- {line}\n" for line in report_notes(manifest))
    lineage = markdown_table(("pass", "parameters (not default)", "report"), lineage_rows(manifest))
    text = (f"# {manifest['name']} for {manifest['target']['name']}\n\n"
            f"hash `{manifest['hash']}`, backend `{manifest['entry']['backend']}`\n\n"
            f"{render_table(rows)}\n\n{notes}\n## Lineage\n{lineage}\n")
    if efficiency is not None:
        text += ("\n## Efficiency gap per layer (profiled on this host)\n"
                 "![latency and efficiency per layer](layers.png)\n\n"
                 + efficiency.markdown() + "\n")
    return text


# ----- chart and report.html --------------------------------------------------------------
def png_bytes(figure) -> bytes:
    """A matplotlib figure as PNG bytes (laid out tight, no Software tag: the same figure gives
    the same bytes); the figure is closed."""
    from matplotlib import pyplot as plt

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()


def efficiency_chart(efficiency) -> bytes:
    """PNG: time per layer and its fraction of the target's peak (the efficiency gap)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    layers = efficiency.layers
    names = [layer.name for layer in layers]
    height = max(3.0, 0.28 * len(layers) + 1.2)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, height), sharey=True)
    positions = range(len(layers))
    left.barh(positions, [layer.time_us for layer in layers], color="#4c72b0")
    left.set_xlabel("µs per layer (ONNX Runtime profiler, median)")
    left.set_yticks(list(positions), names, fontsize=8)
    left.invert_yaxis()
    right.barh(positions, [layer.efficiency * 100 for layer in layers], color="#dd8452")
    right.set_xlabel(f"% of peak ({efficiency.peak_gmacs:g} GMAC/s, {efficiency.precision})")
    figure.suptitle("latency and efficiency gap per layer")
    return png_bytes(figure)


def html_table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:72em;color:#222}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
         "padding:.3em .6em;text-align:left;font-size:.9em}th{background:#f2f2f2}"
         "code{background:#f6f6f6;padding:0 .2em}img{max-width:100%}")


def render_html(manifest: dict[str, Any], rows, efficiency=None, chart: bytes = b"") -> str:
    """A self-contained page: table, notes, chart (embedded), per-layer table, lineage."""
    title = f"{manifest['name']} for {manifest['target']['name']}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>hash <code>{manifest['hash']}</code>, backend "
             f"<code>{html.escape(manifest['entry']['backend'])}</code></p>",
             html_table(TABLE_COLUMNS, [table_cells(row) for row in rows]),
             "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report_notes(manifest))
             + "</ul>"]
    if efficiency is not None:
        parts.append("<h2>Latency and efficiency gap per layer (profiled on this host)</h2>")
        if chart:
            parts.append(f"<img alt='latency and efficiency per layer' "
                         f"src='data:image/png;base64,{base64.b64encode(chart).decode()}'>")
        parts.append(html_table(
            ("layer", "kind", "MACs", "KiB moved", "µs", "GMAC/s", "% of peak"),
            [(la.name, la.kind, f"{la.macs:,}", f"{la.bytes_moved / 1024:.1f}",
              f"{la.time_us:.1f}", f"{la.gmacs:.2f}", f"{la.efficiency * 100:.1f}")
             for la in efficiency.layers]))
    parts.append("<h2>Lineage</h2>")
    parts.append(html_table(("pass", "parameters (not default)", "report"), lineage_rows(manifest)))
    parts.append(f"<details><summary>manifest.json</summary><pre>"
                 f"{html.escape(json.dumps(manifest, indent=2, sort_keys=True))}</pre></details>")
    return "".join(parts) + "</body></html>\n"


def write_reports(directory: Path, manifest: dict[str, Any], rows, efficiency=None) -> None:
    """report.md (with layers.png beside it when there is a chart) and report.html."""
    chart = efficiency_chart(efficiency) if efficiency is not None and efficiency.layers else b""
    if chart:
        (directory / "layers.png").write_bytes(chart)
    (directory / "report.md").write_text(render_markdown(manifest, rows, efficiency))
    (directory / "report.html").write_text(render_html(manifest, rows, efficiency, chart))
