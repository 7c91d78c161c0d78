"""torch distributed checkpoints (DCP, megatron-core's `torch_dist` backend), read without torch.

The folder holds `.metadata`, a pickle of torch's `Metadata`: for each key (fqn) a `TensorStorageMetadata`
(dtype, global shape, the chunks that tile it) or a `BytesStorageMetadata` (a pickled object), and a map
from each chunk (`MetadataIndex(fqn, offsets)`) to where it lies (`_StorageInfo(relative_path, offset,
length)`). torch reads it with plain `pickle.load`; here the restricted unpickler builds inert records
for exactly the globals torch writes, and anything else is refused by name. Each tensor chunk is a complete
torch.save zip inside a `__R_I.distcp` file, viewed in place by `torch_zip.load(path, offset, length)`.

Only model weights are indexed: `optimizer.*`, `rng_state` and `_extra_state` keys, and every bytes
object, are listed by name in `DcpIndex.skipped` and never read (they share the `.distcp` files with the
weights and are several times their size).
"""

from __future__ import annotations

import io
import os
import pickle
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from streamconv.errors import ConversionError, describe, first_line
from streamconv.sources import safe_pickle, torch_zip
from streamconv.sources.records import Box, Files, Folder, check_tiling, damaged, naturals

METADATA = ".metadata"
_MAX_METADATA = 2**30  # (the index of a large model and its optimizer state runs to many MB)


class _Record:
    """An inert stand-in for one of torch's DCP metadata classes: it records the state the pickle gives
    it (once) and does nothing else. `tuple_fields` names the items of a tuple state (TensorProperties)."""

    tuple_fields: ClassVar[tuple[str, ...]] = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> _Record:
        if args or kwargs:
            raise pickle.UnpicklingError(f"unexpected arguments for {cls.__name__}")
        record = object.__new__(cls)
        record.state = {}
        record.built = False
        return record

    def __setstate__(self, state: Any) -> None:
        if self.built:
            raise pickle.UnpicklingError(f"the pickle sets the state of a {type(self).__name__} twice")
        if isinstance(state, tuple) and self.tuple_fields and len(state) == len(self.tuple_fields):
            state = dict(zip(self.tuple_fields, state, strict=True))
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise pickle.UnpicklingError(f"unexpected state for {type(self).__name__}: {describe(state)}")
        self.state, self.built = state, True

    def get(self, name: str, default: Any = None) -> Any:
        return self.state.get(name, default)


def _record(name: str, fields: tuple[str, ...] = ()) -> type[_Record]:
    return type(name, (_Record,), {"tuple_fields": fields})


def _named(kind: str, names: set[Any]) -> Any:
    """A stand-in for a function that rebuilds a value from its name (a layout, a memory format, a
    path): it returns the name, checked against `names` when given."""
    def rebuild(*args: Any) -> str:
        if not all(isinstance(a, str | int) for a in args) or (names and (len(args) != 1 or args[0] not in names)):
            raise pickle.UnpicklingError(f"unexpected {kind} {describe(args)}")
        return "/".join(map(str, args))
    return rebuild


_TENSOR_PROPERTIES = _record("TensorProperties", ("dtype", "layout", "requires_grad", "memory_format", "pin_memory"))
_MEM_FORMAT = _named("memory format", {0, 1, 2})
_LAYOUTS = {"torch.strided", "torch.sparse_coo", "torch.sparse_csr", "torch.sparse_csc", "torch.sparse_bsr",
            "torch.sparse_bsc", "torch._mkldnn", "torch.jagged"}
# dtypes stand as their names; a weight must have one of safe_pickle.DTYPES, other tensors may have any
_DTYPE_NAMES = {*safe_pickle.DTYPES, "complex32", "complex64", "complex128", "uint16", "uint32", "uint64",
                "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
                "float4_e2m1fn_x2", "qint8", "quint8", "qint32", "quint4x2", "quint2x4"}
_RECORDS = {name: _record(name) for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "MetadataIndex", "StorageMeta", "_StorageInfo")}
_RECORDS["TensorProperties"] = _TENSOR_PROPERTIES
_CHECKPOINT = "torch.distributed.checkpoint"
_STAND_INS: dict[str, Any] = {
    **{f"{_CHECKPOINT}.metadata.{name}": record for name, record in _RECORDS.items() if name != "_StorageInfo"},
    f"{_CHECKPOINT}.filesystem._StorageInfo": _RECORDS["_StorageInfo"],
    # TensorProperties and its memory-format enum: newer torch, older torch
    f"{_CHECKPOINT}.metadata._MEM_FORMAT_ENCODING": _MEM_FORMAT,
    "torch.distributed._shard.sharded_tensor.metadata.TensorProperties": _TENSOR_PROPERTIES,
    "torch.distributed._shard.sharded_tensor.metadata.MEM_FORMAT_ENCODING": _MEM_FORMAT,
    "torch.serialization._get_layout": _named("layout", _LAYOUTS),
    **{name: name for name in _LAYOUTS},  # (a layout pickled as a global)
    **{f"torch.{name}": f"torch.{name}" for name in _DTYPE_NAMES},
    **{f"torch.{name}": f"torch.{name}" for name in ("contiguous_format", "channels_last", "preserve_format")},
    "torch.Size": tuple,
    # the ranks' save plans, which newer torch keeps in the Metadata (`all_local_plans`): recorded, never used
    **{f"{_CHECKPOINT}.planner.{name}": _record(name) for name in ("SavePlan", "WriteItem", "TensorWriteData",
                                                                    "BytesIOWriteData")},
    f"{_CHECKPOINT}.planner.WriteItemType": _named("write item type", {1, 2, 3}),
    # StorageMeta.checkpoint_id: the path torch was given when saving (recorded, never used)
    **{f"pathlib.{name}": _named("path", set()) for name in ("Path", "PosixPath", "PurePosixPath", "WindowsPath",
                                                              "PureWindowsPath")},
}


class _Unpickler(safe_pickle.Unpickler):
    """The restricted unpickler plus inert stand-ins for the globals of torch's DCP `Metadata` pickle."""

    _with_stand_ins: dict[str, Any] = {}

    @classmethod
    def allowed(cls) -> dict[str, Any]:
        if not cls._with_stand_ins:
            cls._with_stand_ins = {**safe_pickle.Unpickler.allowed(), **_STAND_INS}
        return cls._with_stand_ins


@dataclass(frozen=True)
class Chunk:
    """One chunk of a tensor: its box in the global tensor and where its torch.save archive lies."""

    fqn: str
    dtype: str  # 'torch.bfloat16'
    offsets: tuple[int, ...]  # in the global tensor
    sizes: tuple[int, ...]
    file: str  # the .distcp file, relative to the checkpoint folder
    offset: int  # the archive's bytes in that file
    length: int


@dataclass(frozen=True)
class DcpTensor:
    """A weight: dtype name, global shape, and the chunks that tile it exactly."""

    fqn: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class DcpIndex:
    files: Files
    tensors: dict[str, DcpTensor]  # the weights, by fqn
    skipped: tuple[str, ...]  # keys never read: optimizer state, rng state, _extra_state, bytes objects
    extra: dict[str, Any]  # other Metadata fields (megatron-core's `mcore_data`), as plain data
    common_state: tuple[str, int, int] | None = None  # (file, offset, length) of megatron-core's COMMON_STATE


# megatron-core >= 0.17 keeps what common.pt held as a ShardedObject: a bytes item, the torch.save archive of
# `[state]`, under this key (rank 0's copy)
COMMON_STATE = "common_state/shard_0_1"


_NOT_WEIGHTS = re.compile(r"^(optimizer[./]|rng_state(?:$|[./]))|(^|[./])_extra_state")


def is_weight(fqn: str) -> bool:
    """False for the keys that are never read: optimizer state, rng state, `_extra_state`."""
    return _NOT_WEIGHTS.search(fqn) is None


def read_metadata(files: Files | str | os.PathLike[str]) -> DcpIndex:
    """The weights of the distributed checkpoint in `files` (or a folder), read from its `.metadata` (no
    tensor bytes).

    Refused (ConversionError, one line): a damaged or hostile `.metadata`, a chunk file that is missing, not
    a regular file or outside the folder, a chunk past its file's end or stored through stream transforms,
    chunks that do not tile their tensor exactly, two chunks of a tensor at the same bytes.
    """
    files = files if isinstance(files, Files) else Folder(os.fspath(files))
    path = files.path(METADATA)
    if not files.exists(METADATA):
        raise ConversionError(f"{path} not found: not a torch distributed checkpoint")
    metadata = _load(path, files.read(METADATA, _MAX_METADATA))
    fields = metadata.state
    tensors, skipped = _entries(path, fields.get("state_dict_metadata"))
    places = _places(files, path, fields.get("storage_data"), {**tensors, COMMON_STATE: None})
    index: dict[str, DcpTensor] = {}
    for fqn, (dtype, shape, boxes) in tensors.items():
        if fqn not in places:  # (not a weight)
            continue
        if dtype.removeprefix("torch.") not in safe_pickle.DTYPES:
            raise ConversionError(f"{path}: weight {fqn!r} has dtype {dtype}, which streamconv does not convert")
        check_tiling(path, fqn, shape, boxes)
        chunks, placed = [], {}
        for offsets, sizes in boxes:
            place = places[fqn].get(offsets)
            if place is None:
                raise ConversionError(f"{path} names no file for the chunk of {fqn!r} at {list(offsets)}; "
                                      "the checkpoint is incomplete, copy it again")
            if place in placed:
                raise damaged(path, f"the chunks of {fqn!r} at {list(placed[place])} and {list(offsets)} are the "
                                    f"same bytes, {place[2]} at byte {place[1]} of {place[0]}")
            placed[place] = offsets
            chunks.append(Chunk(fqn, dtype, offsets, sizes, *place))
        index[fqn] = DcpTensor(fqn, dtype, shape, tuple(chunks))
    known = ("state_dict_metadata", "storage_data", "planner_data", "storage_meta", "version")
    extra = {k: v for k, v in fields.items() if k not in known}
    common = places[COMMON_STATE].get(()) if COMMON_STATE in skipped else None
    return DcpIndex(files, index, tuple(skipped), extra, common)


def chunk_tensor(files: Files | str | os.PathLike[str], chunk: Chunk) -> tuple[str, torch_zip.StoredTensor]:
    """The file holding the chunk, and the chunk's tensor as its torch.save archive describes it (offsets
    into that file), checked against the metadata. Reads the archive's directory and pickle, no tensor bytes."""
    files = files if isinstance(files, Files) else Folder(os.fspath(files))
    path = files.path(chunk.file)
    file, start, _ = files.locate(chunk.file)
    stored = torch_zip.load(file, start + chunk.offset, chunk.length, path)
    if not isinstance(stored, torch_zip.StoredTensor):
        raise ConversionError(f"{path}: the chunk of {chunk.fqn!r} at byte {chunk.offset} holds a "
                              f"{type(stored).__name__}, not a tensor; the checkpoint is damaged")
    if stored.shape != chunk.sizes or stored.dtype != chunk.dtype:
        raise ConversionError(f"{path}: the chunk of {chunk.fqn!r} at byte {chunk.offset} is a {stored.dtype} "
                              f"{list(stored.shape)}, but .metadata says {chunk.dtype} {list(chunk.sizes)}; "
                              "the checkpoint is damaged")
    return file, stored


def _load(path: str, data: bytes) -> _Record:
    """The `Metadata` record pickled in `data` (`path`'s bytes), refused if anything in it is off the allow-list."""
    try:
        # Each chunk costs about 140 opcodes in a megatron-core index (2.4 bytes each): the bounds grow with
        # the file beyond 8 MB, so a model of some 100,000 chunks reads, and a small file stays bounded.
        metadata = _Unpickler(io.BytesIO(data), scale=max(1, -(-len(data) // safe_pickle.MAX_OPCODES))).load()
    except safe_pickle.Dangerous as exc:
        raise safe_pickle.tampered(path, exc) from None
    except Exception as exc:  # a damaged pickle can fail in many ways
        raise ConversionError(f"cannot read {path}: it is truncated or damaged ({first_line(exc):.200}); "
                              "copy the checkpoint again") from None
    name = safe_pickle.refused_global(metadata)
    if name is not None:
        raise ConversionError(f"{path} contains a pickled reference to {name}, which streamconv refuses to load "
                              "(only torch's checkpoint metadata is allowed); do not trust this checkpoint")
    if not _is(metadata, "Metadata"):
        raise ConversionError(f"{path} holds a {type(metadata).__name__}, not torch's checkpoint Metadata")
    return metadata


def _is(record: Any, name: str) -> bool:
    return type(record) is _RECORDS[name]


def _entries(path: str, entries: Any) -> tuple[dict[str, tuple[str, tuple[int, ...], list[Box]]], list[str]]:
    """fqn -> (dtype, global shape, chunk boxes) of each tensor; the keys skipped (not weights or bytes)."""
    if not isinstance(entries, dict):
        raise damaged(path, "no state_dict_metadata")
    tensors, skipped = {}, []
    for fqn, entry in entries.items():
        if not isinstance(fqn, str):
            raise damaged(path, f"a key is {describe(fqn)}")
        if _is(entry, "BytesStorageMetadata") or (_is(entry, "TensorStorageMetadata") and not is_weight(fqn)):
            skipped.append(fqn)
            continue
        if not _is(entry, "TensorStorageMetadata") or not _is(entry.get("properties"), "TensorProperties"):
            raise damaged(path, f"{fqn!r} is described by {type(entry).__name__}")
        dtype = entry.get("properties").get("dtype")
        shape = naturals(path, entry.get("size"), f"the shape of {fqn!r}")
        chunks = entry.get("chunks")
        if not isinstance(dtype, str) or not isinstance(chunks, list):
            raise damaged(path, f"the dtype or chunks of {fqn!r}")
        boxes = []
        for chunk in chunks:
            if not _is(chunk, "ChunkStorageMetadata"):
                raise damaged(path, f"a chunk of {fqn!r} is a {type(chunk).__name__}")
            box = (naturals(path, chunk.get("offsets"), f"a chunk offset of {fqn!r}"),
                   naturals(path, chunk.get("sizes"), f"a chunk size of {fqn!r}"))
            if not len(box[0]) == len(box[1]) == len(shape):
                raise damaged(path, f"a chunk of {fqn!r} has {len(box[0])} dimensions, the tensor {len(shape)}")
            boxes.append(box)
        tensors[fqn] = (dtype, shape, boxes)
    return tensors, skipped


def _places(files: Files, path: str, storage: Any, tensors: dict) -> dict[str, dict[tuple[int, ...], tuple]]:
    """fqn -> chunk offsets -> (file, offset, length), for the weights' chunks, each checked to lie inside
    a regular file of the checkpoint. The other entries are not looked at."""
    if not isinstance(storage, dict):
        raise damaged(path, "no storage_data")
    places: dict[str, dict[tuple[int, ...], tuple]] = {fqn: {} for fqn in tensors}
    sizes: dict[str, int] = {}
    for key, info in storage.items():
        if not _is(key, "MetadataIndex") or not isinstance(key.get("fqn"), str):
            raise damaged(path, f"a storage key is a {type(key).__name__}")
        if key.get("fqn") not in places:
            continue
        offset = key.get("offset")  # (a bytes item has none)
        offsets = () if offset is None else naturals(path, offset, f"a chunk offset of {key.get('fqn')!r}")
        if not _is(info, "_StorageInfo"):
            raise damaged(path, f"the storage of {key.get('fqn')!r} is a {type(info).__name__}")
        places[key.get("fqn")][offsets] = _place(files, path, key.get("fqn"), info, sizes)
    return places


def _place(files: Files, path: str, fqn: str, info: _Record, sizes: dict[str, int]) -> tuple[str, int, int]:
    """(file, offset, length) of one chunk, checked: a plain name in the folder, a range inside the file,
    no stream transforms."""
    name, offset, length = info.get("relative_path"), info.get("offset"), info.get("length")
    transforms = info.get("transform_descriptors")
    if transforms:
        raise ConversionError(f"{path}: the chunk of {fqn!r} is stored through stream transforms "
                              f"{describe(list(transforms))} (such as compression), which streamconv does not read; "
                              "save the checkpoint without them")
    if not isinstance(name, str) or type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
        raise damaged(path, f"the storage of {fqn!r} is {describe(info.state)}")
    if name not in sizes:
        sizes[name] = files.locate(name)[2]
    if offset + length > sizes[name]:
        raise ConversionError(f"{files.path(name)} is truncated: .metadata puts a chunk of {fqn!r} at "
                              f"bytes {offset}..{offset + length}, the file has {sizes[name]}; copy it again")
    return name, offset, length
