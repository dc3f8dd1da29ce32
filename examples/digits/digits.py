"""Self-contained example: scikit-learn's 8×8 digits and a small CNN trained here in seconds.

``train``/``test`` are data generators for data.toml; ``trained_cnn`` is the model factory.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

TEST_SIZE = 500


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    images = np.round(digits.images[order] * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, digits.target[order].astype(np.int64)


def train() -> tuple[np.ndarray, np.ndarray]:
    images, labels = _digits()
    return images[:-TEST_SIZE], labels[:-TEST_SIZE]


def test() -> tuple[np.ndarray, np.ndarray]:
    images, labels = _digits()
    return images[-TEST_SIZE:], labels[-TEST_SIZE:]


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def trained_cnn(epochs: int = 15, seed: int = 0) -> DigitsCNN:
    """Train DigitsCNN on the training images with a fixed seed (about 2 s on one core)."""
    images, labels = train()
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    y = torch.from_numpy(labels)
    torch.manual_seed(seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=order).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()
