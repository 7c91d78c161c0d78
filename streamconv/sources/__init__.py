"""Readers that present a checkpoint as named lazy tensors plus its hyper-parameters.

One module per container kind; none imports another. `open_checkpoint` recognises the input and dispatches.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Any

from streamconv.errors import ConversionError
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
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None  # (named by the reader: not found, not readable)
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):  # (opening a pipe waits for a writer)
        raise ConversionError(f"checkpoint path {path} is not a regular file or folder (a pipe or a device?); "
                              "give --checkpoint-path the checkpoint file or folder itself")
    if nemo.is_nemo(path):
        return nemo.open_nemo(path, scratch, progress, mcore.open_distributed)
    if mcore.is_distributed(path):
        return mcore.open_folder(path)
    return lightning.open_ckpt(path)
