"""The safetensors format: its dtype codes, how a header is laid out and written, and how one read back is checked.

A file is an 8-byte little-endian length, a JSON header of that length (padded with spaces to a multiple of 8),
then the tensors' bytes back to back. The header maps "__metadata__" to {"format": "pt"} and each tensor's name
to its dtype code, shape and data offsets (counted from the end of the header).

Nothing here opens a file or imports torch: planning asks it for header bytes and sizes, verification for what
a header read from an untrusted file says.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple


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
ENTRY_FIELDS = ("dtype", "shape", "data_offsets")

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


# --- Reading a header back (from a file that may be anything) ----------------------------------------------------


class Stored(NamedTuple):
    """A tensor as a header describes it; `begin` and `end` are positions in the file."""

    dtype: str  # the header's code, 'BF16'
    shape: list[int]
    begin: int
    end: int


def header_length(prefix: bytes, file_size: int, limit: int) -> int | str:
    """The JSON header's length from the file's first LENGTH.size bytes, or what is wrong with it (a header over
    `limit` bytes is refused unread)."""
    if len(prefix) < LENGTH.size:
        return "shorter than a safetensors header"
    (length,) = LENGTH.unpack(prefix)
    if length > limit or LENGTH.size + length > file_size:
        return (f"header length {length} runs past the end of the file or past {limit} bytes (a conversion writes "
                "far less)")
    return length


def parse_entry(entry: Any, start: int) -> Stored | str:
    """One parsed header entry, its offsets moved by `start` (where the data begins), or what is wrong with it."""
    if not isinstance(entry, dict):
        return f"{json_kind(entry)}, not a JSON object"
    missing = [k for k in ENTRY_FIELDS if k not in entry]
    if missing or len(entry) != len(ENTRY_FIELDS):
        return f"lacks {', '.join(missing)}" if missing else "has fields other than dtype, shape and data_offsets"
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(entry["dtype"], str):
        return f"dtype is {json_kind(entry['dtype'])}, not a string"
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        return "shape is not a list of sizes"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets) \
            or not 0 <= offsets[0] <= offsets[1]:
        return "data_offsets are not two increasing integers"
    begin, end = offsets
    return Stored(entry["dtype"], shape, start + begin, start + end)


def layout_problems(tensors: Iterable[Stored], start: int, file_size: int) -> list[str]:
    """What is wrong with where the tensors lie: the data must hold them back to back from `start` to the end of
    the file."""
    problems, end = [], start
    for begin, stop in sorted((t.begin, t.end) for t in tensors):
        if begin != end:
            problems.append(f"data has a gap or overlap at byte {begin}")
            break
        end = stop
    if end != file_size:
        problems.append(f"file is {file_size} bytes, its tensors end at {end}")
    return problems


def json_kind(value: Any) -> str:
    """'a list', 'a string', ...: what a JSON value is, to say what it should have been."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def is_int(value: Any) -> bool:
    """An integer in JSON's sense (not a boolean)."""
    return isinstance(value, int) and not isinstance(value, bool)
