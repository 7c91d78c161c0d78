"""Writes a safetensors file whose header is known up front: header first, then tensor bytes in order.

The plan fixed every offset, so bytes are appended as they arrive and the writer only checks that each
tensor ends exactly where the plan says. Data goes from the array's own memory to the kernel: no copy.

Write-behind: every WINDOW bytes the kernel is told to start writing that window to disk, and the window
before it is waited for and dropped from the page cache. The disk then works during the whole
conversion instead of at the final fsync, and dirty pages never pile up on a small-RAM machine.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

import numpy as np

from streamconv.plan import Shard, TensorSpec

WINDOW = 64 * 2**20
_READ_BYTES = 8 * 2**20  # a read-and-write copy's piece, where the kernel cannot copy between the files

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4
_copy_file_range_works = True  # until the kernel or filesystem says otherwise


class ShardWriter:
    """One shard file, written sequentially. `close` fsyncs; closing twice is harmless."""

    def __init__(self, path: str, shard: Shard) -> None:
        self.path = path
        self.shard = shard
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._file_pos = 0
        self._flushed = 0  # file offset up to which writeback has been started
        self._write(memoryview(shard.header))

    @property
    def written(self) -> int:
        """Bytes of tensor data written so far."""
        return self._file_pos - len(self.shard.header)

    def append(self, data: np.ndarray) -> None:
        """Append a contiguous array's bytes."""
        self._write(memoryview(data.reshape(-1).view(np.uint8)))

    def append_from_file(self, source_fd: int, offset: int, count: int) -> None:
        """Append `count` bytes of another file at `offset`, copied inside the kernel (copy_file_range: they
        never enter this process); read and written in pieces where the kernel can't."""
        global _copy_file_range_works
        while count and _copy_file_range_works:
            try:
                n = os.copy_file_range(source_fd, self._fd, count, offset)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                _copy_file_range_works = False
                break
            if n == 0:
                raise OSError(errno.EIO, f"checkpoint ended {count} bytes early while copying")
            offset += n
            count -= n
            self._advanced(n)
        while count:
            data = os.pread(source_fd, min(count, _READ_BYTES), offset)
            if not data:
                raise OSError(errno.EIO, f"checkpoint ended {count} bytes early while copying")
            self._write(memoryview(data))
            offset += len(data)
            count -= len(data)

    def finish_tensor(self, spec: TensorSpec) -> None:
        """Check that the bytes written so far end where the plan put this tensor's end."""
        if self.written != spec.end:
            raise RuntimeError(f"{spec.name}: wrote up to byte {self.written}, plan says {spec.end}")

    def close(self) -> None:
        if self._fd >= 0:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = -1

    def _write(self, view: memoryview) -> None:
        while view.nbytes:  # os.write may write less than asked (Linux caps one call near 2 GiB)
            n = os.write(self._fd, view)
            view = view[n:]
            self._advanced(n)

    def _advanced(self, n: int) -> None:
        self._file_pos += n
        while self._file_pos - self._flushed >= WINDOW:
            self._write_behind(self._flushed, WINDOW)
            self._flushed += WINDOW

    def _write_behind(self, start: int, length: int) -> None:
        """Start writeback of [start, start+length); finish the previous window and drop it from the cache."""
        _libc.sync_file_range(self._fd, start, length, _WRITE)
        if start >= length:
            previous = start - length
            _libc.sync_file_range(self._fd, previous, length, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
            os.posix_fadvise(self._fd, previous, length, os.POSIX_FADV_DONTNEED)
