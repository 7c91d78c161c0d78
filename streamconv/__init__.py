"""streamconv: NeMo and Megatron checkpoints (GPT-SW3, Llama-family and other models) to Hugging Face safetensors,
streamed in bounded memory."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from streamconv._version import __version__ as __version__  # (re-exported)

__all__ = ["ConversionError", "ConversionResult", "convert", "verify"]

if TYPE_CHECKING:
    from streamconv.converter import ConversionResult, convert
    from streamconv.errors import ConversionError
    from streamconv.verification import verify


def __getattr__(name: str) -> Any:
    """Import the converter only when it is used (keeps `--help` fast). `convert` and `verify` here are the
    Python API: their errors name keyword arguments (`vocab_size=`) where the command line's name flags."""
    from streamconv.errors import python_api

    if name == "convert":
        from streamconv.converter import convert

        return python_api(convert)
    if name == "ConversionResult":
        from streamconv.converter import ConversionResult

        return ConversionResult
    if name == "verify":
        from streamconv.verification import verify

        return python_api(verify)
    if name == "ConversionError":
        from streamconv.errors import ConversionError

        return ConversionError
    raise AttributeError(f"module 'streamconv' has no attribute {name!r}")
