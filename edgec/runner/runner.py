#!/usr/bin/env python3
"""edgec artifact runner: load the model next to this file, measure or evaluate it, print JSON.

Needs only the Python standard library, numpy and the artifact's runtime (onnxruntime, tvm).
Usage:
  python runner.py cpu
  python runner.py measure [--warmup 10] [--repeat 50] [--min-time 1.0] [--threads 1]
                           [--batch 1] [--data images.npz]
  python runner.py eval --data images.npz [--start 0] [--count 0] [--batch 100]
  python runner.py predict IMAGE.png|DIR|images.npz|images.npy [--top 3]
  python runner.py time-stages --data images.npz [--repeat 50] [--rounds 5] [--warmup 10]
                               (in a timing bundle, see time_stages and edgec/stage_timing.py)
  python runner.py measure-set [--rounds 5] [--warmup 10] [--repeat 50] [--min-time 1.0] ...
                               (in a measurement set, see measure_set and edgec/measure_set.py)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import resource
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def preprocess(images, spec):
    """uint8 NHWC images to normalised float NCHW, per the manifest's input spec."""
    x = images.astype(np.float32) * np.float32(spec["scale"])
    if spec["mean"]:
        x = (x - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(spec["dtype"])


# ----- the CPU, as the int8 kernels see it ------------------------------------------------------
# /proc/cpuinfo flag -> numpy's run-time CPU feature (CPUID / HWCAP, which emulators report
# truthfully while /proc/cpuinfo may be the host's); None: only /proc/cpuinfo knows it.
INT8_FEATURES = {"avx2": "AVX2", "avx512f": "AVX512F", "avx512bw": "AVX512BW",
                 "avx512_vnni": "AVX512VNNI", "avx_vnni": None, "amx_int8": None,
                 "asimd": "ASIMD", "asimddp": "ASIMDDP", "i8mm": None, "sve": "SVE"}
# int8 kernel families; on x86 without VNNI, u8 x s8 products are summed in pairs into int16
# (VPMADDUBSW), which saturates
SATURATING_U8S8_PATHS = ("x86-avx2", "x86-avx512bw", "x86-sse")
ARM_PARTS = {"0xd03": "Cortex-A53", "0xd05": "Cortex-A55", "0xd08": "Cortex-A72",
             "0xd0b": "Cortex-A76", "0xd41": "Cortex-A78", "0xd42": "Cortex-A78AE",
             "0xd0c": "Neoverse-N1", "0xd40": "Neoverse-V1", "0xd4f": "Neoverse-V2"}
ISA_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "armv7l": "armv7", "armv8l": "armv7"}


def int8_path(arch, features):
    """The int8 kernel family a CPU with ``features`` runs (ONNX Runtime's MLAS dispatch)."""
    features = set(features)
    if arch == "x86_64":
        if features & {"avx512_vnni", "avx_vnni", "amx_int8"}:
            return "x86-vnni"
        if "avx512bw" in features:
            return "x86-avx512bw"
        return "x86-avx2" if "avx2" in features else "x86-sse"
    if arch == "aarch64":
        if "i8mm" in features:
            return "arm64-i8mm"
        return "arm64-dotprod" if "asimddp" in features else "arm64-neon"
    return arch


def u8s8_saturates(scheme, path):
    """Whether int8 scheme ``scheme`` (by name) can saturate on the kernels of ``path``."""
    return scheme == "u8s8" and path in SATURATING_U8S8_PATHS


def parse_cpuinfo(text, arch):
    """(model name, set of flags) from /proc/cpuinfo text (x86 'flags', Arm 'Features'); an
    emulator may show the host's text, so only the fields of ``arch``'s own kind count."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    if arch == "x86_64":
        return fields.get("model name", ""), set(fields.get("flags", "").split())
    part = fields.get("cpu part", "")
    model = ARM_PARTS.get(part) or (f"Arm part {part}" if part else "")
    return model, set(fields.get("features", "").split())


def runtime_cpu_features():
    """numpy's run-time CPU feature table, or None where this numpy has none."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__
        except ImportError:
            return None
    return __cpu_features__


def cpu_info(cpuinfo_text=None, machine=None, detected=None):
    """This CPU: {'arch', 'model', 'features' (the int8-relevant ones), 'int8_path'}.

    A feature numpy detects at run time is taken from numpy; the others from /proc/cpuinfo, but
    only when it agrees with numpy on every feature both know: an emulator (qemu-x86_64 -cpu
    Haswell on an AMX host) shows the host's /proc/cpuinfo, whose avx_vnni is not the CPU's."""
    if cpuinfo_text is None:
        try:
            cpuinfo_text = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo_text = ""
    machine = machine or platform.machine()
    arch = ISA_ALIASES.get(machine, machine)
    detected = runtime_cpu_features() if detected is None else detected
    model, flags = parse_cpuinfo(cpuinfo_text, arch)
    known = {flag: bool(detected[key]) for flag, key in INT8_FEATURES.items()
             if detected and key in detected}
    host_text = any(present != (flag in flags) for flag, present in known.items())
    features = sorted(flag for flag in INT8_FEATURES
                      if known.get(flag, flag in flags and not host_text))
    return {"arch": arch, "model": model or f"{arch} (model unknown)",
            "features": features, "int8_path": int8_path(arch, features)}


def int8_path_warning(manifest, cpu):
    """A warning when this CPU's int8 kernels differ from those the accuracy was measured with."""
    scheme = manifest.get("int8", {}).get("scheme")
    measured = manifest.get("accuracy", {}).get("measured_on", {}).get("cpu")
    if not scheme or not measured or measured["int8_path"] == cpu["int8_path"]:
        return None
    saturates = [path for path in (measured["int8_path"], cpu["int8_path"])
                 if u8s8_saturates(scheme, path)]
    effect = ("this scheme's int16 sums saturate on " + " and ".join(saturates)
              + ": expect a different top-1" if saturates else "results may differ in rounding")
    return (f"int8 accuracy {manifest['accuracy'].get('top1', float('nan')) * 100:.2f} % was "
            f"measured on {measured['model']} ({measured['int8_path']}); this CPU is "
            f"{cpu['model']} ({cpu['int8_path']}), scheme {scheme}: {effect}; run "
            f"`python runner.py eval --data test.npz` here to measure it")


ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
              "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def ort_session(model, threads=1, optimization="all", providers=("CPUExecutionProvider",),
                profile_prefix="", optimized_path="", quiet=False):
    """The one place an ONNX Runtime session is made, here and in edgec on the host.

    ``model``: a path or the serialised model (bytes). ``threads`` intra-op threads, one
    inter-op thread, no spinning between runs. ``optimization``: a graph optimisation level of
    ``ORT_LEVELS``; ``providers``: in order of preference; ``profile_prefix``: turn on ORT's
    profiler, its JSON written under that prefix; ``optimized_path``: save the optimised graph
    there; ``quiet``: log errors only."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                               ORT_LEVELS[optimization])
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    if optimized_path:
        options.optimized_model_filepath = str(optimized_path)
    if quiet:
        options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=list(providers))


def load_onnxruntime(root, files, threads):
    import onnxruntime as ort

    session = ort_session(root / files[0], threads)
    name = session.get_inputs()[0].name

    def predict(x):
        return session.run(None, {name: x})[0]

    return predict, {"onnxruntime": ort.__version__}


def load_tvm(root, files, threads):
    """A TVM Relax VM over model.so (batch fixed at compile time: larger batches are looped)."""
    import os

    os.environ.setdefault("TVM_NUM_THREADS", str(threads))
    import tvm
    from tvm.runtime.vm import VirtualMachine

    entry = json.loads((root / "manifest.json").read_text())["entry"]
    device = tvm.cuda() if entry.get("device") == "cuda" else tvm.cpu()
    vm = VirtualMachine(tvm.runtime.load_module(str(root / files[0])), device)
    step = entry.get("batch", 1)

    def predict(x):
        outs = []
        for i in range(0, len(x), step):
            out = vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x[i:i + step]), device))
            outs.append((out[0] if not hasattr(out, "numpy") else out).numpy())
        return np.concatenate(outs)

    return predict, {"tvm": tvm.__version__}


def load_tensorrt(root, files, threads):
    """Jetson artifacts: the ONNX variant through ONNX Runtime, preferring its TensorRT and CUDA
    providers (onnxruntime-gpu on the board); on a machine without them, the CPU provider."""
    import onnxruntime as ort

    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    providers = [p for p in wanted if p in ort.get_available_providers()]
    session = ort_session(root / files[0], threads, providers=providers)
    name = session.get_inputs()[0].name

    def predict(x):
        return session.run(None, {name: x})[0]

    return predict, {"onnxruntime": ort.__version__, "provider": session.get_providers()[0]}


class Cascade:
    """Early-exit stages: run stage k; if its confidence reaches threshold k return its exit
    logits, else feed its features to stage k + 1. Sample by sample (batch-1 streaming);
    ``exits[k]`` counts the samples that left at stage k (the last entry: the final output)."""

    def __init__(self, sessions, thresholds):
        self.stages = [(s.run, s.get_inputs()[0].name) for s in sessions]
        self.thresholds = list(thresholds)
        self.exits = [0] * len(sessions)

    def __call__(self, x):
        if len(x) == 1:
            return self.one(x)
        return np.concatenate([self.one(x[i:i + 1]) for i in range(len(x))])

    def one(self, x):
        for k, threshold in enumerate(self.thresholds):
            run, name = self.stages[k]
            x, logits, confidence = run(None, {name: x})
            if confidence[0] >= threshold:
                self.exits[k] += 1
                return logits
        run, name = self.stages[-1]
        self.exits[-1] += 1
        return run(None, {name: x})[0]


def load_cascade(root, files, threads):
    """files[0] is cascade.json (stage files, thresholds); the rest are the stage graphs."""
    import onnxruntime as ort

    spec = json.loads((root / files[0]).read_text())
    sessions = [ort_session(root / name, threads) for name in spec["stages"]]
    return Cascade(sessions, spec["thresholds"]), {"onnxruntime": ort.__version__}


def exit_histogram(predict):
    """{'exits': counts per exit, final last} for a cascade, else nothing."""
    return {"exits": list(predict.exits)} if isinstance(predict, Cascade) else {}


def _per_sample(run_one):
    """predict() over a batch for runtimes whose programs are compiled for batch 1."""

    def predict(x):
        return np.concatenate([run_one(x[i:i + 1]) for i in range(len(x))])

    return predict


def load_ort_mobile(root, files, threads):
    """ONNX Runtime mobile format: any onnxruntime build loads .ort files."""
    return load_onnxruntime(root, files, threads)


def load_executorch(root, files, threads):
    """The .pte through ExecuTorch's C++ runtime, its XNNPACK threadpool set to ``threads``.

    The pool is ExecuTorch's own (one thread per core by default; ``torch.set_num_threads``
    does not reach it), so it is reset here. The native module is imported without the
    ``portable_lib`` wrapper, which imports ``executorch.exir`` (about 5 s per run)."""
    import torch  # loads libtorch, which the extension links against

    try:
        from executorch.extension.pybindings import _C as native
    except ImportError:
        from executorch.extension.pybindings import portable_lib as native
    native._unsafe_reset_threadpool(threads)
    if native._threadpool_get_thread_count() != threads:
        raise SystemExit(f"runner: ExecuTorch kept {native._threadpool_get_thread_count()} "
                         f"threads, not --threads {threads}")
    module = native._load_for_executorch(str(root / files[0]))

    def run_one(x):
        return module.forward([torch.from_numpy(np.ascontiguousarray(x))])[0].numpy()

    from importlib.metadata import version

    return _per_sample(run_one), {"executorch": version("executorch")}


def load_litert(root, files, threads):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(root / files[0]), num_threads=threads)
    interpreter.allocate_tensors()
    source, sink = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

    def run_one(x):
        interpreter.set_tensor(source["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(sink["index"])

    from importlib.metadata import version

    return _per_sample(run_one), {"ai-edge-litert": version("ai-edge-litert")}


def load_hls4ml(root, files, threads):
    """hls4ml's bit-accurate C simulation (csim.so) through ctypes; input NCHW (the project
    transposes to channels-last itself)."""
    import ctypes

    entry = json.loads((root / "manifest.json").read_text())["entry"]
    function = getattr(ctypes.CDLL(str(root / entry["library"])), entry["function"])
    pointer = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
    function.argtypes, function.restype = [pointer, pointer], None
    import os

    cwd = os.getcwd()
    os.chdir(root)  # the first call reads the weights from hls/firmware/weights (relative)
    try:
        function(np.zeros(int(np.prod(entry["input_shape"])), np.float32),
                 np.zeros(entry["output_size"], np.float32))
    finally:
        os.chdir(cwd)

    def run_one(x):
        sample = np.ascontiguousarray(x[0], dtype=np.float32)
        out = np.zeros(entry["output_size"], np.float32)
        function(sample.ravel(), out)
        return out[None]

    return _per_sample(run_one), {"hls4ml-csim": entry["hls_backend"]}


LOADERS = {"cascade": load_cascade, "onnxruntime": load_onnxruntime, "tvm": load_tvm,
           "tensorrt": load_tensorrt, "ort-mobile": load_ort_mobile, "executorch": load_executorch,
           "litert": load_litert, "hls4ml": load_hls4ml}


def load(manifest, threads, root=HERE):
    """(predict, runtime versions) of the artifact whose manifest is ``manifest``, in ``root``."""
    entry = manifest["entry"]
    loader = LOADERS.get(entry["backend"])
    if loader is None:
        raise SystemExit(f"runner: unknown backend {entry['backend']!r}; known: {sorted(LOADERS)}")
    return loader(root, entry["files"], threads)


def read_split(path, start, count):
    with np.load(path, allow_pickle=False) as npz:
        images, labels = npz["images"], npz["labels"]
    end = start + count if count else len(labels)
    return images[start:end], labels[start:end]


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(predict, manifest, args):
    spec = manifest["input"]
    if args.data:
        images, _ = read_split(args.data, args.start, args.count)
        stream = [preprocess(images[i:i + args.batch], spec) for i in range(0, len(images), args.batch)]
    else:
        rng = np.random.default_rng(0)
        shape = (args.batch, *spec["shape"])
        stream = [rng.standard_normal(shape).astype(spec["dtype"])]
    for i in range(args.warmup):
        predict(stream[i % len(stream)])
    if isinstance(predict, Cascade):
        predict.exits = [0] * len(predict.exits)
    samples, started, cpu_started, i = [], time.perf_counter(), time.process_time(), 0
    while (len(samples) < args.repeat or time.perf_counter() - started < args.min_time) and (
        len(samples) < args.max_repeat
    ):
        x = stream[i % len(stream)]
        t0 = time.perf_counter()
        predict(x)
        samples.append((time.perf_counter() - t0) * 1e3)
        i += 1
    # > 1 when the runtime uses more cores than --threads asked for (or spins waiting threads)
    cores_busy = (time.process_time() - cpu_started) / (time.perf_counter() - started)
    return {"samples_ms": samples, "batch": args.batch, "summary": latency_summary(samples),
            "cores_busy": round(cores_busy, 3), **exit_histogram(predict)}


def measure_set(manifest, args):
    """Every artifact of a measurement set (``manifest['members']``: folders next to this file,
    each an artifact), ``--rounds`` rounds, each artifact in turn per round: loaded afresh
    (where the runtime places its buffers varies from load to load, and so does the latency),
    warmed up and timed for one window as ``measure`` times it. A slow spell of the machine
    hits every artifact of its round alike. Per artifact: each window's mean, p50 and p90 (ms)
    and the runs."""
    members = [(HERE / name, json.loads((HERE / name / "manifest.json").read_text()))
               for name in manifest["members"]]
    windows = [{"window_means_ms": [], "window_p50_ms": [], "window_p90_ms": [], "runs": 0}
               for _ in members]
    for _ in range(args.rounds):
        for found, (root, member) in zip(windows, members):
            predict, found["runtime"] = load(member, args.threads, root)
            samples = measure(predict, member, args)["samples_ms"]
            found["window_means_ms"].append(sum(samples) / len(samples))
            found["window_p50_ms"].append(percentile(samples, 50))
            found["window_p90_ms"].append(percentile(samples, 90))
            found["runs"] += len(samples)
            del predict  # the next load of this artifact starts from nothing
    return {"members": [{"artifact": member["hash"], **found}
                        for found, (_, member) in zip(windows, members)]}, windows[0]["runtime"]


def percentile(samples, q):
    """The q-th percentile by linear interpolation between the closest ranks."""
    data = sorted(samples)
    k = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def latency_summary(samples):
    """p50/p90/p99, mean and the half-width of its 95 % confidence interval (ms)."""
    n = len(samples)
    mean = sum(samples) / n
    spread = math.sqrt(sum((s - mean) ** 2 for s in samples) / (n - 1)) if n > 1 else float("nan")
    return {"p50_ms": percentile(samples, 50), "p90_ms": percentile(samples, 90),
            "p99_ms": percentile(samples, 99), "mean_ms": mean,
            "ci95_ms": 1.96 * spread / math.sqrt(n), "n": n}


# ----- time-stages: candidate models timed as a stream of images sees them (for passes) ------
def time_stages(manifest, args):
    """(result, runtime versions): batch-1 latency of the ONNX files a timing bundle names.

    ``manifest['timing']`` holds ``calls``, each ``{"model", "feed"}``: the model run alone on
    the input it sees when the first image runs through the ``feed`` models in turn, ``--repeat``
    rounds after ``--warmup``; and ``streams``, each a list of models run in turn over every
    image, one at a time (ms per image), ``--rounds`` rounds after one warm-up round, or a
    cascade ``{"models", "thresholds"}`` run as the cascade backend's artifact runs it (an image
    leaves at the first stage whose confidence reaches its threshold). The calls take turns
    round by round, and so do the streams, so that machine noise hits all alike."""
    import onnxruntime as ort

    plan = manifest["timing"]
    names = {call["model"] for call in plan["calls"]} | {
        name for call in plan["calls"] for name in call["feed"]} | {
        name for stream in plan["streams"] for name in stream_models(stream)}
    sessions = {name: ort_session(HERE / name, args.threads) for name in sorted(names)}
    images, _ = read_split(args.data, args.start, args.count)
    x = preprocess(images, manifest["input"])
    return ({"calls": time_calls(sessions, plan["calls"], x[:1], args),
             "streams": time_streams(sessions, plan["streams"], x, args.rounds)},
            {"onnxruntime": ort.__version__})


def first_output(session, x):
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def time_calls(sessions, calls, first, args):
    """One timing record per call (see time_stages)."""
    prepared = []
    for call in calls:
        x = first
        for name in call["feed"]:
            x = first_output(sessions[name], x)
        session = sessions[call["model"]]
        prepared.append((session.run, {session.get_inputs()[0].name: x}))
    for run, feed in prepared * args.warmup:
        run(None, feed)
    samples = [[] for _ in prepared]
    for _ in range(args.repeat):
        for store, (run, feed) in zip(samples, prepared):
            t0 = time.perf_counter()
            run(None, feed)
            store.append((time.perf_counter() - t0) * 1e3)
    return [timing_record(call, store) for call, store in zip(calls, samples)]


def stream_models(stream):
    """The model names of a stream: a plain chain (a list) or a cascade (a dict)."""
    return stream["models"] if isinstance(stream, dict) else stream


def _chain(sessions):
    stages = [(s.run, s.get_inputs()[0].name) for s in sessions]

    def one(x):
        for run, name in stages:
            x = run(None, {name: x})[0]
        return x

    return one


def time_streams(sessions, streams, images, rounds):
    """One timing record per stream: ms per image of each round (see time_stages); a cascade's
    record also holds its exit histogram over one round (final output last)."""
    runs = []
    for stream in streams:
        chosen = [sessions[name] for name in stream_models(stream)]
        runs.append(Cascade(chosen, stream["thresholds"]) if isinstance(stream, dict)
                    else _chain(chosen))
    samples = [[] for _ in runs]
    for round_ in range(rounds + 1):  # the first round warms up
        for store, run in zip(samples, runs):
            if isinstance(run, Cascade) and round_ == rounds:
                run.exits = [0] * len(run.exits)  # the last round's histogram: one pass
            t0 = time.perf_counter()
            for i in range(len(images)):
                run(images[i:i + 1])
            store.append((time.perf_counter() - t0) * 1e3 / len(images))
    return [timing_record({**(stream if isinstance(stream, dict) else {"models": stream}),
                           **exit_histogram(run)}, store[1:])
            for stream, run, store in zip(streams, runs, samples)]


def timing_record(what, samples):
    """``what`` with its samples (ms) and their summary, the lower quartile too (other work on
    the machine only ever adds time)."""
    return {**what, "samples_ms": samples,
            "summary": {**latency_summary(samples), "p25_ms": percentile(samples, 25)}}


# ----- images for predict: PNG without any library (8-bit, not interlaced), else Pillow -----
PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel


def read_png(path):
    """An 8-bit, non-interlaced PNG as a uint8 H x W x C array (grey, grey+alpha, RGB, RGBA)."""
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG file")
    pos, chunks, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or interlace or colour not in PNG_CHANNELS:
        raise ValueError(f"{path}: only 8-bit non-interlaced grey/RGB(A) PNGs are read without "
                         f"Pillow (pip install pillow for other images)")
    channels = PNG_CHANNELS[colour]
    raw = np.frombuffer(zlib.decompress(b"".join(chunks)), np.uint8)
    rows = raw.reshape(height, 1 + width * channels)
    return _unfilter(rows[:, 0], rows[:, 1:].astype(np.int32), channels).reshape(
        height, width, channels)


def _unfilter(kinds, rows, bpp):
    """Undo PNG's per-row filters (none, sub, up, average, Paeth)."""
    out = np.zeros_like(rows)
    for y, kind in enumerate(kinds):
        prior = out[y - 1] if y else np.zeros_like(rows[0])
        line = rows[y].copy()
        if kind in (0, 2):
            line = (line + (prior if kind == 2 else 0)) & 0xFF
        else:
            for x in range(len(line)):
                left = line[x - bpp] if x >= bpp else 0
                corner = prior[x - bpp] if x >= bpp else 0
                if kind == 1:
                    guess = left
                elif kind == 3:
                    guess = (left + prior[x]) // 2
                else:
                    p = left + prior[x] - corner
                    guess = min((abs(p - left), 0, left), (abs(p - prior[x]), 1, prior[x]),
                                (abs(p - corner), 2, corner))[2]
                line[x] = (line[x] + guess) & 0xFF
        out[y] = line
    return out.astype(np.uint8)


def read_image(path, shape):
    """One image file as uint8 H x W x C matching the model's (C, H, W) ``shape``."""
    try:
        from PIL import Image
    except ImportError:
        image = read_png(path)
    else:
        with Image.open(path) as opened:
            mode = {1: "L", 3: "RGB"}.get(shape[0], "RGB")
            image = np.asarray(opened.convert(mode).resize((shape[2], shape[1])))
    if image.ndim == 2:
        image = image[:, :, None]
    channels = shape[0]
    if image.shape[2] != channels:
        image = image[:, :, :3] if channels == 3 else image[:, :, :1]
    if image.shape[:2] != tuple(shape[1:]):
        raise ValueError(f"{path}: image is {image.shape[1]}x{image.shape[0]}, the model takes "
                         f"{shape[2]}x{shape[1]}; resize it first (or pip install pillow)")
    return image


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def read_inputs(path, shape):
    """(names, uint8 N x H x W x C images) from an image, a directory of images, .npz or .npy."""
    path = Path(path)
    if path.suffix == ".npz":
        images, _ = read_split(path, 0, 0)
        return [f"{path.name}[{i}]" for i in range(len(images))], images
    if path.suffix == ".npy":
        images = np.load(path, allow_pickle=False)
        images = images[None] if images.ndim == 3 else images
        return [f"{path.name}[{i}]" for i in range(len(images))], images
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
        if path.is_dir() else [path]
    if not files:
        raise SystemExit(f"runner: no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    return [str(p) for p in files], np.stack([read_image(p, shape) for p in files])


def softmax(logits):
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def predict_files(predict, manifest, args):
    """Labels and the top-k probabilities for each input image."""
    spec = manifest["input"]
    names, images = read_inputs(args.inputs, spec["shape"])
    classes = manifest.get("class_names") or []
    results = []
    for i in range(0, len(images), args.batch):
        probabilities = softmax(predict(preprocess(images[i:i + args.batch], spec)).astype(np.float64))
        for name, row in zip(names[i:i + args.batch], probabilities):
            top = np.argsort(-row)[:args.top]
            results.append({"input": name, "label": int(top[0]),
                            "top": [{"label": int(k), "probability": round(float(row[k]), 6),
                                     **({"class": classes[k]} if k < len(classes) else {})}
                                    for k in top]})
    return {"predictions": results, **exit_histogram(predict)}


def evaluate(predict, manifest, args):
    images, labels = read_split(args.data, args.start, args.count)
    spec = manifest["input"]
    predictions = []
    for i in range(0, len(images), args.batch):
        logits = predict(preprocess(images[i:i + args.batch], spec))
        predictions.append(np.argmax(logits, axis=1))
    predictions = np.concatenate(predictions)
    correct = int((predictions == labels).sum())
    return {"correct": correct, "total": int(len(labels)), "top1": correct / max(len(labels), 1),
            "predictions_sha256": hashlib.sha256(predictions.astype(np.int64).tobytes()).hexdigest(),
            **exit_histogram(predict)}


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["measure", "eval", "predict", "cpu", "time-stages", "measure-set"])
    parser.add_argument("inputs", nargs="?", default="",
                        help="predict: an image, a directory of images, .npz or .npy")
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--max-repeat", type=int, default=100000)
    parser.add_argument("--min-time", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5,
                        help="time-stages: streamed rounds; measure-set: windows per artifact")
    parser.add_argument("--data", default="")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, default=0)
    args = parser.parse_args(argv)
    if args.batch is None:
        args.batch = 1 if args.mode in ("measure", "measure-set") else 100
    if args.mode in ("eval", "time-stages") and not args.data:
        parser.error(f"{args.mode} needs --data images.npz")
    if args.mode == "predict" and not args.inputs:
        parser.error("predict needs an image, a directory of images, .npz or .npy")
    return args


def main(argv=None):
    args = parse(argv if argv is not None else sys.argv[1:])
    cpu = cpu_info()
    if args.mode == "cpu":
        print(json.dumps({"mode": "cpu", "cpu": cpu}))
        return
    manifest = json.loads((HERE / "manifest.json").read_text())
    warning = int8_path_warning(manifest, cpu)
    if warning:
        print(f"runner: warning: {warning}", file=sys.stderr)
    if args.mode == "time-stages":
        result, versions = time_stages(manifest, args)
    elif args.mode == "measure-set":
        result, versions = measure_set(manifest, args)
    else:
        predict, versions = load(manifest, args.threads)
        modes = {"measure": measure, "eval": evaluate, "predict": predict_files}
        result = modes[args.mode](predict, manifest, args)
    result.update({"mode": args.mode, "threads": args.threads, "runtime": versions,
                   "peak_rss_mb": peak_rss_mb(), "artifact": manifest["hash"], "cpu": cpu,
                   "warnings": [warning] if warning else []})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
