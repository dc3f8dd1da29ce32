"""Top-1 accuracy of torch models and ONNX files on a Dataset (host side)."""

from __future__ import annotations

import numpy as np

from edgec.data import Dataset, preprocess


def torch_logits(model, dataset: Dataset, spec, batch: int = 500) -> np.ndarray:
    import torch

    outputs = []
    with torch.no_grad():
        for i in range(0, len(dataset), batch):
            x = torch.from_numpy(preprocess(dataset.images[i:i + batch], spec))
            outputs.append(model(x).float().numpy())
    return np.concatenate(outputs)


def onnx_logits(path, dataset: Dataset, spec, batch: int = 500, threads: int = 2) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: preprocess(dataset.images[i:i + batch], spec)})[0]
                           for i in range(0, len(dataset), batch)])


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((np.argmax(logits, axis=1) == labels).mean())
