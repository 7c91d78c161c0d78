"""Writes a safetensors file whose header is known up front: header first, then tensor bytes in order.

The plan fixed every offset, so bytes are appended as they arrive and the writer only checks that each
tensor ends exactly where the plan says.

Direct writes: on the machines measured, 2.6 GB written through the page cache and fsynced took 13 s, with
O_DIRECT 1.9 s. So bytes are gathered into an aligned staging buffer of STAGING_BYTES and each full buffer
is written with O_DIRECT at an aligned offset; the unaligned tail goes through the file's ordinary descriptor
at the end, then the file is fsynced. (One copy into the staging buffer: the source offsets of the bytes
rarely share the output's alignment.) Bytes placed in memory at the file offset's alignment (`placed`: the
pipeline arranges and casts into such views) skip that copy: only their first and last partial blocks are
staged, the blocks between go to the disk straight from where they lie.
A filesystem that refuses O_DIRECT (tmpfs, some network filesystems) gets ordinary writes, with write-behind:
every WINDOW bytes the kernel is told to start writing that window to disk, and the window before it is waited
for and dropped from the page cache, so dirty pages never pile up on a small-RAM machine.

A part of a conversion split over processes (`streamconv.parts`) writes only a run of a shard's tensors, into
the file the other parts write too: the writer then starts at that run's offset (its unaligned head goes through
the ordinary descriptor), writes the header only if the run starts the shard, and never truncates the file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat

import numpy as np

from streamconv.errors import ConversionError
from streamconv.plan import Shard, TensorSpec
from streamconv.reads import ALIGN, aligned_empty
from streamconv.sources.records import address

STAGING_BYTES = 8 * 2**20
WINDOW = 64 * 2**20
UNSTAGED_BYTES = 2**20  # placed bytes written straight from memory from this size on (less: staged, one write)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4


class ShardWriter:
    """One shard file, or the run of it that `shard.tensors` covers, written sequentially. `close` writes the
    tail and fsyncs; closing twice is harmless."""

    def __init__(self, path: str, shard: Shard) -> None:
        self.path = path
        self.shard = shard
        start = shard.tensors[0].begin if shard.tensors else 0
        self._fd = _open_own_file(path, os.O_CREAT)
        try:
            self._direct = _open_own_file(path, os.O_DIRECT)
        except (OSError, ConversionError):
            self._direct = -1
        if self._direct >= 0 and not os.path.samestat(os.fstat(self._direct), os.fstat(self._fd)):
            os.close(self._direct)  # the name was replaced between the two opens: only the first file is written
            self._direct = -1
        self._staging = aligned_empty(STAGING_BYTES) if self._direct >= 0 else None
        self._staged = 0  # bytes in the staging buffer, which goes to the file at offset _flushed
        self._go_to(len(shard.header) + start if start else 0)
        if not start:
            self._write(memoryview(shard.header))

    def file_offset(self, spec: TensorSpec) -> int:
        """Where the tensor's bytes start in the file."""
        return len(self.shard.header) + spec.begin

    @property
    def written(self) -> int:
        """Bytes of tensor data written so far."""
        return self._file_pos - len(self.shard.header)

    def append(self, data: np.ndarray) -> None:
        """Append a contiguous array's bytes."""
        self._write(memoryview(data.reshape(-1).view(np.uint8)))

    def finish_tensor(self, spec: TensorSpec) -> None:
        """Check that the bytes written so far end where the plan put this tensor's end."""
        if self.written != spec.end:
            raise RuntimeError(f"{spec.name}: wrote up to byte {self.written}, plan says {spec.end}")

    def skip_to(self, begin: int) -> None:
        """Go on at data offset `begin`, past bytes another writer of the file writes (`pipeline.lanes`): what is
        staged goes out first, its partial last block through the ordinary descriptor, as at the end of a run."""
        self._write_tail()
        settled = max(self._run_start, self._flushed - WINDOW)
        if self._staging is None and self._file_pos > settled:  # this run's bytes still in the cache
            self._drop(settled, self._file_pos - settled)
        self._go_to(len(self.shard.header) + begin)

    def _go_to(self, position: int) -> None:
        """Start a run of appends at file offset `position`."""
        # The file offset appended up to; direct: up to which bytes are on disk; buffered: up to which writeback
        # has been started; where this run started
        self._file_pos = self._flushed = self._run_start = position
        self._head = -position % ALIGN  # bytes before the first aligned offset: not written directly

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self._write_tail()
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = -1
                if self._direct >= 0:
                    os.close(self._direct)
                    self._direct = -1

    def _write_tail(self) -> None:
        """Write the staged bytes, which end in a partial block, through the ordinary descriptor."""
        if self._staged:
            self._pwrite(self._fd, memoryview(self._staging)[: self._staged], self._flushed)
            self._staged = 0

    def _write(self, view: memoryview) -> None:
        self._file_pos += view.nbytes
        if self._staging is None:
            self._write_buffered(view)
            return
        if self._head:
            n = min(view.nbytes, self._head)
            self._pwrite(self._fd, view[:n], self._flushed)
            self._head -= n
            self._flushed += n
            view = view[n:]
        if view.nbytes >= UNSTAGED_BYTES and (address_of(view) - self._file_pos + view.nbytes) % ALIGN == 0:
            view = self._write_unstaged(view)
            if self._staging is None:
                self._write_buffered(view)
                return
        while view.nbytes:
            n = min(view.nbytes, STAGING_BYTES - self._staged)
            self._staging[self._staged : self._staged + n] = view[:n]
            self._staged += n
            view = view[n:]
            if self._staged == STAGING_BYTES:
                self._flush()
                if self._staging is None:
                    self._write_buffered(view)
                    return

    def _write_unstaged(self, view: memoryview) -> memoryview:
        """Write `view`, which lies in memory at its file offset's alignment, up to its last aligned block: its
        head completes the staged block, the blocks after it go from where they lie. Returns the rest."""
        head = -(self._file_pos - view.nbytes) % ALIGN
        self._staging[self._staged : self._staged + head] = view[:head]
        self._staged += head
        if self._staged:
            self._direct_write(memoryview(self._staging)[: self._staged])
            self._staged = 0
        if self._staging is None:  # refused after all: the rest goes through the ordinary descriptor
            return view[head:]
        body = (view.nbytes - head) // ALIGN * ALIGN
        self._direct_write(view[head : head + body])
        return view[head + body :]

    def _flush(self) -> None:
        """Write the full staging buffer with O_DIRECT."""
        self._direct_write(memoryview(self._staging))
        self._staged = 0

    def _direct_write(self, view: memoryview) -> None:
        """Write `view` (aligned in memory, whole blocks) at `_flushed` with O_DIRECT. A filesystem that refuses it
        after all, or writes short, gets the rest through the ordinary descriptor, and ordinary writes from then on."""
        try:
            n = os.pwritev(self._direct, [view], self._flushed)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            n = 0
        if n < view.nbytes:
            self._pwrite(self._fd, view[n:], self._flushed + n)
            self._staging = None
        self._flushed += view.nbytes

    @staticmethod
    def _pwrite(fd: int, view: memoryview, offset: int) -> None:
        while view.nbytes:  # os.pwrite may write less than asked (Linux caps one call near 2 GiB)
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def _write_buffered(self, view: memoryview) -> None:
        self._pwrite(self._fd, view, self._file_pos - view.nbytes)
        while self._file_pos - self._flushed >= WINDOW:
            self._write_behind(self._flushed, WINDOW)
            self._flushed += WINDOW

    def _write_behind(self, start: int, length: int) -> None:
        """Start writeback of [start, start+length); finish the previous window, if this run wrote it, and drop it
        from the cache."""
        _libc.sync_file_range(self._fd, start, length, _WRITE)
        if start - length >= self._run_start:
            self._drop(start - length, length)

    def _drop(self, start: int, length: int) -> None:
        """Write [start, start+length) to disk, wait for it, and drop it from the page cache (length > 0: a length
        of 0 would mean to the end of the file)."""
        _libc.sync_file_range(self._fd, start, length, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
        os.posix_fadvise(self._fd, start, length, os.POSIX_FADV_DONTNEED)


def placed(buffer: np.ndarray, offset: int, nbytes: int) -> np.ndarray:
    """The `nbytes` of `buffer` (at least nbytes + ALIGN long) that lie in memory as `offset` lies in the file
    modulo ALIGN: bytes arranged there go to the disk without a copy (`ShardWriter.append`)."""
    skip = (offset - address(buffer)) % ALIGN
    return buffer[skip : skip + nbytes]


def address_of(view: memoryview) -> int:
    return address(np.frombuffer(view, np.uint8)) if view.nbytes else 0


def _open_own_file(path: str, flags: int) -> int:
    """Open `path` for writing only if it is (or becomes) a regular file of the running user's with one name: a
    link, a pipe or another user's file planted there (a part writes into files others may see) is refused."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | flags, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENXIO):  # a symbolic link; a pipe nobody reads
            raise
        fd = None
    found = os.fstat(fd) if fd is not None else None
    if found is None or not stat.S_ISREG(found.st_mode) or found.st_uid != os.geteuid() or found.st_nlink != 1:
        if fd is not None:
            os.close(fd)
        shown = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))  # not /proc/self/fd
        raise ConversionError(f"{shown} is not a file streamconv wrote (a link, a pipe, another user's file or a "
                              "hard link was put there); remove it, or the folder holding it, and run again")
    return fd
