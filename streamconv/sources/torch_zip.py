"""Read a torch zip checkpoint, a whole `.ckpt` or one at a byte range of a larger file, without torch.

A plain `.nemo` is a tar; its `model_weights.ckpt` member is a torch zip file stored contiguously inside
it, so both are read the same way: zipfile locates the members through a window onto the range, and the
pickle is read by `safe_pickle.Unpickler`, nothing off its allow-list imported or called. torch's
tensor-building globals are replaced by stand-ins that describe each tensor as a `StoredTensor`: dtype
name, shape, strides and the file offset of its first element, checked to lie inside its storage. No
tensor byte is read here; `sources.lightning` maps the file and views those bytes in place.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any

from streamconv.errors import ConversionError, describe, first_line
from streamconv.sources import safe_pickle

_MAX_DIMS = 32  # numpy's limit is 64; a weight has at most 4
# A stride-0 view (a norm weight saved as torch.ones(1).expand(h)) is copied whole when it is reached: up to
# the size of one read chunk (pipeline.CHUNK_BYTES), which the memory bound already counts.
_MAX_REPEATED = 64 * 2**20
# data.pkl describes the tensors, not their bytes: a 48-layer Lightning checkpoint with optimizer state has a
# 283 kB one. 256 MiB leaves room for far larger models and keeps a hostile one from filling memory.
_MAX_PICKLE = 256 * 2**20
# torch.save(..., _use_new_zipfile_serialization=False): a pickle stream starting with torch's magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_ZIP_MAGIC = b"PK\x03\x04"
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


_STORAGE_DTYPES = {"DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
                   "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
                   "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
                   "UntypedStorage": "uint8"}


def _refuse_state(self: object, state: Any) -> None:
    """BUILD on a record made from the pickle: refused, so that its offsets stay the ones checked.
    (BUILD on the stand-ins for torch's globals is refused like that on any allow-listed global.)"""
    raise pickle.UnpicklingError(f"a pickle tried to set the state of {type(self).__name__}")


@dataclass(frozen=True, slots=True)
class StoredTensor:
    """A tensor as the pickle describes it: dtype name, shape, strides (in elements) and file offset."""

    __setstate__ = _refuse_state

    dtype: str  # as str(torch.dtype) gives it: 'torch.bfloat16'
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int  # where element 0 lies in the file

    @property
    def itemsize(self) -> int:
        return safe_pickle.DTYPES[self.dtype.removeprefix("torch.")]

    @property
    def nbytes(self) -> int:
        n = self.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, slots=True)
class _Stored:
    """A storage: its dtype name and its bytes [start, end) in the file."""

    __setstate__ = _refuse_state

    dtype: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class _StorageType:
    dtype: str


class _Repeated(pickle.UnpicklingError):
    """A valid tensor streamconv will not copy: a large stride-0 view."""


def _naturals(values: Any) -> tuple[int, ...]:
    values = tuple(values)
    if not all(type(v) is int and v >= 0 for v in values):
        raise pickle.UnpicklingError(f"unexpected sizes or strides {describe(values)}")
    return values


def _stored_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, dtype: Any = None) -> StoredTensor:
    """What torch._utils._rebuild_tensor_v2/v3 would make, checked to lie inside its storage."""
    dtype = storage.dtype if dtype is None else dtype
    if not isinstance(storage, _Stored) or dtype not in safe_pickle.DTYPES:
        raise pickle.UnpicklingError("unexpected tensor storage or dtype")
    (storage_offset,), shape, strides = _naturals((storage_offset,)), _naturals(size), _naturals(stride)
    if len(shape) != len(strides) or len(shape) > _MAX_DIMS:
        raise pickle.UnpicklingError(f"a tensor has {len(shape)} sizes and {len(strides)} strides")
    itemsize, last = safe_pickle.DTYPES[dtype], storage_offset
    for d, s in zip(shape, strides, strict=True):
        last += (d - 1) * s
    offset, span = storage.start + storage_offset * itemsize, storage.end - storage.start
    tensor = StoredTensor(f"torch.{dtype}", shape, strides, offset)
    if offset > storage.end or (0 not in shape and storage.start + (last + 1) * itemsize > storage.end):
        raise pickle.UnpicklingError("a tensor ends past its storage")
    if tensor.nbytes > max(span, _MAX_REPEATED):  # a copy of a stride-0 view could be any size
        raise _Repeated(f"a tensor of {tensor.nbytes} bytes repeats the {span} bytes of its storage (a "
                              "stride of 0, as torch's expand() makes); re-save it with .contiguous()")
    return tensor


class _Rebuild:
    """torch's tensor-building globals, as stand-ins (v2, or v3 which also names the dtype)."""

    __slots__ = ("_with_dtype",)

    def __init__(self, with_dtype: bool) -> None:
        self._with_dtype = with_dtype

    def __call__(self, storage: Any, storage_offset: Any, size: Any, stride: Any, *rest: Any) -> StoredTensor:
        dtype = rest[2] if self._with_dtype and len(rest) > 2 else None  # v3: requires_grad, hooks, dtype
        return _stored_tensor(storage, storage_offset, size, stride, dtype)


class _Parameter:
    """torch._utils._rebuild_parameter: the tensor it wraps."""

    __slots__ = ()

    def __call__(self, data: Any, *rest: Any) -> Any:
        return data


_TORCH_STAND_INS: dict[str, Any] = {
    "torch._utils._rebuild_tensor_v2": _Rebuild(with_dtype=False),
    "torch._utils._rebuild_tensor_v3": _Rebuild(with_dtype=True),
    "torch._utils._rebuild_parameter": _Parameter(),
    "torch.Size": tuple,
    "torch.device": str,
    **{f"torch.{name}": name for name in safe_pickle.DTYPES},  # a dtype stands as its name
    **{f"torch.{name}": _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _Unpickler(safe_pickle.Unpickler):
    """The restricted unpickler with torch's tensor-building globals replaced by `StoredTensor` makers."""

    _with_stand_ins: dict[str, Any] = {}

    def __init__(self, data: bytes, members: dict[str, tuple[int, int]], offset: int) -> None:
        super().__init__(io.BytesIO(data))
        self.members, self.offset = members, offset

    @classmethod
    def allowed(cls) -> dict[str, Any]:
        if not cls._with_stand_ins:
            cls._with_stand_ins = {**safe_pickle.Unpickler.allowed(), **_TORCH_STAND_INS}
        return cls._with_stand_ins

    def persistent_load(self, saved_id: Any) -> Any:
        storage_type, key, numel = safe_pickle.storage_id(saved_id)
        start, length = self.members.get(key, (None, 0))
        if not isinstance(storage_type, _StorageType) or start is None:
            raise pickle.UnpicklingError(f"a tensor's storage {key[:40]!r} is not in the archive, or not a "
                                         "storage type torch writes")
        start += self.offset
        return _Stored(storage_type.dtype, start, start + min(length, numel * safe_pickle.DTYPES[storage_type.dtype]))


def load(path: str, offset: int = 0, size: int | None = None, label: str | None = None) -> Any:
    """The object pickled in the torch zip file at [offset, offset + size) of `path`, each tensor a
    `StoredTensor` (offsets into `path`). Reads the zip directory and the pickle, no tensor bytes.

    Raises ConversionError (one line) for torch's legacy format, a damaged or truncated zip, compressed
    members or big-endian data. `label` names the checkpoint in messages (a member of a `.nemo`).
    """
    file_size = os.path.getsize(path)
    size = file_size - offset if size is None else size
    if offset + size > file_size:
        raise ConversionError(f"{path} is truncated (the checkpoint inside it ends past the end of the file)")
    fd = os.open(path, os.O_RDONLY)
    try:
        _check_head(label or path, os.pread(fd, len(_LEGACY_MAGIC), offset))
        members, data, byteorder = _read_directory(path, fd, offset, size)
    finally:
        os.close(fd)
    if byteorder not in (b"", sys.byteorder.encode()):
        raise ConversionError(f"{path}: the checkpoint was saved {byteorder.decode(errors='replace')}-endian, "
                              f"this machine is {sys.byteorder}-endian; re-save it on a matching machine")
    try:
        return _Unpickler(data, members, offset).load()
    except ConversionError:
        raise
    except _Repeated as exc:
        raise ConversionError(f"{path}: {exc}") from None
    except safe_pickle.Dangerous as exc:
        raise safe_pickle.tampered(label or path, exc) from None
    except safe_pickle.Refused as exc:
        raise ConversionError(f"cannot read checkpoint {path}: its pickle {exc}, more than any checkpoint needs; "
                              "it is damaged or hostile: do not trust this file") from None
    except Exception as exc:  # a damaged pickle can fail in many ways
        raise ConversionError(f"cannot read checkpoint {path}: it is damaged ({reason_of(exc)}); "
                              "copy or download it again") from None


def reason_of(exc: BaseException) -> str:
    """What went wrong, in a few words: the exception's first line, named by its type unless it is pickle's."""
    if isinstance(exc, EOFError):
        return "the pickle ends before its STOP"
    text = first_line(exc)[:160] if str(exc).strip() else ""
    if isinstance(exc, pickle.UnpicklingError):
        return text or "not a pickle"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_head(label: str, head: bytes) -> None:
    """Name the common ways the bytes are not a torch zip checkpoint, before reading its directory."""
    if head.startswith(_LEGACY_MAGIC):
        raise ConversionError(
            f"{label} uses torch's legacy (pre-1.6) format, which cannot be memory-mapped; re-save it in a "
            "trusted environment with torch.save(torch.load(path, weights_only=False), new_path)"
        )
    if not head.startswith(_ZIP_MAGIC):
        raise ConversionError(f"{label} is not a torch checkpoint (no zip header); check --checkpoint-path")


def _read_directory(path: str, fd: int, offset: int, size: int) -> tuple[dict[str, tuple[int, int]], bytes, bytes]:
    """Storage key -> (start, length) of its bytes relative to `offset`, the data.pkl bytes, the byteorder."""
    window = _Window(fd, offset, size)
    try:
        with zipfile.ZipFile(window) as archive:
            pickles = [i.filename for i in archive.infolist() if i.filename.rsplit("/", 1)[-1] == "data.pkl"]
            if not pickles:
                raise ConversionError(f"{path}: the weights are a zip file but not a torch checkpoint (no data.pkl)")
            prefix = pickles[0][: -len("data.pkl")]
            names = set(archive.namelist())
            data = _read_small(path, archive, archive.getinfo(pickles[0]), _MAX_PICKLE)
            byteorder = b""
            if prefix + "byteorder" in names:
                byteorder = _read_small(path, archive, archive.getinfo(prefix + "byteorder"), 64)
            members: dict[str, tuple[int, int]] = {}
            for info in archive.infolist():
                if not info.filename.startswith(prefix + "data/"):
                    continue
                if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x41:  # (encrypted: 0x1, 0x40)
                    raise ConversionError(f"{path}: member {info.filename!r} is compressed; torch writes "
                                          "checkpoints uncompressed, re-save it with torch.save")
                header = os.pread(fd, _LOCAL_HEADER.size, offset + info.header_offset)
                if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
                    raise zipfile.BadZipFile(f"bad local header for {info.filename}")
                fields = _LOCAL_HEADER.unpack(header)
                start = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
                if start < 0 or start + info.file_size > size:
                    raise zipfile.BadZipFile(f"{info.filename} ends past the end of the checkpoint")
                members[info.filename[len(prefix + "data/"):]] = (start, info.file_size)
    except NotImplementedError as exc:  # zip features torch never writes: versions, encryption, methods
        raise ConversionError(f"{path}: its torch checkpoint uses zip features torch never writes ({exc}); "
                              "it is damaged or not a torch checkpoint, copy or download it again") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, RuntimeError, zlib.error, struct.error) as exc:
        raise ConversionError(f"{path}: its torch checkpoint is truncated or damaged ({exc}); "
                              "copy or download it again") from None
    return members, data, byteorder


def _read_small(path: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """A member that torch writes stored, unencrypted and small (data.pkl, byteorder), checked before it is
    read: a compressed one could inflate to any size."""
    stored = info.compress_type == zipfile.ZIP_STORED and info.compress_size == info.file_size
    if not stored or info.flag_bits & 0x41:  # (0x1: encrypted, 0x40: strong encryption)
        raise ConversionError(f"{path}: {info.filename!r} is compressed or encrypted; torch writes it stored, "
                              "so this is not a checkpoint torch.save wrote: re-save it with torch.save")
    if info.file_size > limit:
        raise ConversionError(f"{path}: {info.filename!r} is {info.file_size} bytes, more than the {limit} a "
                              "checkpoint's needs; it is damaged or not a torch checkpoint")
    return archive.read(info)
