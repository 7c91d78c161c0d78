"""What every reader produces and the rest of streamconv consumes: lazy tensors as views into mapped files.

A tensor's bytes stay in the checkpoint file: each `SourceTensor` is a numpy view into a read-only mapping of
it (`MappedFile`), so nothing is read until it is touched, and nothing the conversion does not touch (optimizer
state) is ever read. Pages of a mapping stay resident once touched; `Checkpoint.release` hands them back after
a tensor has been consumed, which is what keeps memory bounded. A tensor stored in slices (tensor-parallel
ranks, distributed-checkpoint chunks) is a `Split` of views, placed slice by slice by the pipeline.

numpy has no bfloat16, so a tensor's elements are viewed as integers of the same width (`bits`), its dtype kept
by name; the bytes are what is copied, so nothing is lost. This module imports no reader.
"""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamconv.errors import ConversionError, describe
from streamconv.sources import safe_pickle, torch_zip
from streamconv.sources.hparams import Config

BITS = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}  # element width -> the integers that hold its bits


@dataclass(frozen=True, eq=False)
class SourceTensor:
    """A checkpoint tensor: its elements as integers of their width (a view into the file mapping), and
    its dtype name ('torch.bfloat16')."""

    bits: np.ndarray
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.bits.shape)

    @property
    def nbytes(self) -> int:
        return self.bits.nbytes

    def rows(self, start: int, stop: int) -> SourceTensor:
        return SourceTensor(self.bits[start:stop], self.dtype)


def address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


class MappedFile:
    """One file (a .ckpt, a .nemo, a rank's weights) mapped once, read-only; its tensors are views into it."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.fd = os.open(file, os.O_RDONLY)  # also reopened for direct reads (streamconv.reads)
        try:  # (a file torch_zip.load has read is not empty)
            self.map = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
        except BaseException:
            os.close(self.fd)
            raise
        self.start = address(np.frombuffer(self.map, np.uint8))
        self.end = self.start + len(self.map)

    def tensor(self, stored: torch_zip.StoredTensor) -> SourceTensor:
        itemsize = stored.itemsize
        try:  # (torch_zip checked that it lies inside its storage, and the storage inside the file)
            bits = np.ndarray(stored.shape, BITS[itemsize], buffer=self.map, offset=stored.offset,
                              strides=[s * itemsize for s in stored.strides])
        except ValueError as exc:
            raise ConversionError(f"{self.file}: a tensor lies outside the file ({exc}); the checkpoint is "
                                  "damaged, copy or download it again") from None
        return SourceTensor(bits, stored.dtype)

    def holds(self, array: np.ndarray) -> bool:
        start = address(array)
        return self.start <= start and start + array.nbytes <= self.end

    def advise(self, array: np.ndarray, advice: int) -> None:
        """madvise over the whole pages spanned by a contiguous view into the mapping.

        The mapping is read-only, so MADV_DONTNEED only forgets pages: touching them again re-reads the
        file (from the page cache). Widening to whole pages is harmless: a neighbouring tensor sharing an
        edge page faults it back in.
        """
        if array.nbytes:
            begin = address(array) - self.start
            page = begin - begin % mmap.PAGESIZE
            self.map.madvise(advice, page, begin + array.nbytes - page)

    def close(self) -> None:
        """Close the descriptor; the mapping goes with the last view into it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Checkpoint:
    """A checkpoint opened lazily: `tensors` maps state_dict keys to `SourceTensor`s, or to `Split`s of a
    tensor stored in slices."""

    path: str
    tensors: Mapping[str, Any]  # SourceTensor, or Split for a tensor-parallel model
    hparams: Config | None  # the cfg, None if absent; read through `hparam`
    files: list[MappedFile] = field(default_factory=list)
    config_name: str = "'hyper_parameters.cfg' entry"  # where the cfg comes from, for error messages
    note: str = ""  # said in the summary, e.g. that a gzip archive was extracted
    tokenizer: bytes | None = None  # the SentencePiece model shipped with the checkpoint (a .nemo artifact)
    # Tensor-parallel ranks whose own state_dicts were concatenated (a fused [gate_r; up_r] per rank); 1 when
    # tensors are stored whole, as in a distributed checkpoint
    local_slices: int = 1
    # A Hugging Face tokenizer's files by name (NeMo 2.0's context/nemo_tokenizer/), copied as they are
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)
    # The true vocabulary, where the layout's config states it (Megatron-Bridge's run_config.yaml); unchecked
    vocab_size: Any = None
    # The distributed checkpoint's files, where megatron-core (0.18+) left integrity.json there: --verify hashes them
    integrity: Files | None = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the files (the mappings go with the last views into them)."""
        for mapped in self.files:
            mapped.close()
        self.tensors, self.files = {}, []

    def _file_of(self, array: np.ndarray) -> MappedFile | None:
        return next((m for m in self.files if m.holds(array)), None)

    def file_offset(self, array: np.ndarray) -> tuple[int, int] | None:
        """(descriptor, offset) of a contiguous view's bytes in its checkpoint file (None if not in a mapping)."""
        mapped = self._file_of(array)
        return None if mapped is None else (mapped.fd, address(array) - mapped.start)

    def release(self, array: np.ndarray) -> None:
        """Hand back the pages behind a consumed view into one of the file mappings."""
        mapped = self._file_of(array)
        if mapped is not None:
            mapped.advise(array, mmap.MADV_DONTNEED)

    def hparam(self, key: str, default: Any = None, **null: Any) -> Any:
        """One hyper-parameter, with interpolations such as `${.encoder_seq_length}` resolved (`null=X`: what an
        explicit null gives, where it differs from absent)."""
        return default if self.hparams is None else self.hparams.get(key, default, **null)


@dataclass(frozen=True, eq=False)
class Split:
    """One logical tensor stored as slices (on tensor-parallel ranks, or as the chunks of a distributed
    checkpoint), concatenated along `axis` in order."""

    parts: tuple[SourceTensor, ...]
    axis: int

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.parts[0].shape)
        shape[self.axis] = sum(p.shape[self.axis] for p in self.parts)
        return tuple(shape)

    @property
    def dtype(self) -> str:
        return self.parts[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def rows(self, start: int, stop: int) -> Split:
        """Rows start..stop (axis 0) of the concatenation: of the slices they fall in, for slices stacked on rows
        (vocabulary padding sits on the last ranks); of every slice, for slices side by side."""
        if self.axis != 0:
            return Split(tuple(p.rows(start, stop) for p in self.parts), self.axis)
        parts, first = [], 0
        for part in self.parts:
            rows = part.shape[0]
            if first < stop and start < first + rows:
                parts.append(part.rows(max(start - first, 0), min(stop - first, rows)))
            first += rows
        return Split(tuple(parts), self.axis)


def row_ranges(source: SourceTensor | Split, ranges: tuple[tuple[int, int], ...]) -> SourceTensor | Split:
    """These [start, stop) row ranges of a tensor, concatenated: one tensor, or a Split of slices stacked on rows."""
    pieces = [source.rows(a, b) for a, b in ranges]
    if len(pieces) == 1:
        return pieces[0]
    if isinstance(source, Split) and source.axis != 0:
        raise ValueError("row ranges of slices side by side are not one tensor")
    return Split(tuple(p for piece in pieces for p in (piece.parts if isinstance(piece, Split) else (piece,))), 0)


def tensors_of(path: str, state_dict: Mapping, mapped: MappedFile) -> dict[str, SourceTensor]:
    """The tensors of a state_dict read by torch_zip.load from `mapped`'s file, as views into the mapping;
    refused if the state_dict holds anything not on the allow-list."""
    safe_pickle.refuse(path, "state_dict", state_dict)
    return {k: mapped.tensor(v) for k, v in state_dict.items() if isinstance(v, torch_zip.StoredTensor)}




class Files:
    """The files of a checkpoint folder, wherever their bytes lie: a folder on disk (`Folder`), or the members
    of a plain tar read in place (`sources/nemo.py`). Names are relative and '/'-separated; a name read from
    the checkpoint is refused unless it is one of these files."""

    label: str  # the folder or archive, for messages

    def names(self) -> list[str]:
        """Every regular file, to a depth of two folders."""
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        """Whether anything (a file, or something refused when it is located) has that name."""
        raise NotImplementedError

    def locate(self, name: str) -> tuple[str, int, int]:
        """(the file to map, the offset of `name`'s bytes in it, their size); refused if there is no such file."""
        raise NotImplementedError

    def path(self, name: str) -> str:
        """`name` as messages show it."""
        return f"{self.label}/{name}"

    def read(self, name: str, limit: int) -> bytes:
        """The bytes of a small file, refused past `limit`."""
        file, offset, size = self.locate(name)
        if size > limit:
            raise ConversionError(f"{self.path(name)} has {size} bytes, more than the {limit} such a file needs; "
                                  "the checkpoint is damaged or hostile")
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
        try:
            data = os.pread(fd, size, offset)
        finally:
            os.close(fd)
        if len(data) != size:
            raise ConversionError(f"{self.path(name)} is truncated; copy the checkpoint again")
        return data


class Folder(Files):
    """A checkpoint folder on disk: a file is refused unless it is a regular file inside it (a name with `..`
    or a link out of the folder is named, never opened)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.label = root

    def names(self) -> list[str]:
        found = []
        for top, folders, files in os.walk(self.root):
            depth = os.path.relpath(top, self.root).count(os.sep) + (top != self.root)
            if depth >= 2:
                folders[:] = []
            rel = os.path.relpath(top, self.root).replace(os.sep, "/")
            found += [n if top == self.root else f"{rel}/{n}" for n in files
                      if os.path.isfile(os.path.join(top, n)) and not os.path.islink(os.path.join(top, n))]
        return sorted(found)

    def exists(self, name: str) -> bool:
        return os.path.lexists(os.path.join(self.root, name))

    def locate(self, name: str) -> tuple[str, int, int]:
        parts = name.split("/") if isinstance(name, str) else []
        if not parts or "\\" in name or "\0" in name or os.path.isabs(name) or any(p in ("", ".", "..") for p in parts):
            raise ConversionError(f"{self.label} names the file {describe(name)}, which is not a file name inside the "
                                  "checkpoint folder; streamconv refuses it, do not trust this checkpoint")
        file = os.path.join(self.root, name)
        real, root = os.path.realpath(file), os.path.realpath(self.root)
        if os.path.commonpath([real, root]) != root:
            raise ConversionError(f"{file} is a link to {real}, outside the checkpoint folder; streamconv refuses it "
                                  "(replace the link by the file)")
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise ConversionError(f"{file} is missing; the checkpoint is incomplete, copy all of its files") from None
        except OSError as exc:
            raise ConversionError(f"cannot read {file}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ConversionError(f"{file} is not a regular file; the checkpoint is damaged")
        return real, 0, st.st_size

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)


Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes) of a chunk in its tensor
_MAX_DIMS = 32


def damaged(path: str, what: str) -> ConversionError:
    """The one line for a checkpoint index (`.metadata`, `.zarray`) that no writer makes."""
    return ConversionError(f"{path} is damaged ({what:.200}); copy the checkpoint again")


def naturals(path: str, values: Any, what: str) -> tuple[int, ...]:
    """A shape, offsets or sizes read from a checkpoint index: at most 32 whole numbers from 0 to 2**62."""
    if not isinstance(values, tuple | list) or len(values) > _MAX_DIMS \
            or not all(type(v) is int and 0 <= v < 2**62 for v in values):
        raise damaged(path, f"{what} is {describe(values)}")
    return tuple(values)


def check_tiling(path: str, fqn: str, shape: tuple[int, ...], boxes: list[Box]) -> None:
    """Refuse chunks that leave a gap, overlap, or reach past the tensor. A sweep over the first dimension:
    the chunks spanning each slab between consecutive chunk boundaries must tile the rest of the tensor
    (checked the same way, one dimension down). Time about (chunks x dimensions) for a regular grid; a
    layout that would take much longer is refused rather than checked slowly."""
    def fail(what: str) -> ConversionError:
        return ConversionError(f"{path}: the chunks of {fqn!r} {list(shape)} {what}; the checkpoint is damaged "
                               "or incomplete, copy it again")

    for offsets, sizes in boxes:
        if any(o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)):
            raise fail(f"include one at {list(offsets)} of size {list(sizes)}, past the tensor's end")
    nonempty = [b for b in boxes if 0 not in b[1]]
    if 0 in shape:
        return
    budget = [16 * (len(nonempty) + 1) * (len(shape) + 1) + 200_000]

    def tiles(group: list[Box], corner: tuple[int, ...]) -> None:
        """`group` (the chunks spanning the slab that starts at `corner`) tiles the remaining dimensions."""
        budget[0] -= len(group) + 1
        if budget[0] < 0:
            raise fail("are laid out too irregularly to check")
        dim = len(corner)
        if dim == len(shape):
            if len(group) != 1:
                raise fail(f"overlap ({len(group)} of them hold the element at {list(corner)})")
            return
        starts = sorted(group, key=lambda b: b[0][dim])
        bounds = sorted({0, *(b[0][dim] for b in group), *(b[0][dim] + b[1][dim] for b in group)} - {shape[dim]})
        active: list[Box] = []
        following = 0
        for lo in bounds:
            active = [b for b in active if b[0][dim] + b[1][dim] > lo]
            while following < len(starts) and starts[following][0][dim] == lo:
                active.append(starts[following])
                following += 1
            if not active:
                raise fail(f"leave a gap at {[*corner, lo] + [0] * (len(shape) - dim - 1)}")
            tiles(active, (*corner, lo))

    tiles(nonempty, ())
