"""``edgec devices add|list|check|remove`` and ``edgec profile ARTIFACT --device NAME``.

Results go to stdout; errors, problems and warnings to stderr.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgec.cli_errors import fail, print_error
from edgec.errors import EdgecError

devices_app = typer.Typer(no_args_is_help=True,
                          help="The board inventory: devices/*.toml (never a secret inside).")
console = Console()
errors = Console(stderr=True)
DIR_OPTION = typer.Option(None, "--devices-dir", envvar="EDGEC_DEVICES_DIR",
                          help="inventory folder (default: ./devices)")
ACCEPT_OPTION = typer.Option(False, "--accept-new-host-key",
                             help="record an unknown host key in known_hosts (never a changed one)")


@devices_app.command("add")
def add(
    name: str = typer.Argument(..., help="device name (file devices/NAME.toml)"),
    host: str = typer.Option(..., help="board host name or address"),
    target: str = typer.Option(..., help="target the board runs (see `edgec targets`)"),
    port: int = typer.Option(22),
    user: str = typer.Option("", help="login user (default: your user name)"),
    key: str = typer.Option("", help="private key *path* (default: the SSH agent)"),
    known_hosts: str = typer.Option("~/.ssh/known_hosts", help="known_hosts file (a relative "
                                    "path is relative to the current directory)"),
    workdir: str = typer.Option(".cache/edgec", help="cache folder on the board"),
    python: str = typer.Option("python3", help="Python on the board with numpy + runtime"),
    tag: list[str] = typer.Option([], help="free-form tag (repeatable)"),
    force: bool = typer.Option(False, help="overwrite an existing device file"),
    devices_dir: Path = DIR_OPTION,
):
    """Add a board to the inventory (checks the target name; does not connect)."""
    from edgec.devices.inventory import DeviceConfig, save_device
    from edgec.targets import load_target

    try:
        load_target(target)
        config = _config(DeviceConfig, name=name, target=target, host=host, port=port, user=user,
                         key=_local_path("key", key), workdir=workdir, python=python,
                         known_hosts=_local_path("known_hosts", known_hosts), tags=tuple(tag))
        path = save_device(config, devices_dir, overwrite=force)
    except EdgecError as exc:
        fail(exc)
    console.print(f"added {name} → {path}; check it with `edgec devices check {name}`")


def _local_path(label: str, value: str) -> str:
    """A path given on the command line, absolute against the current directory (a ``~`` path
    stays as written); key material pasted instead of a path is refused before anything else."""
    from edgec.devices.inventory import check_local_path
    from edgec.errors import ConfigError

    try:
        check_local_path(label, value)
    except ValueError as exc:
        raise ConfigError(f"--{label.replace('_', '-')}: {exc}") from exc
    if not value or value.startswith("~"):
        return value
    return str(Path(value).resolve())


def _config(cls, **values):
    from edgec.errors import ConfigError

    try:
        return cls(**values)
    except ValueError as exc:
        raise ConfigError(f"device {values.get('name')!r}: {exc}") from exc


@devices_app.command("list")
def list_devices(devices_dir: Path = DIR_OPTION):
    """List the boards of the inventory; a bad device file is reported and the others listed."""
    from edgec.devices.inventory import load_inventory

    good, bad = load_inventory(devices_dir)
    table = Table(title="devices")
    for column in ("name", "target", "login", "workdir", "tags"):
        table.add_column(column)
    for d in good:
        table.add_row(d.name, d.target, d.login, d.workdir, ",".join(d.tags))
    console.print(table)
    for exc in bad:
        print_error(exc)
    if bad:
        raise typer.Exit(1)


@devices_app.command("check")
def check(name: str, accept_new_host_key: bool = ACCEPT_OPTION, devices_dir: Path = DIR_OPTION):
    """Connect; report arch, OS, Python, runtimes, governor, temperature, disk, memory, match."""
    from edgec.devices.inventory import load_device
    from edgec.devices.probe import readiness_problems, target_mismatches
    from edgec.devices.ssh import SSHDevice
    from edgec.targets import load_target

    try:
        config = load_device(name, devices_dir)
        target = load_target(config.target)
        with SSHDevice(config, accept_new_host_key=accept_new_host_key) as device:
            facts = device.facts(target.requirements)
    except EdgecError as exc:
        fail(exc)
    table = Table(title=f"{name} ({config.login})")
    table.add_column("fact")
    table.add_column("value")
    for key, value in facts.items():
        shown = ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else value
        table.add_row(key, "-" if shown in ("", None) else str(shown))
    console.print(table)
    mismatches = target_mismatches(target, facts, config.python)
    unready = readiness_problems(facts, config.workdir)
    for heading, problems in ((f"does not match target {target.name}", mismatches),
                              ("not ready", unready)):
        for problem in problems:
            errors.print(f"[bold red]{heading}:[/] {escape(problem)}", highlight=False,
                         soft_wrap=True)
    if mismatches or unready:
        raise typer.Exit(1)
    console.print(f"matches target {target.name}")
    _cpu_note(target, facts.get("cpu"))


def _cpu_note(target, board_cpu) -> None:
    """Say so when the board's int8 kernels are not the ones its target declares."""
    from edgec.cpu import target_cpu

    declared = target_cpu(target)
    if board_cpu and target.cpu != "native" and board_cpu["int8_path"] != declared.int8_path:
        console.print(f"note: the board runs {board_cpu['int8_path']} int8 kernels, target "
                      f"{target.name} declares {declared.int8_path}; `edgec build --device` "
                      f"chooses the int8 scheme for the board", highlight=False, markup=False)


@devices_app.command("remove")
def remove(name: str, devices_dir: Path = DIR_OPTION):
    """Remove a board from the inventory (its cache on the board stays)."""
    from edgec.devices.inventory import remove_device

    try:
        path = remove_device(name, devices_dir)
    except EdgecError as exc:
        fail(exc)
    console.print(f"removed {path}")


def profile(
    artifact: Path = typer.Argument(..., help="artifact directory (with manifest.json)"),
    device: str = typer.Option("local", help="device name from devices/, or 'local'"),
    repeat: int = typer.Option(50, help="minimum timed runs"),
    min_time: float = typer.Option(1.0, help="minimum seconds of timed runs"),
    warmup: int = typer.Option(10, help="untimed runs first"),
    threads: int = typer.Option(1, help="runtime threads"),
    profiles: Path = typer.Option(Path("profiles"), help="where profiles/<device>/*.jsonl go"),
    accept_new_host_key: bool = ACCEPT_OPTION,
    devices_dir: Path = DIR_OPTION,
):
    """Measure ARTIFACT on DEVICE and append the result to profiles/<device>/<date>.jsonl."""
    from edgec.artifact import read_manifest
    from edgec.devices import open_device
    from edgec.latency.features import profile_features
    from edgec.measure import MeasureSpec
    from edgec.profiles import ProfileDB

    try:
        manifest = read_manifest(artifact)
        spec = MeasureSpec(warmup=warmup, repeat=repeat, min_time_s=min_time, threads=threads)
        board = open_device(device, devices_dir, accept_new_host_key)
        try:
            measurement = board.measure(artifact, spec)
        finally:
            getattr(board, "close", lambda: None)()
        path = ProfileDB(profiles).record(board.name, manifest, spec, measurement,
                                          profile_features(artifact, threads))
    except EdgecError as exc:
        fail(exc)
    table = Table(title=f"{manifest['name']} on {board.name}")
    for column in ("p50 ms", "p90 ms", "p99 ms", "mean ms (95 % CI)", "n", "peak RSS MB"):
        table.add_column(column, justify="right")
    m = measurement
    table.add_row(f"{m.p50:.3f}", f"{m.p90:.3f}", f"{m.p99:.3f}", f"{m.mean:.3f} ± {m.ci95:.3f}",
                  str(len(m.samples_ms)), f"{m.peak_rss_mb:.1f}")
    console.print(table)
    for warning in m.warnings:
        errors.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    console.print(f"recorded in {path}")
