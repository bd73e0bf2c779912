"""PyTorch networks (import torch lazily: only the torch backend, export and training need them)."""
