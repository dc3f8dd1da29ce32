"""``edgec ci report``: ``dist/index.html``, a self-contained page of a CI index: one table row per
(target, device) entry and a chart of latency against top-1 (embedded PNG, no external URL)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from edgec.artifact import atomic_write_text
from edgec.ci.index import index_path, load_index
from edgec.report import STYLE, format_top1, html_table, png_bytes

REPORT_NAME = "index.html"
COLUMNS = ("target", "device", "status", "top-1", "top-1 on", "p50 ms", "mean ± ci95 ms",
           "latency on", "peak RSS MB", "size KiB", "artifact", "hash", "versions")
NONE = "—"
KEY_VERSIONS = 4  # versions shown per row; the rest are in index.json


def write_report(dist: Path) -> Path:
    """Write ``index.html`` beside the index of ``dist`` (a dist folder or its index.json),
    atomically, and return its path. A missing or invalid index is a ConfigError."""
    index = load_index(dist)
    folder = index_path(Path(dist)).parent
    return atomic_write_text(folder / REPORT_NAME, render_report(index))


def render_report(index: dict[str, Any]) -> str:
    """The page's HTML text for an index (as ``load_index`` returns it)."""
    entries = index.get("entries", [])
    title = f"{index.get('model') or 'model'}: edgec CI build"
    points = [entry for entry in entries if chartable(entry)]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>{html.escape(summary_line(index))}</p>",
             html_table(COLUMNS, [row_cells(entry) for entry in entries]),
             "<h2>Latency and top-1</h2>"]
    if points:
        png = base64.b64encode(latency_accuracy_chart(points)).decode()
        parts.append(f"<img alt='latency against top-1 per target and device' "
                     f"src='data:image/png;base64,{png}'>")
        parts.append("<p>filled markers: measured latency; hollow markers: predicted by a latency "
                     "model; bars: 95 % confidence interval of the mean.</p>")
    left_off = len(entries) - len(points)
    if not points:
        parts.append(f"<p>no chart: none of the {len(entries)} entries has both a latency and a "
                     f"top-1.</p>")
    elif left_off:
        parts.append(f"<p>{left_off} of {len(entries)} entries left off the chart (no latency or "
                     f"no top-1); they are in the table.</p>")
    return "".join(parts) + "</body></html>\n"


def summary_line(index: dict[str, Any]) -> str:
    """'3 entries (2 ok, 1 failed), model file ..., commit ..., budget 1'."""
    entries = index.get("entries", [])
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    words = [f"{len(entries)} entries (" + ", ".join(f"{n} {s}" for s, n in counts.items()) + ")"]
    for key in ("model_file", "recipe", "commit", "budget"):
        if index.get(key) not in (None, ""):
            words.append(f"{key.replace('_', ' ')} {index[key]}")
    return ", ".join(words)


def chartable(entry: dict[str, Any]) -> bool:
    """An entry with both a latency mean and a top-1 gets a point on the chart."""
    latency, accuracy = entry.get("latency"), entry.get("accuracy")
    return bool(latency and accuracy and latency.get("mean_ms") is not None
                and accuracy.get("top1") is not None)


def row_cells(entry: dict[str, Any]) -> tuple[str, ...]:
    """One table row, in COLUMNS order (plain text; the table escapes it)."""
    accuracy, latency = entry.get("accuracy") or {}, entry.get("latency") or {}
    status = entry["status"] + (f": {entry['error']}" if entry.get("error") else "")
    return (entry["target"], entry.get("device") or NONE, status,
            format_top1(accuracy.get("top1")) if accuracy else NONE, accuracy.get("on") or NONE,
            _ms(latency.get("p50_ms")), _mean_cell(latency), _latency_on(latency),
            _number(entry.get("peak_rss_mb"), ".1f"),
            f"{entry['size_bytes'] / 1024:.1f}" if entry.get("size_bytes") else NONE,
            entry.get("artifact") or NONE, (entry.get("hash") or NONE)[:12],
            ", ".join(f"{k} {v}" for k, v in list(entry.get("versions", {}).items())[:KEY_VERSIONS])
            or NONE)


def _mean_cell(latency: dict[str, Any]) -> str:
    if latency.get("mean_ms") is None:
        return NONE
    cell = _ms(latency["mean_ms"])
    if latency.get("ci95_ms") is not None:
        cell += f" ± {_ms(latency['ci95_ms'])}"
    return cell + (" (predicted)" if latency.get("source") == "predicted" else "")


def _latency_on(latency: dict[str, Any]) -> str:
    if not latency:
        return NONE
    return f"{latency.get('on') or NONE} ({latency.get('source', 'measured')})"


def _ms(value: float | None) -> str:
    return NONE if value is None else f"{value:.4g}"


def _number(value: float | None, spec: str) -> str:
    return NONE if value is None else format(value, spec)


def latency_accuracy_chart(entries: list[dict[str, Any]]) -> bytes:
    """PNG: latency mean (x, with ci95 error bars) against top-1 (y), one labelled point per
    entry; points of a predicted latency hollow."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for entry in entries:
        latency = entry["latency"]
        x, y = latency["mean_ms"], entry["accuracy"]["top1"] * 100
        predicted = latency.get("source") == "predicted"
        axes.errorbar(x, y, xerr=latency.get("ci95_ms") or 0, fmt="none", ecolor="#4c72b0")
        axes.scatter([x], [y], s=50, edgecolors="#4c72b0", linewidths=1.5,
                     facecolors="none" if predicted else "#4c72b0")
        device = entry.get("device")
        label = entry["target"] + (f" @ {device}" if device and device != entry["target"] else "")
        axes.annotate(label + (" (predicted)" if predicted else ""), (x, y), fontsize=8,
                      textcoords="offset points", xytext=(6, 4))
    means = [entry["latency"]["mean_ms"] for entry in entries]
    if min(means) > 0 and max(means) / min(means) > 20:  # a host and a board differ 100x
        axes.set_xscale("log")
    axes.margins(x=0.15, y=0.15)  # room for the labels of the outermost points
    axes.set_xlabel("latency, mean ms (bars: 95 % CI)")
    axes.set_ylabel("top-1 %")
    axes.grid(alpha=0.3)
    return png_bytes(figure)
