"""The measurement protocol (MeasureSpec) and its statistics (Measurement)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edgec.errors import MeasureError
from edgec.runner import runner

HOT_C = 80.0  # most SoCs start to throttle near here (Raspberry Pi: 80-85 °C)
WARMED_C = 15.0  # a rise this large during one measurement means the timings drifted


def condition_warnings(before: dict[str, Any], after: dict[str, Any]) -> tuple[str, ...]:
    """Warnings about the board's state read before and after a measurement.

    ``before``/``after`` hold ``governor`` (str, '' when unknown), ``temp_c`` (float or None)
    and ``throttled`` (the Raspberry Pi firmware's hex flags, '' when unknown).
    """
    notes = []
    governors = {g for state in (before, after) for g in state.get("governor", "").split("/") if g}
    slow = sorted(governors - {"performance"})
    if slow:
        notes.append(f"CPU governor is {'/'.join(slow)!r}, not 'performance': "
                     f"latencies vary with the clock; set it on the board with `echo performance "
                     f"| sudo tee /sys/devices/system/cpu/cpu*/cpufreq/scaling_governor`")
    t0, t1 = before.get("temp_c"), after.get("temp_c")
    if t1 is not None and t1 >= HOT_C:
        notes.append(f"SoC temperature reached {t1:.1f} °C (>= {HOT_C:.0f}): the board may have "
                     f"throttled; add cooling or a cooldown between runs")
    elif t0 is not None and t1 is not None and t1 - t0 >= WARMED_C:
        notes.append(f"SoC warmed from {t0:.1f} to {t1:.1f} °C during the measurement")
    flags = after.get("throttled", "")
    if flags and int(flags, 16) & 0x6:
        notes.append(f"the board reports throttling (get_throttled={flags}): the clock was capped "
                     f"during the measurement; check power supply and cooling")
    return tuple(notes)


@dataclass(frozen=True)
class MeasureSpec:
    """Warm-up runs, then repeats until both ``repeat`` samples and ``min_time_s`` are reached."""

    warmup: int = 10
    repeat: int = 50
    min_time_s: float = 1.0
    threads: int = 1
    batch: int = 1
    data: str = ""  # npz of images to stream in order instead of one random input
    start: int = 0
    count: int = 0

    def __post_init__(self):
        if self.warmup < 0 or self.repeat < 1 or self.min_time_s < 0 or self.threads < 1:
            raise MeasureError(f"invalid measurement protocol {self}; need warmup >= 0, "
                               f"repeat >= 1, min_time_s >= 0, threads >= 1")

    def runner_args(self, mode: str = "measure") -> list[str]:
        """The runner's command line for this protocol (``measure-set``: per window)."""
        args = [mode, "--warmup", str(self.warmup), "--repeat", str(self.repeat),
                "--min-time", str(self.min_time_s), "--threads", str(self.threads),
                "--batch", str(self.batch)]
        if self.data:
            args += ["--data", self.data, "--start", str(self.start), "--count", str(self.count)]
        return args


@dataclass(frozen=True)
class Measurement:
    """Latency samples (ms) and their statistics, plus peak RSS and notes from the device."""

    samples_ms: tuple[float, ...]
    peak_rss_mb: float
    runtime: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.samples_ms:
            raise MeasureError("measurement has no samples; the runner produced none")

    def percentile(self, q: float) -> float:
        return runner.percentile(self.samples_ms, q)

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p90(self) -> float:
        return self.percentile(90)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    @property
    def mean(self) -> float:
        return runner.latency_summary(self.samples_ms)["mean_ms"]

    @property
    def ci95(self) -> float:
        """Half-width of the 95 % confidence interval of the mean (normal approximation)."""
        return runner.latency_summary(self.samples_ms)["ci95_ms"]

    def summary(self) -> dict[str, Any]:
        return {**runner.latency_summary(self.samples_ms), "peak_rss_mb": self.peak_rss_mb,
                "runtime": self.runtime, "warnings": list(self.warnings), **self.extra}

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "samples_ms": list(self.samples_ms), "summary": self.summary()}

    @classmethod
    def from_json(cls, data: dict[str, Any], from_cache: bool = False) -> Measurement:
        """The inverse of :meth:`to_json`; ``from_cache`` marks it in ``extra``."""
        extra = {**data.get("extra", {}), **({"from_cache": True} if from_cache else {})}
        return cls(tuple(data["samples_ms"]), data["peak_rss_mb"], data.get("runtime", {}),
                   tuple(data.get("warnings", ())), extra)

    @classmethod
    def from_runner(cls, result: dict[str, Any], warnings: tuple[str, ...] = ()) -> Measurement:
        extra = {k: v for k, v in result.items()
                 if k not in ("samples_ms", "peak_rss_mb", "runtime", "mode", "artifact",
                              "summary", "warnings")}
        return cls(tuple(result["samples_ms"]), result["peak_rss_mb"], result.get("runtime", {}),
                   (*warnings, *result.get("warnings", ()), *_oversubscribed(result)), extra)


T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306,
       10: 2.262}  # Student's t, two-sided 95 %, by the number of rounds (k - 1 degrees)


def across_rounds(rounds: list[Measurement]) -> dict[str, Any]:
    """Statistics over separate measurements of one artifact: the mean of their means, and a
    95 % interval from how much those means differ (Student's t), never narrower than the
    widest single window's. Samples inside one window are correlated (the clock, the cache,
    other load), so a window's own interval understates how far another run may land."""
    if not rounds:
        raise MeasureError("no measurement rounds to combine")
    means = [m.mean for m in rounds]
    k, mean = len(means), sum(means) / len(means)
    spread = 0.0
    if k > 1:
        sd = (sum((m - mean) ** 2 for m in means) / (k - 1)) ** 0.5
        spread = T95.get(k, 1.96) * sd / k ** 0.5
    samples = [s for m in rounds for s in m.samples_ms]
    return {"mean_ms": mean, "ci95_ms": max(spread, *(m.ci95 for m in rounds)),
            "p50_ms": runner.percentile(samples, 50), "n": len(samples), "rounds": k,
            "round_means_ms": means, "peak_rss_mb": max(m.peak_rss_mb for m in rounds)}


OVERSUBSCRIBED = 0.5  # cores busy beyond --threads that make a measurement suspect


def _oversubscribed(result: dict[str, Any]) -> tuple[str, ...]:
    """A warning when the runtime kept more cores busy than the threads it was given."""
    busy, threads = result.get("cores_busy"), result.get("threads")
    if busy is None or threads is None or busy <= threads + OVERSUBSCRIBED:
        return ()
    return (f"the runtime kept {busy:.2f} cores busy with --threads {threads}: this is not a "
            f"{threads}-thread latency (a thread pool the runner does not control)",)
