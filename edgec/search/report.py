"""What a search tells a person: ``pareto.png`` (held-out top-1 against latency, every completed
trial, the feasible front, the pick and the baselines), ``report.md`` and a self-contained
``report.html`` (the plot inlined), with the table of trials and the pick's lineage."""

from __future__ import annotations

import base64
import html
import json
import shlex
from pathlib import Path
from typing import Any

from edgec.report import STYLE, lineage_rows, markdown_table, png_bytes
from edgec.search.pick import feasible_front

TRIAL_COLUMNS = ("#", "config", "marks", "held-out top-1 %", "drop", "re-check drop",
                 "test top-1 %",
                 "latency ms (mean ± CI95)", "p50 ms", "size KiB", "cache", "s", "status")
LOG_SPREAD = 20  # the slowest trial this many times the fastest: latency on a log axis
COLOURS = {"trial": "#9a9a9a", "infeasible": "#d62728", "front": "#1f77b4", "pick": "#ff9f1c",
           "baseline": "#2ca02c", "screened": "#c5b0d5", "predicted": "#bcbd22"}
LEGEND = {"trial": "feasible, dominated", "infeasible": "over the budget",
          "screened": "screened (short fine-tune; never picked)",
          "predicted": "predicted, not measured (never picked)",
          "front": "Pareto front (latency, top-1, size)"}


def write_report(outcome) -> tuple[Path, ...]:
    """pareto.png, report.md and report.html in the search's folder; their paths."""
    out = outcome.plan.out
    out.mkdir(parents=True, exist_ok=True)
    chart = pareto_chart(outcome)
    paths = (out / "pareto.png", out / "report.md", out / "report.html")
    paths[0].write_bytes(chart)
    paths[1].write_text(render_markdown(outcome))
    paths[2].write_text(render_html(outcome, chart))
    return paths


# ----- the plot ---------------------------------------------------------------------------
def pareto_chart(outcome) -> bytes:
    """PNG: held-out top-1 (y) against latency (x, ± 95 % CI) of every completed trial; the
    feasible front joined, the pick starred, fp32 / int8 baselines labelled, the budget's floor."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    done = [r for r in outcome.records if r.scored and r.counts]
    figure, axes = plt.subplots(figsize=(8.5, 5.5))
    if done:
        _plot_trials(axes, done, outcome)
    else:
        axes.text(0.5, 0.5, "no trial completed", ha="center", va="center",
                  transform=axes.transAxes)
    failed = sum(r.state in ("failed", "over budget") and r.counts for r in outcome.records)
    axes.set_title(f"{outcome.plan.study_name}: {len(done)} trials completed, {failed} failed")
    latencies = [r.latency_ms for r in done]
    wide = bool(latencies) and max(latencies) > LOG_SPREAD * min(latencies)
    if wide:  # an untuned TVM build at 30 ms would squeeze every int8 trial into one column
        axes.set_xscale("log")
    axes.set_xlabel(f"latency on {outcome.plan.request.device} (mean ms, ± 95 % CI"
                    f"{', log scale' if wide else ''})")
    axes.set_ylabel("top-1 on the held-out training slice (%)")
    axes.grid(alpha=0.3)
    return png_bytes(figure)


def _plot_trials(axes, done, outcome) -> None:
    labelled = set()
    for record in done:
        kind = "predicted" if record.state == "predicted" else "screened" if record.screened \
            else ("front" if record.number in outcome.front else "trial") if record.feasible \
            else "infeasible"
        label = None if kind in labelled else LEGEND[kind]
        labelled.add(kind)
        axes.errorbar(record.latency_ms, record.heldout_top1, xerr=record.ci95_ms, fmt="o",
                      color=COLOURS[kind], alpha=0.85, markersize=8 if kind == "front" else 6,
                      capsize=2, label=label)
        axes.annotate(f"#{record.number}", (record.latency_ms, record.heldout_top1),
                      textcoords="offset points", xytext=(5, 5), fontsize=7, color="#555555")
    frontier = feasible_front(tuple(done))
    if len(frontier) > 1:
        axes.plot([r.latency_ms for r in frontier], [r.heldout_top1 for r in frontier], "-",
                  drawstyle="steps-post", color=COLOURS["front"], linewidth=1,
                  label="latency × top-1 frontier")
    for record in (r for r in done if r.baseline):
        axes.scatter(record.latency_ms, record.heldout_top1, s=170, facecolors="none",
                     edgecolors=COLOURS["baseline"], linewidths=2)
        axes.annotate(f"{record.recipe} (baseline)", (record.latency_ms, record.heldout_top1),
                      textcoords="offset points", xytext=(8, -14), color=COLOURS["baseline"])
    if outcome.pick is not None:
        pick = outcome.pick.record
        axes.scatter(pick.latency_ms, pick.heldout_top1, marker="*", s=420, zorder=5,
                     color=COLOURS["pick"], edgecolors="black", label=f"pick: trial {pick.number}")
    budget = outcome.plan.request.budget
    axes.axhline(done[0].attrs["reference_top1"] - budget, color=COLOURS["infeasible"],
                 linestyle="--", linewidth=1, label=f"budget: float model − {budget:g} points")
    axes.legend(loc="lower right", fontsize=8)


# ----- the table --------------------------------------------------------------------------
def trial_rows(outcome) -> list[tuple[str, ...]]:
    """One row per started trial, in TRIAL_COLUMNS order."""
    return [_row(record, outcome) for record in outcome.records]


def _row(record, outcome) -> tuple[str, ...]:
    marks = [m for m, on in (("pick", outcome.pick and outcome.pick.number == record.number),
                             ("front", record.number in outcome.front),
                             ("baseline", record.baseline)) if on]
    config = record.label()
    status = record.state + (f": {record.attrs['error']}" if record.attrs.get("error") else "")
    if "repeat_of" in record.attrs:
        status = f"repeat of trial {record.attrs['repeat_of']}, not built"
    elif record.state == "interrupted" and "error" not in record.attrs:
        status = "interrupted: its process stopped (killed?); queued again"
    if "retry_of" in record.attrs:
        status += f" (runs trial {record.attrs['retry_of']} again)"
    if "exits" in record.attrs:
        status += f"; {_exits(record.attrs['exits'])}"
    if not record.scored or "repeat_of" in record.attrs:
        return (str(record.number), config, ", ".join(marks), "-", "-", "-", "-", "-", "-", "-",
                "-", _seconds(record), status)
    test, again = record.attrs.get("test_top1"), record.attrs.get("recheck_drop")
    if outcome.pick is not None and outcome.pick.number == record.number:
        test = outcome.pick.test_top1  # trials skip the test split; the pick is evaluated
    return (str(record.number), config, ", ".join(marks), f"{record.heldout_top1:.2f}",
            f"{record.attrs['heldout_drop']:.2f}", "-" if again is None else f"{again:.2f}",
            "-" if test is None else f"{test:.2f}",
            _latency(record), f"{record.attrs['latency_p50_ms']:.4g}",
            f"{record.size_bytes / 1024:.1f}", _cache(record), _seconds(record), status)


def _exits(exits: dict) -> str:
    """'exits conv1 (31 %), streamed saving 12.0 % on local; dropped on the stream: conv2'."""
    kept = ", ".join(f"{after} ({rate * 100:.0f} %)" for after, rate in exits["kept"]) or "none"
    saving = exits["stream_saving"]
    text = f"exits {kept}" + ("" if saving is None else
                              f", streamed saving {saving * 100:.1f} % on {exits['measured_on']}")
    return text + (f"; dropped on the stream: {', '.join(exits['dropped'])}"
                   if exits["dropped"] else "")


def _latency(record) -> str:
    """'0.25 ± 0.002', '0.25 ± 0.03 predicted', or the measured one and what the model said."""
    text = f"{record.latency_ms:.4g} ± {record.ci95_ms:.2g}"
    predicted = record.attrs.get("predicted_ms")
    if record.attrs.get("latency_source") == "predicted":
        return text + " predicted"
    return text + (f" (predicted {predicted:.4g})" if predicted is not None else "")


def _cache(record) -> str:
    """'3/3 steps hit, latency cached'."""
    steps = record.attrs.get("steps", [])
    hits = sum(status == "hit" for _, status in steps)
    latency = ", latency cached" if record.attrs.get("latency_from_cache") else ""
    return f"{hits}/{len(steps)} steps hit{latency}"


def _seconds(record) -> str:
    seconds = record.attrs.get("seconds")
    return "-" if seconds is None else f"{seconds:.1f}"


# ----- report.md / report.html ------------------------------------------------------------
def _budget_words(plan) -> str:
    fixed = plan.fixed
    return (f"{fixed.get('budget.view', 'plain')} view, {fixed.get('budget.holdout', '?')} "
            f"images; re-check on {fixed.get('budget.recheck') or 'no'} more, run on the "
            f"pick's candidates only")


def time_split(records) -> str:
    """'time of the 24 built trials: 1,234 s: fine-tune 900 s, build 100 s, ...'."""
    built = [r for r in records if r.counts and "phases_s" in r.attrs]
    totals: dict[str, float] = {}
    for record in built:
        for phase, seconds in record.attrs["phases_s"].items():
            totals[phase] = totals.get(phase, 0.0) + seconds
    parts = ", ".join(f"{phase} {seconds:,.0f} s" for phase, seconds in totals.items())
    return (f"time of the {len(built)} trials built: {sum(totals.values()):,.0f} s"
            + (f" ({parts})" if parts else ""))


def model_line(outcome) -> str:
    """How many trials the board measured, and the latency model's error on them."""
    from edgec.search.predict import predicted_vs_measured

    plan = outcome.plan
    built = [r for r in outcome.records if r.scored and r.counts]
    measured = [r for r in built if r.attrs.get("latency_source", "measured") == "measured"]
    line = (f"latency model `{plan.predictor.path}` ({plan.measure_trials}): {len(measured)} of "
            f"{len(built)} trials measured ({len(measured) / max(len(built), 1):.0%})")
    errors = predicted_vs_measured(outcome.records)
    if errors is None:
        return line + "; nothing both predicted and measured"
    tau = errors["kendall_tau"]
    return (line + f"; predicted against measured on {errors['n']}: median error "
            f"{errors['median_ape']:.1%}, MAPE {errors['mape']:.1%}, within ±10 % "
            f"{errors['within_10']:.0%}, Kendall τ {'-' if tau is None else f'{tau:.2f}'}")


def summary_lines(outcome) -> list[str]:
    """What the search was, what it found and how to rebuild the pick."""
    plan, request = outcome.plan, outcome.plan.request
    lines = [f"model `{request.model}`, target `{request.target}`, measured on "
             f"`{request.device}`; recipes {', '.join(plan.candidates)}; budget "
             f"{request.budget:g} top-1 point(s) on the held-out slice of the training split",
             f"study `{plan.study_name}` in `{plan.storage}`: {len(outcome.records)} trials, "
             f"{len(outcome.new_trials)} built now; stopped: {outcome.stopped}",
             f"held-out top-1 ({_budget_words(plan)}) chooses; the pick's drop is re-checked "
             f"on images nothing chose on; the test split's top-1 is reported only"]
    lines += [f"not searched: {name} ({why})" for name, why in plan.skipped]
    lines.append(time_split(outcome.records))
    if plan.predictor is not None:
        lines.append(model_line(outcome))
    if outcome.pick is None:
        lines.append("no feasible trial: nothing picked (raise --budget or add trials)")
        return lines
    lines.append(f"pick: trial {outcome.pick.number}, {outcome.pick.record.label()}: "
                 f"{outcome.pick.decision}")
    if outcome.pick.test_top1 is not None:
        lines.append(f"the pick's top-1 on the evaluation (test) split: "
                     f"{outcome.pick.test_top1:.2f} %")
    lines.append(f"rebuild: `{shlex.join(outcome.command)}`")
    return lines


def render_markdown(outcome) -> str:
    """report.md: summary, the plot (beside it as pareto.png), trials, re-measurement, lineage."""
    lines = "".join(f"- {line}\n" for line in summary_lines(outcome))
    text = (f"# Search {outcome.plan.study_name}\n\n{lines}\n"
            f"![held-out top-1 against latency](pareto.png)\n\n## Trials\n\n"
            f"{markdown_table(TRIAL_COLUMNS, [_escaped(row) for row in trial_rows(outcome)])}\n")
    rounds = _rounds_rows(outcome)
    if rounds:
        text += f"\n## Re-measurement of the finalists\n\n{markdown_table(*rounds)}\n"
    lineage = _pick_lineage(outcome)
    if lineage:
        text += ("\n## The pick's lineage\n\n"
                 + markdown_table(("pass", "parameters (not default)", "report"), lineage) + "\n")
    return text


def _escaped(row: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(cell.replace("|", "\\|").replace("\n", " ") for cell in row)


def _rounds_rows(outcome) -> tuple[tuple[str, ...], list[tuple[str, ...]]] | None:
    pick = outcome.pick
    if pick is None or not pick.rounds:
        return None
    header = ("round", *(f"trial {n} median ms" for n in pick.finalists))
    rows = [(str(i + 1), *(f"{v:.4g}" for v in values)) for i, values in enumerate(pick.rounds)]
    rows.append(("all", *(f"{v:.4g}" for v in pick.medians_ms)))
    return header, rows


def _pick_lineage(outcome) -> list[tuple[str, str, str]]:
    if outcome.pick is None:
        return []
    manifest = Path(outcome.pick.record.attrs["artifact"]) / "manifest.json"
    if not manifest.is_file():
        return []
    return lineage_rows(json.loads(manifest.read_text()))


def html_table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(outcome, chart: bytes) -> str:
    """A self-contained page: summary, the plot (inlined PNG), trials, re-measurement, lineage."""
    title = f"Search {outcome.plan.study_name}"
    parts: list[Any] = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><ul>",
        *(f"<li>{html.escape(line)}</li>" for line in summary_lines(outcome)), "</ul>",
        f"<img alt='held-out top-1 against latency' "
        f"src='data:image/png;base64,{base64.b64encode(chart).decode()}'>",
        "<h2>Trials</h2>", html_table(TRIAL_COLUMNS, trial_rows(outcome))]
    rounds = _rounds_rows(outcome)
    if rounds:
        parts += ["<h2>Re-measurement of the finalists</h2>", html_table(*rounds)]
    lineage = _pick_lineage(outcome)
    if lineage:
        parts += ["<h2>The pick's lineage</h2>",
                  html_table(("pass", "parameters (not default)", "report"), lineage)]
    return "".join(parts) + "</body></html>\n"
