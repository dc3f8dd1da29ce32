"""Many workers on one study in a real PostgreSQL server (a throwaway cluster, tests/pg.py): two
local workers complete a digits search without building a configuration twice; two workers in
two network namespaces ("machines") share the server and one SSH board, one is killed with
SIGKILL mid-trial, and the other retries its trial and finishes the study."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests import sshd
from tests.conftest import EXAMPLES
from tests.pg import postgres  # noqa: F401  (the session's PostgreSQL server, a fixture)

DIGITS = EXAMPLES / "digits" / "model.toml"
TRIALS = 6


def _request(out: Path, storage: str, study: str, **changes):
    from edgec.measure import MeasureSpec
    from edgec.search.storage import Heartbeat
    from edgec.search.study import SearchRequest

    request = SearchRequest(DIGITS, trials=TRIALS, out=out, study=study, storage=storage,
                            recipes=("fp32", "int8"), backends=("onnxruntime",),
                            overrides={"budget.holdout": 250},
                            measure=MeasureSpec(repeat=20, min_time_s=0.05),
                            heartbeat=Heartbeat(interval_s=1, grace_s=6))
    return replace(request, **changes)


def _config(record) -> tuple[str, str, str]:
    return record.recipe, record.backend, json.dumps(record.overrides, sort_keys=True)


def _assert_built_once(records) -> list:
    """The built trials: TRIALS of them, no configuration twice; every repeat names a built
    trial of its own configuration."""
    built = [r for r in records if r.counts]
    assert len(built) == TRIALS, [(r.number, r.state, r.attrs.get("error")) for r in records]
    assert len({_config(r) for r in built}) == TRIALS, [_config(r) for r in built]
    by_number = {r.number: r for r in records}
    for record in (r for r in records if "repeat_of" in r.attrs):
        assert _config(by_number[record.attrs["repeat_of"]]) == _config(record)
    return built


def test_two_workers_build_each_configuration_once(postgres, tmp_path, monkeypatch):  # noqa: F811
    """`edgec search --workers 2` on a PostgreSQL study: both workers build, at the same time,
    no configuration twice; the coordinator picks and writes the report, and builds again the
    front's artifacts that are not on its machine."""
    import optuna
    from typer.testing import CliRunner

    from edgec.cli import app
    from edgec.search.study import trial_records
    from edgec.search.workers import search

    monkeypatch.setenv("EDGEC_CACHE", str(tmp_path / "cache"))
    url, out = postgres.create_database("two_workers"), tmp_path / "out"
    started = time.monotonic()
    result = CliRunner().invoke(app, [
        "search", str(DIGITS), "--trials", str(TRIALS), "--recipe", "fp32", "--recipe", "int8",
        "--backend", "onnxruntime", "--holdout", "250", "--repeat", "20", "--min-time", "0.05",
        "--out", str(out), "--study", "two", "--storage", url, "--workers", "2"])
    seconds = time.monotonic() - started
    logs = sorted((out / "workers").glob("worker-*.log"))
    assert result.exit_code == 0, result.output + "".join(log.read_text()[-3000:] for log in logs)
    assert seconds < 150, f"two workers took {seconds:.0f} s for {TRIALS} digits trials"
    assert f"the study holds {TRIALS} built trials" in result.output and "pick" in result.output
    assert (out / "report.html").is_file() and postgres.password not in result.output

    study = optuna.load_study(study_name="two", storage=url)
    records = trial_records(study)
    built = _assert_built_once(records)
    assert {r.state for r in records} <= {"complete", "failed", "over budget"}
    assert len({r.attrs["worker"] for r in built}) == 2  # both workers built trials...
    assert _overlap(study)  # ...at the same time
    assert len(logs) == 2 and all("stopped: the study holds" in log.read_text() for log in logs)
    assert "pick" in study.user_attrs
    stored = study.user_attrs["request"]  # what a worker joining from elsewhere reads
    assert stored["recipes"] == ["fp32", "int8"] and stored["overrides"] == {"budget.holdout": 250}
    assert stored["model"] == str(DIGITS) and stored["measure"]["repeat"] == 20
    assert postgres.password not in json.dumps(stored) and "storage" not in stored

    # a pick among artifacts built on other machines: the front's are built here again
    front = [r for r in records if r.number in {t.number for t in study.best_trials}]
    gone = Path(front[0].attrs["artifact"])
    shutil.rmtree(gone)
    again = search(_request(out, url, "two"), workers=1)  # the study is complete: it only picks
    assert again.new_trials == () and again.pick is not None
    rebuilt = next(r for r in again.records if r.number == front[0].number)
    assert Path(rebuilt.attrs["artifact"]).is_dir()  # built here again (from the cache: the
    # same folder, unless a step ran again and its report's seconds changed the hash)
    assert all(Path(r.attrs["artifact"]).is_dir() for r in again.records if r.state == "complete")


def _overlap(study) -> bool:
    """Whether two trials built by different workers ran at the same time."""
    import optuna

    spans = [(t.datetime_start, t.datetime_complete, t.user_attrs["worker"]) for t in study.trials
             if t.state == optuna.trial.TrialState.COMPLETE and "repeat_of" not in t.user_attrs]
    return any(a[2] != b[2] and a[0] < b[1] and b[0] < a[1] for a in spans for b in spans)


def test_a_study_keeps_the_request_a_worker_needs(tmp_path):
    from edgec.errors import SearchError
    from edgec.search.storage import request_attrs
    from edgec.search.workers import request_from_attrs

    request = _request(tmp_path / "out", "postgresql://u:secret@db/edgec", "kept",
                       timeout_s=60.0, data=tmp_path / "data.toml")
    stored = json.loads(json.dumps(request_attrs(request)))  # as the study's user attribute
    assert "secret" not in json.dumps(stored) and "timeout_s" not in stored
    assert request_from_attrs(stored) == replace(request, storage=None, timeout_s=None)
    with pytest.raises(SearchError, match="unknown here"):
        request_from_attrs({**stored, "from_the_future": 1}, "kept")


def test_workers_refuse_sqlite(tmp_path):
    from typer.testing import CliRunner

    from edgec.cli import app

    many = CliRunner().invoke(app, ["search", str(DIGITS), "--workers", "2", "--out",
                                    str(tmp_path)])
    assert many.exit_code == 2 and "needs a server database" in many.output
    joined = CliRunner().invoke(app, ["search-worker", "--study", "s", "--storage",
                                      f"sqlite:///{tmp_path / 's.db'}"])
    assert joined.exit_code == 2 and "server database" in joined.output


class Machine(sshd.Namespace):
    """A network namespace as another machine: its own /30 in 10.77.250.0/24, a default route
    to this host (so it reaches the host's addresses on the other machines' links too)."""

    def __init__(self, index: int):
        super().__init__()
        pid = os.getpid()
        self.name = f"edgec-pg-{pid}-{index}"
        self.outer, self.inner = f"vpg{pid % 10000}{index}a", f"vpg{pid % 10000}{index}b"
        block = 4 * ((pid % 30) * 2 + index)
        self.host_ip, self.board_ip = f"10.77.250.{block + 1}", f"10.77.250.{block + 2}"

    def create(self) -> Machine:
        super().create()
        subprocess.run(["ip", "netns", "exec", self.name, "ip", "route", "add", "default", "via",
                        self.host_ip], check=True, capture_output=True)
        return self


@pytest.fixture
def two_machines():
    for reason in (sshd.missing_reason(), sshd.Namespace.missing_reason()):
        if reason:
            pytest.skip(reason)
    machines = []
    try:
        for index in range(2):
            machines.append(Machine(index))
            machines[-1].create()
        yield machines
    finally:
        for machine in machines:
            machine.delete()


def _worker(machine: Machine, url: str, study: str, env: dict, cwd: Path, log: Path):
    with open(log, "w") as out:
        return subprocess.Popen(["ip", "netns", "exec", machine.name, sys.executable, "-m",
                                 "edgec.cli", "search-worker", "--study", study],
                                env={**env, "EDGEC_SEARCH_STORAGE": url}, cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT)


def test_a_killed_worker_on_another_machine_has_its_trial_retried(
        postgres, two_machines, tmp_path):  # noqa: F811
    """Two `edgec search-worker` processes in two namespaces, one PostgreSQL study and one SSH
    board on this host; SIGKILL one while its trial builds: the other fails that trial by its
    silent heartbeat, builds its configuration again and finishes the study."""
    import optuna

    from edgec.search.study import open_study, plan_search, trial_records

    first = two_machines[0]
    postgres.listen(first.host_ip)  # the server's address on the "machines'" network
    board = sshd.SSHServer(tmp_path / "sshd", host=first.host_ip).start()
    try:
        devices = tmp_path / "devices"
        devices.mkdir()
        config = sshd.board_config(board, tmp_path / "board", name="loopback")
        (devices / "loopback.toml").write_text(config.to_toml())
        env = {**os.environ, "EDGEC_CACHE": str(tmp_path / "cache"),
               "EDGEC_DEVICES_DIR": str(devices)}
        url = postgres.create_database("killed")
        open_study(plan_search(_request(tmp_path / "out", url, "killed", device="loopback")))
        remote = url.replace("@127.0.0.1:", f"@{first.host_ip}:")
        started = time.monotonic()
        workers = [_worker(machine, remote, "killed", env, tmp_path, tmp_path / f"w{i}.log")
                   for i, machine in enumerate(two_machines)]
        try:
            victim, killed = _kill_one_mid_trial(url, workers, tmp_path)
            survivor = next(w for w in workers if w is not victim)
            try:
                survivor.wait(timeout=170 - (time.monotonic() - started))
            except subprocess.TimeoutExpired:
                pytest.fail(f"the surviving worker did not finish:\n{_logs(tmp_path)}")
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
                    worker.wait()
        seconds = time.monotonic() - started
    finally:
        board.stop()
    assert survivor.returncode == 0, _logs(tmp_path)
    assert victim.returncode == -signal.SIGKILL
    assert seconds < 170, f"the killed-worker search took {seconds:.0f} s"

    study = optuna.load_study(study_name="killed", storage=url)
    records = trial_records(study)
    built = _assert_built_once(records)
    assert [r.number for r in records if r.state == "interrupted"] == [killed.number]
    # its configuration was built again after it: by its retry, or by a trial that had been
    # waiting for it (the retry then repeats that one, or is still queued if the study was
    # complete first); every other trial is complete or failed
    config = _config(next(r for r in records if r.number == killed.number))
    [retry] = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    [builder] = [r for r in built if _config(r) == config]
    assert builder.number > killed.number
    if builder.number != retry.number:
        assert "waits_for" in builder.attrs, builder.attrs
        assert (retry.user_attrs.get("repeat_of") == builder.number
                or retry.state == optuna.trial.TrialState.WAITING)
    for trial in study.trials:
        assert trial.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL) \
            or trial.number == retry.number
    for record in (r for r in built if r.state == "complete"):  # measured on the shared board
        profile = json.loads(Path(record.attrs["artifact"], "profile.json").read_text())
        assert profile["device"] == "loopback"


def _kill_one_mid_trial(url: str, workers: list[subprocess.Popen], tmp_path: Path):
    """SIGKILL the worker whose claimed trial is running once a trial is complete; (the killed
    process, the trial it ran)."""
    import optuna

    pids = {worker.pid: worker for worker in workers}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(worker.poll() is not None for worker in workers):
            break
        try:
            trials = optuna.load_study(study_name="killed", storage=url).trials
        except KeyError:
            trials = []
        complete = any(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING
                   and "recipe" in t.user_attrs and "worker" in t.user_attrs]
        if complete and running:
            pid = int(running[0].user_attrs["worker"].rsplit(":", 1)[1])
            victim = pids[pid]  # `ip netns exec` runs the worker in its own process
            os.kill(pid, signal.SIGKILL)
            victim.wait()
            return victim, running[0]
        time.sleep(0.2)
    pytest.fail(f"no trial was running mid-search to kill its worker:\n{_logs(tmp_path)}")


def _logs(folder: Path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(folder.glob("w*.log")))
