"""Reading the source ahead of its use: large direct preads (O_DIRECT) into a few aligned buffers, in order.

On the machines measured, the kernel's buffered paths are far below the disk: a cold 2.6 GB checkpoint reads
in 6.7 s through the page cache and in 2.3 s with O_DIRECT in 8 MB blocks or more (`dd iflag=direct`); page
faults on a mapping are slower still. So the source bytes of every tensor are read with preads of at most a
buffer's size, on a thread of their own that stays up to BUFFERS - 1 chunks ahead of the one in use, straight
into memory the arranging then reads, never into the page cache. A filesystem that refuses O_DIRECT (tmpfs,
some network filesystems) gets buffered preads of the same chunks, each dropped from the cache once read.

The caller lists the chunks it will ask for, in order (`chunks`, views into the checkpoint's file mappings),
and then asks for each in that order (`get`): the reader thread fills buffers in the same order. A view that
is not a contiguous span of a file (a strided tensor, or bytes in memory) is not read ahead: `get` gives a
contiguous copy of it when it is reached.
"""

from __future__ import annotations

import errno
import functools
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from streamconv.clock import Clock
from streamconv.sources.records import Checkpoint, address

ALIGN = 4096  # O_DIRECT wants offsets, lengths and memory aligned to the logical block size; a page covers all
BUFFERS = 4  # one in use, three being read (or waiting to be used)


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 array of `nbytes` whose first byte is ALIGN-aligned in memory."""
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    skip = -address(raw) % ALIGN
    return raw[skip : skip + nbytes]


def _span(offset: int, nbytes: int) -> tuple[int, int]:
    """The ALIGN-aligned (start, length) covering [offset, offset + nbytes)."""
    start = offset - offset % ALIGN
    end = -(-(offset + nbytes) // ALIGN) * ALIGN
    return start, end - start


class _DirectFiles:
    """O_DIRECT descriptors of the checkpoint's files (the same open files, reopened), or the files' own
    descriptors where the filesystem refuses O_DIRECT."""

    def __init__(self) -> None:
        self._direct: dict[int, int | None] = {}

    def read(self, fd: int, offset: int, nbytes: int, buffer: np.ndarray) -> np.ndarray:
        """The `nbytes` at `offset` of the file open as `fd`, read into `buffer` (aligned, large enough for the
        aligned span): a view of `buffer`."""
        direct = self._direct_fd(fd)
        if direct is not None:
            start, length = _span(offset, nbytes)
            try:
                _read_fully(direct, buffer[:length], start, offset + nbytes - start)
                return buffer[offset - start : offset - start + nbytes]
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct[fd] = None  # refused after all: buffered from now on
                os.close(direct)
        _read_fully(fd, buffer[:nbytes], offset, nbytes)
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        return buffer[:nbytes]

    def _direct_fd(self, fd: int) -> int | None:
        if fd not in self._direct:
            try:
                self._direct[fd] = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:
                self._direct[fd] = None
        return self._direct[fd]

    def close(self) -> None:
        for direct in self._direct.values():
            if direct is not None:
                os.close(direct)
        self._direct = {}


def _read_fully(fd: int, into: np.ndarray, offset: int, needed: int) -> None:
    """preadv into `into` until `needed` bytes have arrived (a direct read may end at the end of the file,
    short of the aligned length)."""
    view, got = memoryview(into), 0
    while got < needed:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise OSError(errno.EIO, f"checkpoint ended {needed - got} bytes early")
        got += n


class ReadAhead:
    """Reads the listed chunks in order on a thread of its own; `get` hands them out in the same order."""

    def __init__(self, checkpoint: Checkpoint, chunks: Iterable[np.ndarray], buffer_bytes: int,
                 buffers: int = BUFFERS, waiting: Callable[[], None] = lambda: None,
                 clock: Clock | None = None) -> None:
        self._checkpoint, self._waiting = checkpoint, waiting  # (called as `get` starts and waits: it may raise)
        self._clock = clock or Clock()
        self._files = _DirectFiles()
        self._free: queue.Queue[np.ndarray] = queue.Queue()
        for _ in range(buffers):  # (room for the aligned span of any chunk up to buffer_bytes)
            self._free.put(aligned_empty(buffer_bytes + 2 * ALIGN))
        self._ready: queue.Queue[_Read] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(chunks),), name="streamconv-read", daemon=True)
        self._thread.start()

    def _where(self, view: np.ndarray) -> tuple[int, int] | None:
        """(descriptor, offset) of `view` when it is read ahead: a contiguous span of one of the checkpoint's
        files; None for any other view."""
        if not view.flags.c_contiguous or view.nbytes == 0:
            return None
        return self._checkpoint.file_offset(view)

    def _run(self, chunks: Iterator[np.ndarray]) -> None:
        try:
            for view in chunks:
                where = self._where(view)
                if where is None:
                    continue
                fd, offset = where
                with self._clock.timing("reader: waiting for a free buffer"):
                    buffer = self._take()
                if buffer is None:  # closed
                    return
                if _span(offset, view.nbytes)[1] > buffer.nbytes:  # one row larger than a buffer: its own
                    self._free.put(buffer)
                    buffer, own = aligned_empty(_span(offset, view.nbytes)[1]), None
                else:
                    own = buffer
                with self._clock.timing("reader: reading"):
                    data = self._files.read(fd, offset, view.nbytes, buffer)
                self._ready.put(_Read(address(view), view.nbytes, data, own, None))
        except BaseException as exc:  # surfaced by `get`
            self._ready.put(_Read(0, 0, None, None, exc))

    def _take(self) -> np.ndarray | None:
        while not self._stop.is_set():
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def get(self, view: np.ndarray) -> tuple[np.ndarray, Callable[[], None]]:
        """The bytes of `view` as a contiguous array of its dtype and shape, and the call that hands its buffer
        back once they have been used (they must not be used after)."""
        self._waiting()
        if self._where(view) is None:
            return np.ascontiguousarray(view), lambda: self._checkpoint.release(view)
        with self._clock.timing("arranger: waiting for source bytes"):
            while True:
                try:
                    read = self._ready.get(timeout=0.1)
                    break
                except queue.Empty:
                    self._waiting()
        if read.error is not None:
            raise read.error
        if (read.at, read.nbytes) != (address(view), view.nbytes):
            raise RuntimeError("source chunks were asked for in another order than listed")
        return read.data.view(view.dtype).reshape(view.shape), functools.partial(self._give_back, read.buffer)

    def _give_back(self, buffer: np.ndarray | None) -> None:
        if buffer is not None:
            self._free.put(buffer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._files.close()


@dataclass
class _Read:
    at: int  # address and size of the view read
    nbytes: int
    data: np.ndarray | None
    buffer: np.ndarray | None  # the pooled buffer holding `data`, None for a chunk's own
    error: BaseException | None
