"""dtype casts on the bits, with numpy: bit for bit what torch's `.to()` gives on the CPU, without importing torch.

numpy has no bfloat16, so every tensor is held as integers of its width (`records.BITS`). bfloat16 is the top half
of a float32: widening is a 16-bit shift; narrowing rounds to nearest, ties to even, on the bits. float16 <->
float32 is numpy's own IEEE conversion; bfloat16 <-> float16 goes through float32.

NaNs follow what torch's vectorised CPU loops make of them (its scalar tail differs for some, so a NaN's bits
are torch's for any tensor longer than a vector register): float32 -> bfloat16 gives 0xFFFF for every NaN,
float16 -> bfloat16 gives 0x7FC0, and the float16 <-> float32 casts set the quiet bit, keeping sign and payload
(numpy keeps a signalling NaN signalling). tests/test_casts.py checks every cast against torch over every 16-bit
pattern, the float32 specials and millions of random float32 patterns.
"""

from __future__ import annotations

import numpy as np

_FLOATS = {"torch.float16": np.float16, "torch.float32": np.float32}
CASTABLE = {"torch.bfloat16", *_FLOATS}


def cast(bits: np.ndarray, source: str, target: str) -> np.ndarray:
    """`bits` (integers holding `source` elements) as integers holding `target` elements: a new array, or `bits`
    itself when the dtypes are the same."""
    if source == target:
        return bits
    if source not in CASTABLE or target not in CASTABLE:
        raise ValueError(f"no cast from {source} to {target}")
    wide = _to_float32(bits, source)
    if target == "torch.float32":
        return wide.view(np.int32)
    if target == "torch.float16":
        return _float32_to_float16(wide)
    narrow = _float32_to_bfloat16(wide.view(np.uint32))
    if source == "torch.float16":
        narrow[np.isnan(wide)] = 0x7FC0
    return narrow


def _to_float32(bits: np.ndarray, source: str) -> np.ndarray:
    if source == "torch.bfloat16":
        return (bits.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if source == "torch.float16":
        wide = bits.view(np.float16).astype(np.float32)
        nan = np.isnan(wide)
        if nan.any():
            wide.view(np.uint32)[nan] |= 0x00400000  # quiet
        return wide
    return bits.view(np.float32)


def _float32_to_float16(wide: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        narrow = wide.astype(np.float16).view(np.int16)
    nan = np.isnan(wide)
    if nan.any():
        u = wide.view(np.uint32)[nan]
        narrow[nan] = (((u >> 16) & 0x8000) | 0x7E00 | ((u >> 13) & 0x03FF)).astype(np.uint16).view(np.int16)
    return narrow


def _float32_to_bfloat16(u: np.ndarray) -> np.ndarray:
    """Round to nearest, ties to even, on the bits; every NaN 0xFFFF, as torch's vector loop makes it."""
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    rounded[(u & 0x7FFFFFFF) > 0x7F800000] = 0xFFFF
    return rounded.view(np.int16)
