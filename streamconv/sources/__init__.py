"""Readers that present a checkpoint as named lazy tensors plus its hyper-parameters."""

from streamconv.sources.lightning import Checkpoint, open_checkpoint

__all__ = ["Checkpoint", "open_checkpoint"]
