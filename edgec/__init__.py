"""edgec: compile a trained PyTorch model into a measured artifact for an edge device."""

__version__ = "0.1.0"
