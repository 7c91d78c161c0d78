"""dtype casts on the bits, with numpy: bit for bit what torch's `.to()` gives on the CPU, without importing torch.

numpy has no bfloat16, so every tensor is held as integers of its width (`records.BITS`). bfloat16 is the top half
of a float32: widening is a 16-bit shift; narrowing rounds to nearest, ties to even, on the bits. float32 ->
float16 is numpy's own IEEE conversion. A 16-bit source has only 65,536 patterns, so its other casts (float16 ->
float32, and between bfloat16 and float16, which go through float32) look each element up in a table of every
pattern's result: one gather instead of several passes, and the table is computed by the same rules.

NaNs follow what torch's vectorised CPU loops make of them (its scalar tail differs for some, so a NaN's bits
are torch's for any tensor longer than a vector register): float32 -> bfloat16 gives 0xFFFF for every NaN,
float16 -> bfloat16 gives 0x7FC0, and the float16 <-> float32 casts set the quiet bit, keeping sign and payload
(numpy keeps a signalling NaN signalling). tests/test_casts.py checks every cast against torch over every 16-bit
pattern, the float32 specials and millions of random float32 patterns.

Measured on the 2-core machine, one thread, 64 Ki-element blocks (elements per second): float32 -> bfloat16
0.54 G, bfloat16 -> float32 1.07 G, table lookups 0.66 G (16-bit out) and 0.37 G (32-bit out), float32 ->
float16 0.2 G (numpy's conversion; the same figure for its float16 -> float32, which the table beats).
"""

from __future__ import annotations

import functools

import numpy as np

_FLOAT32, _BFLOAT16, _FLOAT16 = "torch.float32", "torch.bfloat16", "torch.float16"
CASTABLE = {_FLOAT32, _BFLOAT16, _FLOAT16}
_WIDTH = {_FLOAT32: np.uint32, _BFLOAT16: np.uint16, _FLOAT16: np.uint16}
BLOCK = 2**16  # elements cast at once: the temporaries of one block stay in the core's cache


def cast(bits: np.ndarray, source: str, target: str) -> np.ndarray:
    """`bits` (integers holding `source` elements) as integers holding `target` elements: a new array, or `bits`
    itself when the dtypes are the same."""
    if source == target:
        return bits
    _check(source, target)
    out = np.empty(bits.shape, dtype=_WIDTH[target])
    cast_into(out, np.ascontiguousarray(bits), source, target)
    return out.view(np.int16 if out.itemsize == 2 else np.int32)


def cast_into(out: np.ndarray, bits: np.ndarray, source: str, target: str) -> None:
    """Write `bits` (C-contiguous integers holding `source` elements) cast to `target` into `out` (C-contiguous
    integers of the target's width, as many elements), BLOCK elements at a time."""
    _check(source, target)
    flat_in, flat_out = bits.reshape(-1), out.reshape(-1)
    for start in range(0, flat_in.size, BLOCK):
        _cast_block(flat_out[start : start + BLOCK], flat_in[start : start + BLOCK], source, target)


def _check(source: str, target: str) -> None:
    if source not in CASTABLE or target not in CASTABLE:
        raise ValueError(f"no cast from {source} to {target}")


def _cast_block(out: np.ndarray, bits: np.ndarray, source: str, target: str) -> None:
    if source == target:
        np.copyto(out.view(bits.dtype), bits)
    elif source == _BFLOAT16 and target == _FLOAT32:
        np.left_shift(bits.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
    elif source != _FLOAT32:
        table = _table(source, target)
        np.take(table, bits.view(np.uint16), out=out.view(table.dtype), mode="wrap")
    elif target == _BFLOAT16:
        _float32_to_bfloat16(bits.view(np.uint32), out.view(np.uint16))
    else:
        _float32_to_float16(bits.view(np.float32), out.view(np.uint16))


@functools.cache
def _table(source: str, target: str) -> np.ndarray:
    """The cast of every 16-bit pattern of `source`, indexed by the pattern."""
    wide = _widened(np.arange(2**16, dtype=np.uint32).astype(np.uint16), source)
    if target == _FLOAT32:
        return wide.view(np.uint32)
    table = np.empty(2**16, dtype=np.uint16)
    if target == _BFLOAT16:
        _float32_to_bfloat16(wide.view(np.uint32), table)
        table[np.isnan(wide)] = 0x7FC0  # what torch makes of a float16 NaN
    else:
        _float32_to_float16(wide, table)
    return table


def _widened(bits: np.ndarray, source: str) -> np.ndarray:
    """16-bit patterns as float32 (a new array)."""
    if source == _BFLOAT16:
        return (bits.astype(np.uint32) << 16).view(np.float32)
    wide = bits.view(np.float16).astype(np.float32)
    wide.view(np.uint32)[np.isnan(wide)] |= 0x00400000  # quiet
    return wide


def _float32_to_float16(wide: np.ndarray, out: np.ndarray) -> None:
    with np.errstate(over="ignore"):
        np.copyto(out.view(np.float16), wide, casting="unsafe")
    nan = np.isnan(wide)
    if nan.any():  # quiet, keeping the sign and the payload's top bits
        u = wide.view(np.uint32)[nan]
        out[nan] = ((u >> 16) & 0x8000) | 0x7E00 | ((u >> 13) & 0x03FF)


def _float32_to_bfloat16(u: np.ndarray, out: np.ndarray) -> None:
    """Round to nearest, ties to even, on the bits; every NaN 0xFFFF, as torch's vector loop makes it."""
    rounded = np.right_shift(u, 16)
    rounded &= 1
    rounded += 0x7FFF
    rounded += u
    rounded >>= 16
    np.copyto(out, rounded, casting="unsafe")
    nan = np.isnan(u.view(np.float32))
    if nan.any():
        out[nan] = 0xFFFF
