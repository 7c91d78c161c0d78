"""megatron-core's deprecated `zarr` distributed-checkpoint backend, read without zarr.

Each tensor (a ShardedTensor key) is a zarr v2 array in its own folder, named by the full dotted key
(`decoder.layers.self_attention.linear_qkv.weight/`): a `.zarray` JSON file (global shape, chunk shape,
dtype) and one file per chunk, named by the chunk's grid indices joined with '.' (`0.0`, `1.2`; `0` for a
0-d or 1-d array). megatron-core writes the chunks uncompressed and unfiltered, in C order, each one the
size of a rank's local shard, so a chunk file is the raw little-endian bytes of a full chunk (an edge
chunk is padded to the full chunk shape). Each chunk is therefore viewed in place: a `StoredTensor` into
its file, with the strides of the full chunk and the shape of the part of the tensor it holds.

Only what megatron-core writes is read: anything else in a `.zarray` (a compressor, filters, Fortran
order, a big-endian or unknown dtype, nested chunk folders) is refused by name. Folders named
`<key>.sync` (zarr's process-synchronizer locks), folders without `.zarray` (megatron's ShardedObjects,
`shard_*.pt` pickles) and the keys `dcp.is_weight` rejects (optimizer state, rng state, `_extra_state`)
are skipped unread. Only the `.zarray` files and the chunk files' sizes are read here, no tensor bytes.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass
from typing import Any

from streamconv.errors import ConversionError, describe, first_line
from streamconv.sources import safe_pickle
from streamconv.sources.dcp import is_weight
from streamconv.sources.records import Files, Folder, check_tiling, damaged, naturals
from streamconv.sources.torch_zip import StoredTensor

ZARRAY = ".zarray"
_MAX_ZARRAY = 2**20  # (megatron's are a few hundred bytes)
_MAX_CHUNKS = 2**20  # per tensor: a rank's shard per chunk, so a few thousand at most
# zarr's dtype strings (numpy's `dtype.str`; megatron writes "bfloat16" for ml_dtypes' bfloat16) -> torch names
_DTYPES = {"bfloat16": "bfloat16", "<f8": "float64", "<f4": "float32", "<f2": "float16", "<i8": "int64",
           "<i4": "int32", "<i2": "int16", "|i1": "int8", "<i1": "int8", "|u1": "uint8", "<u1": "uint8",
           "|b1": "bool", "<b1": "bool"}
_FIELDS = {"zarr_format", "shape", "chunks", "dtype", "compressor", "fill_value", "order", "filters",
           "dimension_separator"}


@dataclass(frozen=True)
class ZarrChunk:
    """One chunk of a tensor: its box in the global tensor and a view of its valid part in its file."""

    offsets: tuple[int, ...]  # in the global tensor
    sizes: tuple[int, ...]  # the part of the tensor it holds (an edge chunk holds less than the chunk shape)
    file: str  # the file to map (from files.locate)
    stored: StoredTensor  # the box as a C-order view into that file (strides of the full, padded chunk)


@dataclass(frozen=True)
class ZarrTensor:
    """A weight: dtype name, global shape, and the chunks that tile it exactly."""

    fqn: str
    dtype: str  # 'torch.bfloat16'
    shape: tuple[int, ...]
    chunks: tuple[ZarrChunk, ...]


def read_zarr(files: Files | str | os.PathLike[str]) -> dict[str, ZarrTensor]:
    """The weights of the zarr distributed checkpoint in `files` (or a folder), by key, read from the
    `.zarray` files and the chunk files' sizes (no tensor bytes).

    Refused (ConversionError, one line): a `.zarray` that is not megatron-core's uncompressed C-order layout
    or is damaged, a dtype streamconv does not convert, a chunk file that is missing, of the wrong size, not a
    regular file or outside the folder, two chunks in the same file, more chunks than the folder holds files.
    """
    files = files if isinstance(files, Files) else Folder(os.fspath(files))
    names = files.names()
    in_folder: dict[str, int] = {}  # top-level folder -> the files listed in it
    for name in names:
        top, sep, _ = name.partition("/")
        if sep:
            in_folder[top] = in_folder.get(top, 0) + 1
    if not any(n.count("/") == 1 and n.endswith("/" + ZARRAY) for n in names):
        raise ConversionError(f"{files.label} has no folder holding a {ZARRAY} file: not a zarr distributed checkpoint")
    tensors = {}
    for fqn in sorted(in_folder):
        if fqn.endswith(".sync") or not is_weight(fqn) or not files.exists(f"{fqn}/{ZARRAY}"):
            continue
        tensors[fqn] = _tensor(files, fqn, in_folder[fqn])
    return tensors


def _tensor(files: Files, fqn: str, listed: int) -> ZarrTensor:
    """One array: its `.zarray` checked, its chunk files located and sized."""
    path = files.path(f"{fqn}/{ZARRAY}")
    dtype, itemsize, shape, chunk_shape = _metadata(path, files.read(f"{fqn}/{ZARRAY}", _MAX_ZARRAY))
    grid = tuple(0 if s == 0 else -(-s // c) for s, c in zip(shape, chunk_shape, strict=True))
    count = math.prod(grid)
    if count > _MAX_CHUNKS or count > listed:
        raise ConversionError(f"{path} describes {fqn!r} {list(shape)} in {count} chunks of {list(chunk_shape)}, "
                              f"but {files.path(fqn)} holds {listed} files; the checkpoint is incomplete or damaged, "
                              "copy it again")
    chunk_bytes = math.prod(chunk_shape) * itemsize
    strides = tuple(math.prod(chunk_shape[d + 1:]) for d in range(len(chunk_shape)))
    chunks, placed = [], {}
    for index in itertools.product(*map(range, grid)):  # C order (a 0-d array has one, at ())
        name = f"{fqn}/{'.'.join(map(str, index)) or '0'}"  # (a 0-d array's one chunk is '0')
        if not files.exists(name):
            raise ConversionError(f"{files.path(name)} is missing: it is the chunk {list(index)} of {fqn!r}; "
                                  "the checkpoint is incomplete, copy all of its files")
        file, start, size = files.locate(name)
        found = os.stat(file)
        where = (found.st_dev, found.st_ino, start)  # (a link, symbolic or hard, to another chunk of the tensor)
        if where in placed:
            raise ConversionError(f"{files.path(name)} is the same file as {files.path(placed[where])}: two "
                                  f"chunks of {fqn!r} at the same bytes; the checkpoint is damaged, copy it again")
        placed[where] = name
        if size != chunk_bytes:
            raise ConversionError(f"{files.path(name)} is damaged: it has {size} bytes, a chunk of {fqn!r} "
                                  f"({dtype} {list(chunk_shape)}) has {chunk_bytes}; copy the checkpoint again")
        offsets = tuple(i * c for i, c in zip(index, chunk_shape, strict=True))
        sizes = tuple(min(c, s - o) for c, s, o in zip(chunk_shape, shape, offsets, strict=True))
        chunks.append(ZarrChunk(offsets, sizes, file, StoredTensor(dtype, sizes, strides, start)))
    check_tiling(path, fqn, shape, [(c.offsets, c.sizes) for c in chunks])
    return ZarrTensor(fqn, dtype, shape, tuple(chunks))


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a field appears twice among {describe(keys)}")
    return dict(pairs)


def _metadata(path: str, data: bytes) -> tuple[str, int, tuple[int, ...], tuple[int, ...]]:
    """(torch dtype name, bytes per element, shape, chunk shape) from a `.zarray`, every field checked."""
    try:
        meta = json.loads(data.decode("utf-8"), object_pairs_hook=_unique)
    except Exception as exc:  # (bad UTF-8, bad JSON, nesting too deep)
        raise damaged(path, f"it is not JSON: {first_line(exc)}") from None
    if not isinstance(meta, dict):
        raise damaged(path, f"it holds {describe(meta)}, not an object")
    unknown = sorted(set(meta) - _FIELDS)
    if unknown:
        raise ConversionError(f"{path} has fields {describe(unknown)} that zarr v2 does not define; streamconv "
                              "reads only the arrays megatron-core's zarr backend writes")
    missing = sorted(_FIELDS - {"dimension_separator"} - set(meta))
    if missing:
        raise damaged(path, f"no {', '.join(missing)}")
    if type(meta["zarr_format"]) is not int or meta["zarr_format"] != 2:
        raise ConversionError(f"{path} is zarr format {describe(meta['zarr_format'])}; streamconv reads zarr v2 "
                              "arrays, as megatron-core's zarr backend writes them")
    compressor = meta["compressor"]
    if compressor is not None:
        raise ConversionError(f"{path}: the chunks are compressed with {_codec(compressor)}, which streamconv does "
                              "not read; re-save the arrays uncompressed (compressor=None, as megatron-core writes "
                              "them) or save the checkpoint with the torch_dist backend")
    filters = meta["filters"]
    if filters is not None and filters != []:
        named = ", ".join(_codec(f) for f in filters) if isinstance(filters, list) else describe(filters)
        raise ConversionError(f"{path}: the chunks pass through the filters {named}, which streamconv does not "
                              "read; re-save the arrays without filters, or with the torch_dist backend")
    if meta["order"] != "C":
        what = "Fortran (column-major) order" if meta["order"] == "F" else f"order {describe(meta['order'])}"
        raise ConversionError(f"{path}: the chunks are stored in {what}; streamconv reads C order, as megatron-core "
                              "writes it; re-save the arrays with order='C'")
    separator = meta.get("dimension_separator", ".")
    if separator == "/":
        raise ConversionError(f"{path}: the chunks are nested folders (dimension_separator '/'), which megatron-core "
                              "does not write and streamconv does not read; re-save the arrays with '.'")
    if separator != ".":
        raise damaged(path, f"dimension_separator is {describe(separator)}")
    if meta["fill_value"] is not None and not isinstance(meta["fill_value"], bool | int | float | str):
        raise damaged(path, f"fill_value is {describe(meta['fill_value'])}")
    dtype = meta["dtype"]
    if isinstance(dtype, str) and dtype[:1] == ">":
        raise ConversionError(f"{path}: the elements are big-endian ({dtype}); streamconv reads little-endian "
                              "checkpoints only, as megatron-core writes them")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ConversionError(f"{path}: the elements are of the zarr dtype {describe(dtype)}, which streamconv does "
                              f"not convert (it reads {', '.join(sorted(set(_DTYPES.values())))})")
    shape, chunks = naturals(path, meta["shape"], "shape"), naturals(path, meta["chunks"], "chunks")
    if len(shape) != len(chunks):
        raise damaged(path, f"shape {list(shape)} and chunks {list(chunks)} differ in rank")
    if any(c == 0 < s for s, c in zip(shape, chunks, strict=True)):
        raise damaged(path, f"chunks {list(chunks)} has an empty axis where shape {list(shape)} has not")
    name = _DTYPES[dtype]
    return f"torch.{name}", safe_pickle.DTYPES[name], shape, chunks


def _codec(config: Any) -> str:
    """A codec's name as a `.zarray` gives it ('blosc/zstd'), bounded."""
    if not isinstance(config, dict) or not isinstance(config.get("id"), str):
        return describe(config)
    name = config["id"][:40]
    cname = config.get("cname")
    return f"{name}/{cname[:40]}" if isinstance(cname, str) else name
