#!/usr/bin/env python3
"""edgec artifact runner: load the model next to this file, measure or evaluate it, print JSON.

Needs only the Python standard library, numpy and the artifact's runtime (onnxruntime, tvm).
Usage:
  python runner.py measure [--warmup 10] [--repeat 50] [--min-time 1.0] [--threads 1]
                           [--batch 1] [--data images.npz]
  python runner.py eval --data images.npz [--start 0] [--count 0] [--batch 100]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def preprocess(images, spec):
    """uint8 NHWC images to normalised float NCHW, per the manifest's input spec."""
    x = images.astype(np.float32) * np.float32(spec["scale"])
    if spec["mean"]:
        x = (x - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(spec["dtype"])


def load_onnxruntime(files, threads):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(HERE / files[0]), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def predict(x):
        return session.run(None, {name: x})[0]

    return predict, {"onnxruntime": ort.__version__}


LOADERS = {"onnxruntime": load_onnxruntime}


def load(manifest, threads):
    entry = manifest["entry"]
    loader = LOADERS.get(entry["backend"])
    if loader is None:
        raise SystemExit(f"runner: unknown backend {entry['backend']!r}; known: {sorted(LOADERS)}")
    return loader(entry["files"], threads)


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
    samples, started, i = [], time.perf_counter(), 0
    while (len(samples) < args.repeat or time.perf_counter() - started < args.min_time) and (
        len(samples) < args.max_repeat
    ):
        x = stream[i % len(stream)]
        t0 = time.perf_counter()
        predict(x)
        samples.append((time.perf_counter() - t0) * 1e3)
        i += 1
    return {"samples_ms": samples, "batch": args.batch}


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
            "predictions_sha256": hashlib.sha256(predictions.astype(np.int64).tobytes()).hexdigest()}


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["measure", "eval"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--max-repeat", type=int, default=100000)
    parser.add_argument("--min-time", type=float, default=1.0)
    parser.add_argument("--data", default="")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, default=0)
    args = parser.parse_args(argv)
    if args.batch is None:
        args.batch = 1 if args.mode == "measure" else 100
    if args.mode == "eval" and not args.data:
        parser.error("eval needs --data images.npz")
    return args


def main(argv=None):
    args = parse(argv if argv is not None else sys.argv[1:])
    manifest = json.loads((HERE / "manifest.json").read_text())
    predict, versions = load(manifest, args.threads)
    result = measure(predict, manifest, args) if args.mode == "measure" else evaluate(predict, manifest, args)
    result.update({"mode": args.mode, "threads": args.threads, "runtime": versions,
                   "peak_rss_mb": peak_rss_mb(), "artifact": manifest["hash"]})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
