"""Unpickle a torch zip checkpoint, a whole `.ckpt` or one at a byte range of a larger file, mmap-backed.

A plain `.nemo` is a tar; its `model_weights.ckpt` member is a torch zip file stored contiguously inside
it. torch.load only opens whole files, so this does what `torch.load(mmap=True)` does, at an offset:
zipfile locates the members through a window onto the range, the WHOLE file is mapped once (private,
as torch does), and the pickle's persistent ids become typed storages sliced out of that mapping.
Tensors are then views into the mapping exactly as with torch.load, so `Checkpoint.release`,
`prefetch` and `file_offset` work unchanged (offsets are into the outer file). The pickle is read by
`safe_pickle.Unpickler`: nothing off its allow-list is imported or called.

`peek` reads the same pickle without torch, each tensor described by a `StoredTensor`: enough to plan a
conversion while torch is still being imported (head_start.py).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import zipfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from streamconv.errors import ConversionError
from streamconv.sources import safe_pickle

if TYPE_CHECKING:
    import torch

_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # zip local file header: signature .. name length, extra length


class _Window(io.RawIOBase):
    """A read-only, seekable view of bytes [offset, offset + size) of an open file descriptor."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        super().__init__()
        self.fd, self.offset, self.size, self.pos = fd, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self.size - self.pos))
        data = os.pread(self.fd, n, self.offset + self.pos) if n else b""
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


class _Unpickler(safe_pickle.Unpickler):
    """The restricted unpickler, plus torch's storage type names and storages from the mapping."""

    def __init__(self, data: bytes, storage_for: Any) -> None:
        super().__init__(io.BytesIO(data))
        self.storage_for = storage_for

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if module == "torch" and name == "UntypedStorage":
            return torch.UntypedStorage
        if module == "torch" and name.endswith("Storage"):
            try:
                return torch.serialization.StorageType(name)
            except KeyError:
                pass
        return super().find_class(module, name)

    def persistent_load(self, saved_id: Any) -> Any:
        if not isinstance(saved_id, tuple) or len(saved_id) != 5 or saved_id[0] not in ("storage", b"storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {saved_id!r:.80}")
        import torch

        _, storage_type, key, _location, numel = saved_id
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else getattr(storage_type, "dtype", None)
        if not isinstance(dtype, torch.dtype) or not isinstance(numel, int):
            raise pickle.UnpicklingError(f"unexpected storage {storage_type!r:.80}")
        return self.storage_for(str(key), dtype, numel)


def map_file(path: str) -> torch.UntypedStorage:
    """A private, read-only-in-practice mapping of the whole file, as torch.load(mmap=True) makes."""
    import torch

    return torch.UntypedStorage.from_file(path, False, os.path.getsize(path))


def load(path: str, offset: int = 0, size: int | None = None, mapping: torch.UntypedStorage | None = None) -> Any:
    """The object pickled in the torch zip file at [offset, offset + size) of `path`, tensors mmap-backed.

    `mapping` (from `map_file(path)`) lets several checkpoints inside one file share one mapping.
    Raises ConversionError (one line) for a damaged or truncated zip, compressed members or big-endian data.
    """
    import torch

    members, data = _members(path, offset, size)
    mapping = map_file(path) if mapping is None else mapping
    loaded: dict[str, torch.storage.TypedStorage] = {}

    def storage_for(key: str, dtype: torch.dtype, numel: int) -> torch.storage.TypedStorage:
        if key not in loaded:
            nbytes = numel * torch._utils._element_size(dtype)
            start, length = members.get(key, (None, 0))
            if start is None or nbytes > length:
                raise ConversionError(f"{path}: storage {key!r} is missing or shorter than its tensor; "
                                      "the checkpoint is damaged, copy or download it again")
            loaded[key] = torch.storage.TypedStorage(
                wrap_storage=mapping[offset + start : offset + start + nbytes], dtype=dtype, _internal=True)
        return loaded[key]

    return _unpickle(path, _Unpickler(data, storage_for))


def _members(path: str, offset: int, size: int | None) -> tuple[dict[str, tuple[int, int]], bytes]:
    """Storage key -> (start, length) relative to `offset`, and the data.pkl bytes, of the zip at the range."""
    file_size = os.path.getsize(path)
    size = file_size - offset if size is None else size
    if offset + size > file_size:
        raise ConversionError(f"{path} is truncated (the checkpoint inside it ends past the end of the file)")
    fd = os.open(path, os.O_RDONLY)
    try:
        members, data, byteorder = _read_directory(path, fd, offset, size)
    finally:
        os.close(fd)
    if byteorder not in (b"", sys.byteorder.encode()):
        raise ConversionError(f"{path}: the checkpoint was saved {byteorder.decode(errors='replace')}-endian, "
                              f"this machine is {sys.byteorder}-endian; re-save it on a matching machine")
    return members, data


def _unpickle(path: str, unpickler: pickle.Unpickler) -> Any:
    try:
        return unpickler.load()
    except ConversionError:
        raise
    except Exception as exc:  # a damaged pickle can fail in many ways
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"cannot read checkpoint {path}: it is damaged ({reason}); "
                              "copy or download it again") from None


# ---- without torch -------------------------------------------------------------------------------------

_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
             "int8": 1, "uint8": 1, "bool": 1}
_STORAGE_DTYPES = {"DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
                   "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
                   "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
                   "UntypedStorage": "uint8"}


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as the pickle describes it, read without torch: dtype name, shape and file offset."""

    dtype: str  # as str(torch.dtype) gives it: 'torch.bfloat16'
    shape: tuple[int, ...]
    offset: int  # where element 0 lies in the file
    contiguous: bool

    @property
    def nbytes(self) -> int:
        n = _ITEMSIZE[self.dtype.removeprefix("torch.")]
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class _Stored:
    """A storage: its dtype name and its bytes [start, end) in the file."""

    dtype: str
    start: int
    end: int


@dataclass(frozen=True)
class _StorageType:
    dtype: str


def _stored_tensor(storage: _Stored, storage_offset: int, size: tuple, stride: tuple,
                   dtype: str | None = None) -> StoredTensor:
    dtype = dtype or storage.dtype
    shape, expected, contiguous = tuple(size), 1, True
    for d, s in zip(reversed(shape), reversed(tuple(stride)), strict=True):
        contiguous = contiguous and (d == 1 or s == expected)
        expected *= d
    tensor = StoredTensor(f"torch.{dtype}", shape, storage.start + storage_offset * _ITEMSIZE[dtype], contiguous)
    if contiguous and tensor.offset + tensor.nbytes > storage.end:
        raise pickle.UnpicklingError("a tensor ends past its storage")
    return tensor


_PEEK_ALLOWED: dict[str, Any] = {
    "torch._utils._rebuild_tensor_v2": lambda storage, offset, size, stride, *_: _stored_tensor(
        storage, offset, size, stride),
    "torch._utils._rebuild_tensor_v3": lambda storage, offset, size, stride, _grad, _hooks, dtype, *_: _stored_tensor(
        storage, offset, size, stride, dtype),
    "torch._utils._rebuild_parameter": lambda data, *_: data,
    "torch.Size": tuple,
    "torch.device": str,
    **{f"torch.{name}": name for name in safe_pickle.DTYPES},  # a dtype stands as its name
    **{f"torch.{name}": _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _PeekUnpickler(safe_pickle.Unpickler):
    """The restricted unpickler with torch's tensor-building globals replaced by `StoredTensor` makers."""

    _peek_allowed: dict[str, Any] = {}

    def __init__(self, data: bytes, members: dict[str, tuple[int, int]], offset: int) -> None:
        super().__init__(io.BytesIO(data))
        self.members, self.offset = members, offset

    @classmethod
    def allowed(cls) -> dict[str, Any]:
        if not cls._peek_allowed:
            cls._peek_allowed = {**safe_pickle.plain_allowed(), **_PEEK_ALLOWED}
        return cls._peek_allowed

    def persistent_load(self, saved_id: Any) -> Any:
        if not isinstance(saved_id, tuple) or len(saved_id) != 5 or saved_id[0] not in ("storage", b"storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {saved_id!r:.80}")
        _, storage_type, key, _location, numel = saved_id
        start, length = self.members.get(str(key), (None, 0))
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or start is None:
            raise pickle.UnpicklingError(f"unexpected storage {saved_id!r:.80}")
        end = self.offset + start + min(length, numel * _ITEMSIZE[storage_type.dtype])
        return _Stored(storage_type.dtype, self.offset + start, end)


def peek(path: str) -> Any:
    """The object pickled in the torch zip file `path`, each tensor a `StoredTensor`; torch is not imported.

    Raises ConversionError as `load` does. Reads the zip directory and the pickle, no tensor bytes.
    """
    members, data = _members(path, 0, None)
    return _unpickle(path, _PeekUnpickler(data, members, 0))


def _read_directory(path: str, fd: int, offset: int, size: int) -> tuple[dict[str, tuple[int, int]], bytes, bytes]:
    """Storage key -> (start, length) of its bytes relative to `offset`, the data.pkl bytes, the byteorder."""
    window = _Window(fd, offset, size)
    try:
        with zipfile.ZipFile(window) as archive:
            pickles = [i.filename for i in archive.infolist() if i.filename.rsplit("/", 1)[-1] == "data.pkl"]
            if not pickles:
                raise ConversionError(f"{path}: the weights are a zip file but not a torch checkpoint (no data.pkl)")
            prefix = pickles[0][: -len("data.pkl")]
            data = archive.read(pickles[0])
            names = set(archive.namelist())
            byteorder = archive.read(prefix + "byteorder") if prefix + "byteorder" in names else b""
            members: dict[str, tuple[int, int]] = {}
            for info in archive.infolist():
                if not info.filename.startswith(prefix + "data/"):
                    continue
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ConversionError(f"{path}: member {info.filename!r} is compressed; torch writes "
                                          "checkpoints uncompressed, re-save it with torch.save")
                header = os.pread(fd, _LOCAL_HEADER.size, offset + info.header_offset)
                if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
                    raise zipfile.BadZipFile(f"bad local header for {info.filename}")
                fields = _LOCAL_HEADER.unpack(header)
                start = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
                if start + info.file_size > size:
                    raise zipfile.BadZipFile(f"{info.filename} ends past the end of the checkpoint")
                members[info.filename[len(prefix + "data/"):]] = (start, info.file_size)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise ConversionError(f"{path}: its torch checkpoint is truncated or damaged ({exc}); "
                              "copy or download it again") from None
    return members, data, byteorder
