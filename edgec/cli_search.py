"""``edgec search MODEL --target T``: find the fastest configuration inside an accuracy budget,
measured on the device; a live display while it runs, the pick and its rebuild command at the
end (see :mod:`edgec.search.study`). ``--workers K`` and ``edgec search-worker`` run one study
with many workers, on this machine or others (:mod:`edgec.search.workers`)."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from edgec.cli_errors import fail
from edgec.errors import EdgecError

console = Console()
errors = Console(stderr=True)


def search(
    model: Path = typer.Argument(..., help="model TOML (factory/checkpoint/input/data)"),
    target: str = typer.Option("local", help="target name (see `edgec targets`) or TOML path"),
    device: str = typer.Option("local", help="measure and evaluate on this device "
                                             "(devices/NAME.toml)"),
    budget: float = typer.Option(1.0, help="top-1 points a configuration may lose against the "
                                           "float model on the held-out training slice"),
    trials: int = typer.Option(24, help="configurations the study should hold, built and "
                                        "measured (a resumed study counts its own)"),
    timeout: float = typer.Option(None, help="start no new trial after this many seconds"),
    study: str = typer.Option(None, help="study name (default: MODEL-TARGET); the same name and "
                                         "storage resume it"),
    storage: str = typer.Option(None, help="Optuna storage URL (default: "
                                           "sqlite:///OUT/STUDY.db)"),
    recipe: list[str] = typer.Option(None, help="a recipe to search (repeatable; default: fp32, "
                                                "int8, prune-int8, mobile-int8, prune-mobile-int8 "
                                                "where they fit)"),
    backend: list[str] = typer.Option(None, help="only these of the target's backends "
                                                 "(repeatable)"),
    holdout: int = typer.Option(0, help="held-out calibration images the budget measures on, "
                                        "for every recipe (0: a fifth of the split, at most "
                                        "5,000)"),
    view: str = typer.Option("auto", help="the budget's view for every recipe: plain, shifted, "
                                          "or auto (shifted for images of 16x16 pixels or "
                                          "more)"),
    recheck: int = typer.Option(None, help="calibration images after the held-out ones that "
                                           "only the pick's re-check reads (default: as many "
                                           "as held out; 0: no re-check)"),
    set_: list[str] = typer.Option(None, "--set", help="PASS.PARAM=VALUE fixed in every trial "
                                                      "(repeatable; that dimension is not "
                                                      "searched), e.g. prune.channel_multiple=16"),
    data: Path = typer.Option(None, help="data TOML (default: the model TOML's `data`)"),
    eval_count: int = typer.Option(0, help="test images --device evaluates per trial (0: all; "
                                           "for slow or emulated boards)"),
    screen: float = typer.Option(0.2, help="share of a recipe's fine-tune epochs a trial is "
                                           "screened with (successive halving; 1: every trial "
                                           "fine-tuned in full)"),
    promote: int = typer.Option(1, help="screened trials rebuilt with the full fine-tune at the "
                                        "end: the fastest inside the budget that could win"),
    latency_model: Path = typer.Option(None, help="a latency model (`edgec latency fit`) that "
                                                  "predicts every trial's latency"),
    measure_trials: str = typer.Option(None, help="with --latency-model: all, promising (only "
                                                  "trials that may win go to the board) or none "
                                                  "(every latency predicted; the default with "
                                                  "no board)"),
    out: Path = typer.Option(None, help="folder of the report, the study's SQLite file and the "
                                        "artifacts (default: search/STUDY)"),
    repeat: int = typer.Option(50, help="minimum timed runs per latency measurement"),
    min_time: float = typer.Option(1.0, help="minimum seconds of timed runs"),
    threads: int = typer.Option(1, help="runtime threads during measurement"),
    seed: int = typer.Option(0, help="the sampler's seed"),
    workers: int = typer.Option(1, help="worker processes running trials at once (more than 1 "
                                        "needs --storage postgresql://...; other machines join "
                                        "with `edgec search-worker`)"),
):
    """Search recipes, their declared spaces and the target's backends for the fastest
    configuration whose held-out top-1 drop stays inside --budget; print the pick and the
    `edgec build` command that rebuilds it."""
    import optuna

    from edgec.config import parse_overrides
    from edgec.measure import MeasureSpec
    from edgec.search.study import SearchRequest
    from edgec.search.workers import search as run_search

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        request = SearchRequest(
            model, target, device, budget, trials, timeout, study, storage, tuple(recipe or ()),
            tuple(backend or ()),
            {**parse_overrides(set_ or []), **({"budget.holdout": holdout} if holdout else {})},
            MeasureSpec(repeat=repeat, min_time_s=min_time, threads=threads), out, seed, data,
            view=view, recheck=recheck, eval_count=eval_count, screen=screen, promote=promote,
            latency_model=latency_model, measure_trials=measure_trials)
        outcome = _run_live(request, lambda request, show: run_search(request, workers, show))
    except EdgecError as exc:
        fail(exc)
    except KeyboardInterrupt:
        errors.print("interrupted: run the same command again to resume the study (finished "
                     "trials are kept; the interrupted one is queued again)", highlight=False)
        raise typer.Exit(130) from None
    _print_outcome(outcome)
    if outcome.pick is None:
        raise typer.Exit(1)


def search_worker(
    study: str = typer.Option(..., help="the study to join (the name `edgec search` gave it)"),
    storage: str = typer.Option(..., envvar="EDGEC_SEARCH_STORAGE",
                                help="its storage, e.g. postgresql://USER:PASSWORD@HOST:5432/DB "
                                     "($EDGEC_SEARCH_STORAGE keeps the password off the "
                                     "command line)"),
    device: str = typer.Option(None, help="measure on this device of this machine's inventory "
                                          "(devices/NAME.toml) instead of the study's: the same "
                                          "board, or one just like it"),
    timeout: float = typer.Option(None, help="start no new trial after this many seconds"),
    out: Path = typer.Option(None, help="folder of this worker's artifacts, OUT/build (default: "
                                        "the study's --out, else search/STUDY)"),
):
    """Join a study that `edgec search --storage URL` started, from this machine or another,
    and run its trials with the other workers until it holds its --trials (the model and data
    files must be at the study's paths, relative to where this runs). `edgec search` on the
    study picks once it is complete."""
    import optuna

    from edgec.search.storage import masked
    from edgec.search.workers import join

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        outcome = _run_live(None, lambda _, show: join(study, storage, device, timeout, out,
                                                       show))
    except EdgecError as exc:
        fail(exc)
    except KeyboardInterrupt:
        errors.print("interrupted: the running trial is queued again for the other workers",
                     highlight=False)
        raise typer.Exit(130) from None
    built = ", ".join(map(str, outcome.new_trials)) or "none"
    console.print(f"worker {outcome.worker} on study {study} ({masked(storage)}): built trials "
                  f"{built}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"stopped: {outcome.stopped}", highlight=False, markup=False, soft_wrap=True)


def _run_live(request, run_search):
    """Run the search under a live panel; each finished trial stays on screen as one line."""
    from rich.live import Live

    with Live(console=console, refresh_per_second=4, transient=True) as live:
        def show(status) -> None:
            if status.finished is not None:
                live.console.print(trial_line(status.finished), highlight=False, markup=False)
            live.update(status_panel(status))

        return run_search(request, show)


def status_panel(status) -> Group:
    """trials built / asked, elapsed, what runs now, the best so far."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    minutes, seconds = divmod(int(status.elapsed_s), 60)
    grid.add_row("trials", f"{status.done} / {status.total} built, {minutes}:{seconds:02d} elapsed")
    if status.running:
        grid.add_row("now", Text(f"{status.running}: {status.step}" if status.step
                                 else status.running))
    elif status.step:
        grid.add_row("now", Text(status.step))
    grid.add_row("best", Text(status.best))
    if status.front:
        grid.add_row("front", Text("\n".join(status.front)))
    return Group(grid)


def trial_line(record) -> str:
    """'trial 4 complete: int8 on onnxruntime, 0.018 ms ± 0.001, held-out 98.80 %, 11.5 KiB'."""
    from edgec.search.study import describe

    if record.measured:
        text = describe(record).partition(": ")[2]
        infeasible = "" if record.within_budget else " (infeasible)"
        return f"trial {record.number} {record.state}{infeasible}: {text}"
    return f"trial {record.number} {record.state}: {record.label()}: {record.attrs.get('error', '')}"


def _print_outcome(outcome) -> None:
    """The pick, why, the command that rebuilds it, and where the report is."""
    console.print(f"search {outcome.plan.study_name}: {outcome.stopped}", highlight=False)
    if outcome.pick is None:
        console.print("no feasible trial: nothing picked; raise --budget or add --trials",
                      style="yellow", highlight=False)
    else:
        from edgec.search.study import describe

        console.print(f"[bold]pick[/]: {escape(describe(outcome.pick.record))}", highlight=False)
        console.print(f"why: {outcome.pick.decision}", highlight=False, markup=False)
        if outcome.pick.test_top1 is not None:
            console.print(f"test top-1: {outcome.pick.test_top1:.2f} % (evaluation split)",
                          highlight=False, markup=False)
        console.print("rebuild (from the cache):", highlight=False)
        console.print(shlex.join(outcome.command), highlight=False, markup=False, soft_wrap=True)
    for path in outcome.reports:
        console.print(f"report: {path}", highlight=False, markup=False)
