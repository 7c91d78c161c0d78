"""streamconv.reads: the chunks a conversion lists are read ahead, with direct preads, and handed out in order."""

import os
import threading
import time

import numpy as np
import pytest

from streamconv import reads
from streamconv.reads import ALIGN, ReadAhead, aligned_empty
from streamconv.sources.records import Checkpoint, MappedFile, address


@pytest.fixture
def mapped(tmp_path):
    """A 1 MiB + 123 byte file of known bytes, mapped as a checkpoint's file (its end is not block-aligned)."""
    path = tmp_path / "data.bin"
    data = np.random.default_rng(0).integers(0, 256, 2**20 + 123, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    file = MappedFile(str(path))
    checkpoint = Checkpoint(str(path), {}, None, files=[file])
    yield checkpoint, np.frombuffer(file.map, dtype=np.uint8), data
    checkpoint.close()


def spans(view: np.ndarray) -> list[np.ndarray]:
    """Unaligned views of all sizes, the file's last bytes among them, one larger than the buffers."""
    size = view.size
    return [view[1:4097], view[5000:5001], view[4096:8192], view[size - 700 :], view[100 : 100 + 300_000],
            view[12345:20000], view[:size], view[size - 1 :]]


def test_chunks_come_back_as_listed(mapped, monkeypatch):
    checkpoint, view, data = mapped
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, f, *a: opened.append(f) or real_open(p, f, *a))
    chunks = spans(view)
    ahead = ReadAhead(checkpoint, chunks, buffer_bytes=64 * 1024, buffers=2)
    try:
        for chunk in chunks:
            got, done = ahead.get(chunk)
            start = address(chunk) - address(view)
            assert got.dtype == chunk.dtype and got.shape == chunk.shape
            assert np.array_equal(got.view(np.uint8).reshape(-1), data[start : start + chunk.nbytes])
            assert not np.shares_memory(got, view)  # read into memory, not the mapping's pages
            done()
    finally:
        ahead.close()
    assert any(f & os.O_DIRECT for f in opened)


def test_a_typed_view_keeps_its_dtype_and_shape(mapped):
    checkpoint, view, data = mapped
    chunk = view[8:8 + 4096 * 3].view(np.int16).reshape(64, -1)
    ahead = ReadAhead(checkpoint, [chunk], buffer_bytes=2**16)
    try:
        got, done = ahead.get(chunk)
        assert got.dtype == np.int16 and got.shape == (64, 96)
        assert np.array_equal(got, data[8:8 + 4096 * 3].view(np.int16).reshape(64, -1))
        done()
    finally:
        ahead.close()


def test_views_that_are_not_spans_of_a_file_are_copies(mapped):
    checkpoint, view, _ = mapped
    in_memory = np.arange(10, dtype=np.int16)
    strided = view[:4000:2]
    ahead = ReadAhead(checkpoint, [in_memory, strided], buffer_bytes=4096)
    try:
        for chunk in (in_memory, strided):
            got, done = ahead.get(chunk)
            assert got.flags.c_contiguous and np.array_equal(got, chunk)
            done()
    finally:
        ahead.close()


def test_asking_out_of_order_is_an_error(mapped):
    checkpoint, view, _ = mapped
    first, second = view[:100], view[100:200]
    ahead = ReadAhead(checkpoint, [first, second], buffer_bytes=4096)
    try:
        with pytest.raises(RuntimeError, match="another order"):
            ahead.get(second)
    finally:
        ahead.close()


def test_a_file_shorter_than_its_mapping_says_so(mapped, tmp_path):
    """The file shrank after it was mapped: the read fails with a message, in the caller's thread."""
    checkpoint, view, _ = mapped
    os.truncate(tmp_path / "data.bin", 1000)
    ahead = ReadAhead(checkpoint, [view[4096:8192]], buffer_bytes=8192)
    try:
        with pytest.raises(OSError, match="ended .* bytes early"):
            ahead.get(view[4096:8192])
    finally:
        ahead.close()


class _Stop:
    """A `waiting` check that raises (as a conversion's does once its writer failed) from when `now` is set."""

    now = False

    def __call__(self) -> None:
        if self.now:
            raise KeyboardInterrupt


def test_the_reader_waits_for_a_free_buffer_and_a_wait_can_be_broken(mapped):
    """With every buffer handed out, the reader waits; the caller's `waiting` check (the writer's error, in a
    conversion) ends a wait for a chunk that cannot come; closing ends the reader."""
    checkpoint, view, _ = mapped
    chunks = [view[i * 4096 : (i + 1) * 4096] for i in range(4)]
    stop = _Stop()
    ahead = ReadAhead(checkpoint, chunks, buffer_bytes=4096, buffers=1, waiting=stop)
    try:
        _, done = ahead.get(chunks[0])  # (its buffer is not handed back)
        stop.now = True
        with pytest.raises(KeyboardInterrupt):
            ahead.get(chunks[1])
    finally:
        ahead.close()
    assert not [t for t in threading.enumerate() if t.name == "streamconv-read"]


def test_a_chunk_already_read_is_not_handed_out_once_the_caller_must_stop(mapped):
    """`get` asks the `waiting` check first, even when the chunk is there: a conversion stops at its next chunk,
    not at the next one it has to wait for."""
    checkpoint, view, _ = mapped
    chunks = [view[i * 4096 : (i + 1) * 4096] for i in range(2)]
    stop = _Stop()
    ahead = ReadAhead(checkpoint, chunks, buffer_bytes=4096, buffers=2, waiting=stop)
    try:
        _, done = ahead.get(chunks[0])
        deadline = time.monotonic() + 30
        while ahead._ready.empty() and time.monotonic() < deadline:  # the second chunk read
            time.sleep(0.01)
        assert not ahead._ready.empty()
        stop.now = True
        with pytest.raises(KeyboardInterrupt):
            ahead.get(chunks[1])
    finally:
        ahead.close()


def test_aligned_empty_is_aligned():
    for size in (1, 4096, 10**6):
        assert address(aligned_empty(size)) % ALIGN == 0 and aligned_empty(size).nbytes == size
    assert reads.BUFFERS >= 2
