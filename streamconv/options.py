"""The conversion's options resolved and checked before anything is opened: the device and the output dtype."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from streamconv.errors import ConversionError
from streamconv.formats.safetensors import DTYPE_NAMES
from streamconv.process import import_torch

if TYPE_CHECKING:
    import torch


def resolve_device(device: str | torch.device) -> str:
    """'cpu', 'cuda' or 'cuda:N', checked; torch is imported only for CUDA."""
    name = str(device)
    if re.fullmatch(r"cpu|cuda(:[0-9]+)?", name) is None:
        raise ConversionError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    if name != "cpu":
        import_torch()
        import torch

        if not torch.cuda.is_available():
            raise ConversionError(f"--device {device} asked for CUDA, but torch sees no GPU; use --device cpu")
        index = int(name.split(":")[1]) if ":" in name else None
        if index is not None and index >= torch.cuda.device_count():
            raise ConversionError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible; use cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1}"
            )
    return name


def resolve_dtype(dtype: str | torch.dtype | None) -> str | None:
    """The output dtype's name ('torch.bfloat16'); None keeps each source tensor's dtype."""
    if dtype is None or dtype == "auto":
        return None
    if str(dtype) in DTYPE_NAMES.values():  # a torch.dtype, or its name
        return str(dtype)
    if dtype not in DTYPE_NAMES:
        raise ConversionError(f"unknown dtype {dtype!r}; use auto, bf16, fp16 or fp32")
    return DTYPE_NAMES[dtype]
