"""streamconv: NeMo-Megatron GPT-SW3 checkpoints to Hugging Face safetensors, streamed in bounded memory."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ConversionError", "ConversionResult", "convert", "verify"]

if TYPE_CHECKING:
    from streamconv.converter import ConversionResult, convert
    from streamconv.errors import ConversionError
    from streamconv.verification import verify


def __getattr__(name: str) -> Any:
    """Import the converter only when it is used (keeps `--help` fast)."""
    if name in ("convert", "ConversionResult"):
        from streamconv import converter as module

        return getattr(module, name)
    if name == "verify":
        from streamconv.verification import verify

        return verify
    if name == "ConversionError":
        from streamconv.errors import ConversionError

        return ConversionError
    raise AttributeError(f"module 'streamconv' has no attribute {name!r}")
