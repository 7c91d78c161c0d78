"""Readers that present a checkpoint as named lazy tensors plus its hyper-parameters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Checkpoint", "open_checkpoint"]

if TYPE_CHECKING:
    from streamconv.sources.lightning import Checkpoint, open_checkpoint


def __getattr__(name: str) -> Any:
    """Import the readers (and numpy) on first use: `streamconv --help` needs neither."""
    if name in __all__:
        from streamconv.sources import lightning

        return getattr(lightning, name)
    raise AttributeError(f"module 'streamconv.sources' has no attribute {name!r}")
