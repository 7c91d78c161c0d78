"""Readers that present a checkpoint as named lazy tensors plus its hyper-parameters.

One module per container kind; none imports another. `open_checkpoint` recognises the input and dispatches.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from streamconv.sources import lightning, mcore, nemo
from streamconv.sources.records import Checkpoint

__all__ = ["Checkpoint", "open_checkpoint"]


def open_checkpoint(path: str | os.PathLike[str], scratch: str | None = None,
                    progress: Callable[[str, int], Any] | None = None) -> Checkpoint:
    """Open a Lightning `.ckpt`, a `.nemo` (archive or extracted folder) or a megatron-core distributed checkpoint
    (NeMo 1.x, NeMo 2.0 or Megatron-LM layout) without reading any weights.

    `scratch` is the folder a gzip `.nemo`'s weights are extracted into (the output's parent);
    `progress(description, total bytes)` makes the bar the extraction is shown by.
    """
    path = os.fspath(path)
    if nemo.is_nemo(path):
        return nemo.open_nemo(path, scratch, progress, mcore.open_distributed)
    if mcore.is_distributed(path):
        return mcore.open_folder(path)
    return lightning.open_ckpt(path)
