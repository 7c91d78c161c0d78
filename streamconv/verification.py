"""`streamconv --verify`: re-read a checkpoint and a converted folder and compare them bit for bit.

The expected folder is derived again from the checkpoint (names, shapes, dtypes, config); every output
tensor is recomputed from the source with the same arrangement code and compared with the bytes on
disk. Memory stays bounded as in conversion: one recomputed tensor, one read chunk, and the pages of
the output tensor being compared, each handed back when done.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import TYPE_CHECKING

import numpy as np

from streamconv.arrange import Arranger
from streamconv.converter import CONFIG_NAME, INDEX_NAME, build_plan, import_torch, read_tokenizer, resolve_dtype
from streamconv.pipeline import arrange_into, needs_torch, source_of
from streamconv.plan import TensorSpec, safetensors_dtype
from streamconv.sources import Checkpoint, open_checkpoint

if TYPE_CHECKING:
    import torch


def verify(
    checkpoint_path: str | os.PathLike[str],
    save_path: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    vocab_size: int | None = None,
    num_heads: int | None = None,
    tokenizer_path: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Every difference between `save_path` and the conversion of `checkpoint_path`; empty if none."""
    save_path = os.fspath(save_path)
    parent = os.path.dirname(os.path.abspath(save_path))
    model = read_tokenizer(os.fspath(tokenizer_path)) if tokenizer_path is not None else None
    with open_checkpoint(checkpoint_path, parent if os.path.isdir(parent) else None) as checkpoint:
        if model is not None:  # it may set the vocabulary size, as in conversion
            checkpoint.tokenizer = model
        return _verify(checkpoint, save_path, dtype, vocab_size, num_heads)


def _verify(checkpoint: Checkpoint, save_path: str, dtype: str | torch.dtype | None, vocab_size: int | None,
            num_heads: int | None) -> list[str]:
    plan, config = build_plan(checkpoint, 2**62, resolve_dtype(dtype), vocab_size, num_heads)
    expected = {t.name: t for t in plan.tensors}
    problems: list[str] = []

    problems += _check_config(save_path, config)
    files, index_problems = _shard_files(save_path)
    problems += index_problems
    found: dict[str, tuple[str, int, int]] = {}  # name -> (file, absolute begin, absolute end)
    total = 0
    for file in files:
        header_problems, tensors = _read_header(os.path.join(save_path, file))
        problems += [f"{file}: {p}" for p in header_problems]
        for name, (dtype_name, shape, begin, end) in tensors.items():
            total += end - begin
            if name in found:
                problems.append(f"{name}: stored twice ({found[name][0]} and {file})")
                continue
            found[name] = (file, begin, end)
            spec = expected.get(name)
            if spec is None:
                problems.append(f"{file}: unexpected tensor {name}")
            elif (dtype_name, shape) != (safetensors_dtype(spec.dtype), list(spec.recipe.shape)):
                problems.append(
                    f"{name}: {dtype_name} {shape} on disk, expected {safetensors_dtype(spec.dtype)} "
                    f"{list(spec.recipe.shape)}"
                )
    problems += [f"{name}: missing from the output" for name in expected if name not in found]
    if os.path.exists(os.path.join(save_path, INDEX_NAME)):
        index = _load_json(os.path.join(save_path, INDEX_NAME))
        if index.get("metadata", {}).get("total_size") != total:
            problems.append(f"{INDEX_NAME}: total_size {index.get('metadata', {}).get('total_size')}, "
                            f"the shards hold {total} bytes")
        for name, file in index.get("weight_map", {}).items():
            if found.get(name, (file,))[0] != file:
                problems.append(f"{INDEX_NAME}: maps {name} to {file}, but it is in {found[name][0]}")

    if not problems:
        problems += _compare_bytes(checkpoint, save_path, expected, found)
    return problems


def _check_config(save_path: str, config: dict) -> list[str]:
    path = os.path.join(save_path, CONFIG_NAME)
    if not os.path.exists(path):
        return [f"{CONFIG_NAME}: missing"]
    written = _load_json(path)
    return [f"{CONFIG_NAME}: {key} is {written.get(key)!r}, expected {value!r}"
            for key, value in config.items() if written.get(key) != value]


def _shard_files(save_path: str) -> tuple[list[str], list[str]]:
    present = sorted(f for f in os.listdir(save_path) if f.endswith(".safetensors"))
    if os.path.exists(os.path.join(save_path, INDEX_NAME)):
        listed = sorted(set(_load_json(os.path.join(save_path, INDEX_NAME)).get("weight_map", {}).values()))
        problems = [f"{INDEX_NAME}: names {f}, which is missing" for f in listed if f not in present]
        problems += [f"{f}: not named in {INDEX_NAME}" for f in present if f not in listed]
        return [f for f in listed if f in present], problems
    if present != ["model.safetensors"]:
        return present, [f"expected model.safetensors alone (no index), found {present or 'no shards'}"]
    return present, []


def _read_header(path: str) -> tuple[list[str], dict[str, tuple[str, list[int], int, int]]]:
    """Parse a safetensors header; offsets returned are absolute file positions."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return ["shorter than a safetensors header"], {}
        (length,) = struct.unpack("<Q", raw)
        if 8 + length > size:
            return [f"header length {length} runs past the end of the file"], {}
        try:
            header = json.loads(f.read(length))
        except ValueError as exc:
            return [f"header is not JSON ({exc})"], {}
    problems = []
    if header.pop("__metadata__", None) != {"format": "pt"}:
        problems.append('metadata is not {"format": "pt"}')
    start = 8 + length
    tensors = {k: (v["dtype"], v["shape"], start + v["data_offsets"][0], start + v["data_offsets"][1])
               for k, v in header.items()}
    spans = sorted((b, e) for _, _, b, e in tensors.values())
    end = start
    for b, e in spans:
        if b != end:
            problems.append(f"data has a gap or overlap at byte {b}")
        end = e
    if end != size:
        problems.append(f"file is {size} bytes, its tensors end at {end}")
    return problems, tensors


def _compare_bytes(checkpoint: Checkpoint, save_path: str, expected: dict[str, TensorSpec],
                   found: dict[str, tuple[str, int, int]]) -> list[str]:
    problems = []
    arranger = Arranger()
    maps: dict[str, mmap.mmap] = {}
    buffer = np.empty(max(s.nbytes for s in expected.values()), dtype=np.uint8)
    if needs_torch(expected.values(), checkpoint, "cpu"):
        import_torch()
    try:
        for name, spec in expected.items():
            file, begin, end = found[name]
            if file not in maps:
                with open(os.path.join(save_path, file), "rb") as f:
                    maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            arrange_into(buffer, spec, source_of(spec, checkpoint), "cpu", arranger, checkpoint.release)
            on_disk = np.frombuffer(maps[file], dtype=np.uint8, count=end - begin, offset=begin)
            if not np.array_equal(on_disk, buffer[: spec.nbytes]):
                first = int(np.flatnonzero(on_disk != buffer[: spec.nbytes])[0])
                problems.append(f"{name}: bytes differ from the converted source (first at byte {first} "
                                f"of the tensor, file offset {begin + first} in {file})")
            del on_disk
            page = begin & ~(mmap.PAGESIZE - 1)
            maps[file].madvise(mmap.MADV_DONTNEED, page, end - page)
    finally:
        arranger.close()
        for m in maps.values():
            m.close()
    return problems


def _load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
