"""Writes a safetensors file whose header is known up front: header first, then tensor bytes in order.

The plan fixed every offset, so bytes are appended as they arrive and the writer only checks that each
tensor ends exactly where the plan says. Data goes from the tensor's own memory to the kernel: no copy.

Arranged tensors are written with O_DIRECT where the filesystem allows: their whole 4 KiB blocks go from the
output buffer to the disk without a copy into the page cache (measured here: 1.8 GB took 0.04 s of kernel
CPU instead of 0.45 s). The caller places each tensor in its buffer at the file position's offset within a
block (`lead`), so buffer and file blocks line up; the partial blocks at either end are written normally.

Write-behind: every WINDOW bytes the kernel is told to start writing that window to disk, and the window
before it is waited for and dropped from the page cache. The disk then works during the whole
conversion instead of at the final fsync, and dirty pages never pile up on a small-RAM machine.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

import torch

from streamconv.plan import Shard, TensorSpec

WINDOW = 64 * 2**20
ALIGN = 4096  # O_DIRECT: file offsets, lengths and memory addresses in whole blocks
_DIRECT_CHUNK = 2**30  # bytes per O_DIRECT write (Linux caps one write near 2 GiB)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4
_copy_file_range_works = True  # until the kernel or filesystem says otherwise
_direct_works = hasattr(os, "O_DIRECT")  # likewise for O_DIRECT writes


class ShardWriter:
    """One shard file, written sequentially. `close` fsyncs; closing twice is harmless."""

    def __init__(self, path: str, shard: Shard) -> None:
        self.path = path
        self.shard = shard
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:  # a second descriptor of the same file, for whole blocks (not every filesystem has O_DIRECT)
            self._direct_fd = os.open(path, os.O_WRONLY | getattr(os, "O_DIRECT", 0)) if _direct_works else -1
        except OSError:
            self._direct_fd = -1
        self._file_pos = 0
        self._flushed = 0  # file offset up to which writeback has been started
        self._write(memoryview(shard.header))

    def append(self, data: torch.Tensor) -> None:
        """Append a contiguous CPU tensor's bytes."""
        flat = data.reshape(-1).view(torch.uint8)
        self._write(memoryview(flat.numpy()))

    def append_aligned(self, block: torch.Tensor, lead: int) -> None:
        """Append `block[lead:]` (bytes), where `block` starts on an ALIGN boundary in memory and `lead` is
        the file position's offset in its block: whole blocks bypass the page cache (O_DIRECT)."""
        global _direct_works
        data = memoryview(block.reshape(-1).view(torch.uint8).numpy())
        first = min(len(data), ALIGN if lead else 0)  # the partial block up to the first boundary
        last = max(first, len(data) // ALIGN * ALIGN)  # whole blocks end here
        if self._direct_fd < 0 or block.data_ptr() % ALIGN or self._file_pos % ALIGN != lead % ALIGN:
            first = last = len(data)
        self._write(data[lead:first])
        while first < last:
            try:
                n = os.pwrite(self._direct_fd, data[first : min(last, first + _DIRECT_CHUNK)], self._file_pos)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                _direct_works = False  # the filesystem refuses O_DIRECT after all: write through the cache
                os.close(self._direct_fd)
                self._direct_fd = -1
                break
            first += n
            self._advanced(n)
        self._write(data[first:])

    def append_from_file(self, source_fd: int, offset: int, same_bytes: torch.Tensor) -> None:
        """Append bytes of another file, copied inside the kernel (copy_file_range: they never enter
        this process). `same_bytes` holds the same bytes, written instead where the kernel can't."""
        global _copy_file_range_works
        count = same_bytes.nbytes
        while count and _copy_file_range_works:
            try:
                n = os.copy_file_range(source_fd, self._fd, count, offset, self._file_pos)
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
        if count:
            self.append(same_bytes.reshape(-1).view(torch.uint8)[same_bytes.nbytes - count :])

    def finish_tensor(self, spec: TensorSpec) -> None:
        """Check that the bytes written so far end where the plan put this tensor's end."""
        written = self._file_pos - len(self.shard.header)
        if written != spec.end:
            raise RuntimeError(f"{spec.name}: wrote up to byte {written}, plan says {spec.end}")

    def close(self) -> None:
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1
        if self._fd >= 0:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = -1

    def _write(self, view: memoryview) -> None:
        while view.nbytes:  # a write may write less than asked (Linux caps one call near 2 GiB)
            n = os.pwrite(self._fd, view, self._file_pos)
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
