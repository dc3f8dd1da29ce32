"""``edgec latency sample|fit|predict``: the latency model of a board, learned from its profiles.

Results go to stdout; errors and skipped keys to stderr.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgec.cli_errors import fail
from edgec.errors import ConfigError, DataError, EdgecError

if TYPE_CHECKING:
    from edgec.latency import LatencyModel

latency_app = typer.Typer(no_args_is_help=True,
                          help="A latency model per board, fit on edgec's own profiles.")
console = Console()
errors = Console(stderr=True)
MODELS_DIR = Path("latency")


def model_path(device: str) -> Path:
    """Where ``edgec latency fit --device NAME`` writes by default: ``latency/NAME.json``."""
    from edgec.devices.inventory import NAME_RE

    if not NAME_RE.match(device):
        raise ConfigError(f"device name {device!r} is not a safe file name; give the name of "
                          f"the device (see `edgec devices list`) or of a target")
    return MODELS_DIR / f"{device}.json"


def _percent(value) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


def fit_table(model) -> Table:
    """Both candidates' leave-one-configuration-out errors for one key; the chosen one marked."""
    table = Table()
    for column in ("candidate", "LOO MAPE", "median APE", "within ±10 %", "Kendall τ", "chosen"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for candidate, loo in model.loo.items():
        if loo is None:
            table.add_row(candidate, "-", "-", "-", "-", "too few configurations")
            continue
        tau = loo["kendall_tau"]
        table.add_row(candidate, _percent(loo["mape"]), _percent(loo["median_ape"]),
                      _percent(loo["within_10"]), "-" if tau is None else f"{tau:.3f}",
                      "yes" if candidate == model.chosen else "")
    return table


@dataclass(frozen=True)
class KeyFit:
    """One key's fit: its model (fit without the first hold-out draw's configurations), the
    errors of each hold-out draw (empty without a hold-out; see
    :func:`edgec.latency.fit.held_out_draws`) and the board's repeatability over all of the
    key's configurations measured more than once."""

    model: LatencyModel
    held_out: tuple[dict, ...]
    repeatability: dict | None


def fit_device(device: str, profiles: Path, holdout: int = 0, draws: int = 1) -> list[KeyFit]:
    """Fit every key of the device's profiles. With ``holdout``, ``draws`` times (seeds 0, 1,
    ...) that many configurations of each key are left out, the model fit without them and
    predicted on them. Keys with too few configurations, and draws the model cannot predict,
    are skipped with a line on stderr; a DataError when nothing could be fit."""
    from edgec.latency import fit, samples_from_profiles
    from edgec.latency.fit import held_out_draws, repeatability

    if draws < 1 or (draws > 1 and not holdout):
        raise ConfigError(f"--draws {draws}: give 1 or more draws, and more than 1 only with "
                          f"--holdout N")
    stale: list[str] = []
    grouped = samples_from_profiles(profiles, device, stale)
    if stale:
        errors.print(f"skipped {len(stale)} record(s) with latency features of an older format "
                     f"(first: {escape(stale[0])}); `edgec latency sample` measures them again",
                     highlight=False, soft_wrap=True)
    if not grouped:
        raise DataError(f"no profile of {device} under {profiles} carries latency features; "
                        f"measure configurations on it first (edgec profile ARTIFACT --device "
                        f"{device}, or edgec build --device {device})")
    fitted = []
    for key, samples in grouped.items():
        try:
            model, reports, refused = (held_out_draws(samples, key, holdout, draws) if holdout
                                       else (fit(samples, key), [], []))
        except DataError as exc:
            errors.print(f"skipped: {escape(str(exc))}", highlight=False, soft_wrap=True)
            continue
        for reason in refused:
            errors.print(f"left out: {escape(reason)}", highlight=False, soft_wrap=True)
        fitted.append(KeyFit(model, tuple(reports), repeatability(samples)))
    if not fitted:
        raise DataError(f"no key of {device} has enough measured configurations to fit; "
                        f"measure more and fit again")
    return fitted


def _errors_text(report: dict) -> str:
    tau = report["kendall_tau"]
    return (f"MAPE {_percent(report['mape'])}, median {_percent(report['median_ape'])}, within "
            f"±10 % {_percent(report['within_10'])}, Kendall τ "
            f"{'-' if tau is None else f'{tau:.3f}'}")


def repeatability_line(report: dict | None) -> str:
    """How well the board pins a configuration's latency down (the floor for any model)."""
    if report is None:
        return ("repeatability: fewer than 2 configurations measured twice (sample with "
                "--rounds 2 or more to see the board's own noise)")
    halves = report["halves"]
    return (f"repeatability over {report['n']} configurations measured 2+ times: their mean "
            f"latencies known to ±{_percent(report['mean_se'])} (median standard error; a "
            f"perfect model would be off by a median {_percent(report['floor_median_ape'])}); "
            f"alternate halves of their measurements against each other: {_errors_text(halves)}; "
            f"after one common factor (x{report['halves_factor']:.3f}) between the halves: "
            f"median {_percent(report['halves_scaled']['median_ape'])}")


def held_out_line(report: dict) -> str:
    line = f"held out (draw {report['draw']}): {report['n']} configurations, {_errors_text(report)}"
    floor = report.get("repeatability")
    if floor is not None:
        line += (f"; a perfect model, against these {floor['n']} configurations measured 2+ "
                 f"times: median {_percent(floor['floor_median_ape'])}")
    return line


def draws_line(reports: tuple[dict, ...]) -> str:
    """Held-out errors over several draws: one draw of a few configurations is itself noisy."""
    medians = [r["median_ape"] for r in reports]
    taus = [r["kendall_tau"] for r in reports if r["kendall_tau"] is not None]
    tau_text = (f"Kendall τ median {median(taus):.3f} (from {min(taus):.3f} to "
                f"{max(taus):.3f})" if taus else "Kendall τ -")
    return (f"over {len(reports)} hold-out draws of {reports[0]['n']} configurations: median "
            f"error median {_percent(median(medians))} (from {_percent(min(medians))} "
            f"to {_percent(max(medians))}), {tau_text}")


@latency_app.command("fit")
def fit_command(
    device: str = typer.Option(..., help="device (or target) whose profiles to learn from"),
    profiles: Path = typer.Option(Path("profiles"), help="profile database folder"),
    out: Path = typer.Option(None, help="model file (default: latency/DEVICE.json)"),
    holdout: int = typer.Option(0, help="configurations per key left out of the fit and "
                                        "predicted (the saved model is fit without them)"),
    draws: int = typer.Option(1, help="hold-out draws: each leaves out another --holdout "
                                      "configurations, fits again and predicts them"),
):
    """Fit a latency model per key of the device's profiles; write latency/DEVICE.json.

    One model per (backend, runtime, threads, governor); prints its candidates' LOO errors, the
    board's repeatability and, with --holdout, its errors on configurations it was not fit on
    (with --draws K, on K draws of them, summarised)."""
    from edgec.latency import save

    try:
        path = out or model_path(device)
        model_path(device)  # the device name is a folder of the profile database too
        fitted = fit_device(device, profiles, holdout, draws)
        save(path, [key_fit.model for key_fit in fitted])
    except EdgecError as exc:
        fail(exc)
    for key_fit in fitted:
        model = key_fit.model
        console.print(f"{model.key.describe()}: {model.samples} samples, {model.configurations} "
                      f"configurations", highlight=False, markup=False, soft_wrap=True)
        console.print(fit_table(model))
        held = key_fit.held_out
        for line in (repeatability_line(key_fit.repeatability),
                     *([held_out_line(held[0])] if held else []),
                     *([draws_line(held)] if len(held) > 1 else [])):
            console.print(line, highlight=False, markup=False, soft_wrap=True)
    console.print(f"wrote {len(fitted)} model(s) to {path}", highlight=False, markup=False,
                  soft_wrap=True)


@latency_app.command("predict")
def predict_command(
    artifact: Path = typer.Argument(..., help="artifact directory (edgec build output)"),
    device: str = typer.Option(..., help="device (or target) the model was fit for"),
    model: Path = typer.Option(None, help="model file (default: latency/DEVICE.json)"),
    threads: int = typer.Option(1, help="threads the artifact would run with"),
    runtime: str = typer.Option(None, help="runtime versions, e.g. onnxruntime=1.31.1 (only "
                                           "when the file holds several)"),
    governor: str = typer.Option(None, help="CPU governor (only when the file holds several)"),
):
    """Predict the artifact's mean latency on the device, and say which model predicted it."""
    from edgec.latency import artifact_features, load, select_model

    try:
        models = load(model or model_path(device))
        features = artifact_features(artifact, threads)
        chosen = select_model(models, device, features["backend"], threads, runtime, governor)
        latency_ms = chosen.predict(features, chosen.key)
    except EdgecError as exc:
        fail(exc)
    loo = chosen.loo[chosen.chosen]
    console.print(f"{latency_ms:.4f} ms predicted mean latency of {artifact} on {device}",
                  highlight=False, markup=False, soft_wrap=True)
    console.print(f"by the {chosen.chosen} model of {chosen.key.describe()} (fit on "
                  f"{chosen.samples} profiles, {chosen.configurations} configurations, profile "
                  f"set {chosen.profile_set[:12]}; leave-one-out median error "
                  f"{_percent(loo['median_ape'])})", highlight=False, markup=False, soft_wrap=True)


@latency_app.command("sample")
def sample_command(
    model: list[Path] = typer.Option(..., help="model TOML (factory/checkpoint/input/data); "
                                                "repeatable: the models' structures are "
                                                "measured together"),
    device: str = typer.Option("local", help="device to measure on (devices/NAME.toml)"),
    target: str = typer.Option("local", help="target the configurations are compiled for"),
    n: int = typer.Option(40, help="configurations per backend (a larger n extends a smaller)"),
    backend: list[str] = typer.Option(["onnxruntime"], help="backends whose structures to "
                                                            "sample (repeatable): onnxruntime, "
                                                            "executorch"),
    multiple: list[int] = typer.Option([8, 16], help="channel multiples of pruned widths"),
    threads: list[int] = typer.Option([1], help="runtime threads (repeatable)"),
    windows: int = typer.Option(20, help="windows per structure in one measurement set "
                                         "(all structures interleaved in one process)"),
    warmup: int = typer.Option(3, help="untimed runs at the start of each window"),
    repeat: int = typer.Option(5, help="minimum timed runs per window"),
    min_time: float = typer.Option(0.1, help="minimum seconds per window"),
    profiles: Path = typer.Option(Path("profiles"), help="profile database folder"),
    seed: int = typer.Option(0, help="the order the grid is drawn in"),
    rounds: int = typer.Option(1, help="measurement sets per configuration (2 or more: the "
                                       "fit states how far the board agrees with itself)"),
):
    """Measure N configurations per backend (MAC cuts x channel multiples x int8 schemes x
    threads) built without training and record them with their features; resumes where it
    stopped. The structures are measured together: one runner process, short windows of each
    in turn, each loaded afresh, the machine's drift over the run taken out."""
    from edgec.latency.sample import SampleRequest, run_sample
    from edgec.measure import MeasureSpec

    try:
        request = SampleRequest(tuple(model), device, target, n, tuple(multiple),
                                tuple(threads), MeasureSpec(warmup=warmup, repeat=repeat,
                                                            min_time_s=min_time),
                                profiles, seed, rounds, tuple(backend), windows)
        outcome = run_sample(request, lambda message: errors.print(message, highlight=False,
                                                                   markup=False))
    except EdgecError as exc:
        fail(exc)
    console.print(f"made {len(outcome.measured)} measurement(s), {len(outcome.skipped)} "
                  f"found in {profiles}/{device}, {len(outcome.unbuildable)} not buildable; fit "
                  f"with `edgec latency fit --device {device}`",
                  highlight=False, markup=False, soft_wrap=True)
