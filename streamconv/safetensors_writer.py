"""Writes a safetensors file whose header is known up front: header first, then tensor bytes in order.

The plan fixed every offset, so bytes are appended as they arrive and the writer only checks that each
tensor ends exactly where the plan says. Data goes from the tensor's own memory to the kernel: no copy.
"""

from __future__ import annotations

import os

import torch

from streamconv.plan import Shard, TensorSpec


class ShardWriter:
    """One shard file, written sequentially. Use as a context manager; `close` fsyncs."""

    def __init__(self, path: str, shard: Shard) -> None:
        self.path = path
        self.shard = shard
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._data_pos = 0
        _write_all(self._fd, memoryview(shard.header))

    def append(self, data: torch.Tensor) -> None:
        """Append a contiguous CPU tensor's bytes."""
        flat = data.reshape(-1).view(torch.uint8)
        _write_all(self._fd, memoryview(flat.numpy()))
        self._data_pos += flat.numel()

    def finish_tensor(self, spec: TensorSpec) -> None:
        """Check that the bytes written so far end where the plan put this tensor's end."""
        if self._data_pos != spec.end:
            raise RuntimeError(f"{spec.name}: wrote up to byte {self._data_pos}, plan says {spec.end}")

    def close(self) -> None:
        if self._fd >= 0:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_all(fd: int, view: memoryview) -> None:
    """os.write may write less than asked (Linux caps one call near 2 GiB)."""
    while view.nbytes:
        n = os.write(fd, view)
        view = view[n:]
