"""The safetensors format: its dtype codes, how a header is laid out and written.

A file is an 8-byte little-endian length, a JSON header of that length (padded with spaces to a multiple of 8),
then the tensors' bytes back to back. The header maps "__metadata__" to {"format": "pt"} and each tensor's name
to its dtype code, shape and data offsets (counted from the end of the header).

Nothing here opens a file or imports torch: planning asks it for header bytes and sizes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Sequence
from typing import NamedTuple


class DType(NamedTuple):
    code: str  # the header's dtype, 'BF16'
    itemsize: int  # bytes per element


# Keyed by the dtype names a checkpoint's pickle gives (str(torch.dtype)): streamconv plans without torch.
DTYPES = {
    "torch.float32": DType("F32", 4),
    "torch.float16": DType("F16", 2),
    "torch.bfloat16": DType("BF16", 2),
    "torch.float64": DType("F64", 8),
}

DTYPE_NAMES = {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}  # --dtype choices

LENGTH = struct.Struct("<Q")  # the header's length, before it
DATA_ALIGN = 8  # the header is padded with spaces so that the data starts at a multiple of this
METADATA = {"format": "pt"}  # as torch's safetensors writes it

Entry = tuple[str, str, Sequence[int]]  # (name, dtype as 'torch.bfloat16', shape)


def tensor_bytes(dtype: str, shape: Sequence[int]) -> int:
    """The bytes a tensor of this dtype and shape takes in the data section."""
    return math.prod(shape) * DTYPES[dtype].itemsize


def data_offsets(entries: Iterable[Entry]) -> list[tuple[int, int]]:
    """Where each tensor's bytes lie in the data section: back to back, in order."""
    spans, offset = [], 0
    for _, dtype, shape in entries:
        end = offset + tensor_bytes(dtype, shape)
        spans.append((offset, end))
        offset = end
    return spans


def header(entries: Sequence[Entry]) -> bytes:
    """The bytes before the data: the length, then the JSON header padded with spaces to a multiple of DATA_ALIGN."""
    fields: dict = {"__metadata__": METADATA}
    for (name, dtype, shape), (begin, end) in zip(entries, data_offsets(entries), strict=True):
        fields[name] = {"dtype": DTYPES[dtype].code, "shape": list(shape), "data_offsets": [begin, end]}
    body = json.dumps(fields, separators=(",", ":")).encode()
    body += b" " * (-len(body) % DATA_ALIGN)
    return LENGTH.pack(len(body)) + body

