"""PyTorch Lightning `.ckpt` files as NeMo-Megatron writes them.

The file is opened by `torch_zip.load`, as `torch.load(mmap=True)` would: tensors are views into one private
mapping of the whole file, so nothing is read until it is touched, and optimizer state is never touched.
The pickle is read by `safe_pickle`, which builds only allow-listed classes and turns every other global into an inert
placeholder, so a checkpoint cannot run code; placeholders inside `state_dict` or `hyper_parameters` are
refused by name. Pages of the mapping stay resident once touched; `Checkpoint.release` hands them back
after a tensor has been consumed, which is what keeps memory bounded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from streamconv.errors import ConversionError
from streamconv.sources import safe_pickle, torch_zip

# torch.save(..., _use_new_zipfile_serialization=False): a pickle stream starting with torch's magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass
class MappedFile:
    """One file whose tensors are views into a private mapping of it (a .ckpt, a .nemo, a rank's weights)."""

    file: str
    start: int  # address range of the mapping the tensors live in
    end: int
    base: int | None  # address of file offset 0 in that mapping, when /proc/self/maps tells
    fd: int | None = None  # a read-only descriptor, opened on first use (copies inside the kernel)

    def holds(self, tensor: torch.Tensor) -> bool:
        start = tensor.data_ptr()
        return tensor.device.type == "cpu" and self.start <= start and start + tensor.nbytes <= self.end

    def descriptor(self) -> int:
        if self.fd is None:
            self.fd = os.open(self.file, os.O_RDONLY)
        return self.fd


@dataclass
class Checkpoint:
    """A NeMo checkpoint opened lazily: `tensors` maps state_dict keys to mmap-backed tensors, or to
    `Split`s (slices on tensor-parallel ranks, in `sources/parallel.py`) of a model saved in parts."""

    path: str
    tensors: Mapping[str, Any]  # torch.Tensor, or Split for a tensor-parallel model
    hparams: Any  # the `cfg` mapping (OmegaConf DictConfig or dict), None if absent; read through `hparam`
    files: list[MappedFile] = field(default_factory=list)
    config_name: str = "'hyper_parameters.cfg' entry"  # where the cfg comes from, for error messages
    note: str = ""  # said in the summary, e.g. that a gzip archive was extracted
    tokenizer: bytes | None = None  # the SentencePiece model shipped with the checkpoint (a .nemo artifact)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the descriptors opened for kernel copies (the mappings go with the tensors)."""
        for mapped in self.files:
            if mapped.fd is not None:
                os.close(mapped.fd)
                mapped.fd = None
        self.tensors, self.files = {}, []  # the mappings go once no other reference holds a tensor

    def _file_of(self, tensor: torch.Tensor) -> MappedFile | None:
        return next((m for m in self.files if m.holds(tensor)), None)

    def file_offset(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        """(descriptor, offset) of a tensor's bytes in its checkpoint file (None if not in a mapping)."""
        mapped = self._file_of(tensor)
        if mapped is None or mapped.base is None:
            return None
        return mapped.descriptor(), tensor.data_ptr() - mapped.base

    def release(self, tensor: torch.Tensor) -> None:
        """Hand back the pages behind a consumed source tensor (a view into one of the file mappings)."""
        if self._file_of(tensor) is not None:
            _madvise(tensor, mmap.MADV_DONTNEED)

    def prefetch(self, tensor: torch.Tensor) -> None:
        """Have the kernel read a tensor's bytes into the page cache (not into this process).

        One MADV_WILLNEED reads at most the device's readahead window (a few MB), so a large tensor is
        asked for slice by slice. The reads complete asynchronously; this returns once they are queued.
        """
        if self._file_of(tensor) is None:
            return
        flat = tensor.reshape(-1).view(torch.uint8)
        for start in range(0, flat.numel(), _READAHEAD_SLICE):
            _madvise(flat[start : start + _READAHEAD_SLICE], mmap.MADV_WILLNEED)

    def hparam(self, key: str, default: Any = None) -> Any:
        """One hyper-parameter, with OmegaConf interpolations such as `${.encoder_seq_length}` resolved."""
        if self.hparams is None:
            return default
        try:
            return self.hparams.get(key, default)
        except Exception as exc:  # an interpolation that cannot be resolved
            raise ConversionError(
                f"hyper-parameter {key!r} in {self.path} cannot be read ({exc}); fix the checkpoint's cfg"
            ) from None


def open_checkpoint(path: str | os.PathLike[str], scratch: str | None = None,
                    say: Callable[[str], None] | None = None) -> Checkpoint:
    """Open a Lightning `.ckpt` or a `.nemo` (archive or extracted folder) without reading any weights.

    `scratch` is the folder a gzip `.nemo`'s weights are extracted into (the output's parent); `say`
    receives progress notes for the user.
    """
    from streamconv.sources import nemo

    path = os.fspath(path)
    if nemo.is_nemo(path):
        return nemo.open_nemo(path, scratch, say)
    _check_container(path)
    payload = torch_zip.load(path)

    if not isinstance(payload, Mapping):
        refuse(path, "the checkpoint", payload)
        raise ConversionError(f"{path} holds a {type(payload).__name__}, not a Lightning checkpoint dict")
    if not isinstance(payload.get("state_dict"), Mapping):
        raise ConversionError(
            f"{path} has no 'state_dict' entry; expected a NeMo/Lightning .ckpt with state_dict and hyper_parameters"
        )
    hparams = payload.get("hyper_parameters")
    refuse(path, "hyper_parameters", hparams)
    cfg = hparams.get("cfg") if hasattr(hparams, "get") else None
    return checkpoint_from_state_dict(path, payload["state_dict"], cfg)


def checkpoint_from_state_dict(path: str, state_dict: Mapping, cfg: Any, file: str | None = None,
                               config_name: str | None = None) -> Checkpoint:
    """A Checkpoint over an unpickled, mmap-backed state_dict of the file `file` (default `path`)."""
    tensors = tensors_of(path, state_dict)
    return Checkpoint(path=path, tensors=tensors, hparams=cfg, files=[mapped_file(file or path, tensors)],
                      config_name=config_name or Checkpoint.config_name)


def tensors_of(path: str, state_dict: Mapping) -> dict[str, torch.Tensor]:
    """The tensors of an unpickled state_dict, refused if it holds anything not on the allow-list."""
    refuse(path, "state_dict", state_dict)
    return {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def mapped_file(file: str, tensors: Mapping[str, torch.Tensor]) -> MappedFile:
    """The mapping of `file` that `tensors` (loaded by torch_zip.load) are views into."""
    storages = [t.untyped_storage() for t in tensors.values()]
    if not storages:
        return MappedFile(file, 0, 0, None)
    start = min(s.data_ptr() for s in storages)
    end = max(s.data_ptr() + s.nbytes() for s in storages)
    return MappedFile(file, start, end, _file_base(file, start))


def _file_base(path: str, address: int) -> int | None:
    """The address that file offset 0 of `path` has in the mapping holding `address` (Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if start <= address < end and len(fields) == 6:
                    same = os.path.samefile(fields[5].strip(), path)
                    return start - int(fields[2], 16) if same else None
    except (OSError, ValueError):
        pass
    return None


def _check_container(path: str) -> None:
    """Name the common ways a file is not a readable torch zip checkpoint, before unpickling anything."""
    if not os.path.exists(path):
        raise ConversionError(f"checkpoint not found: {path}; check --checkpoint-path")
    if os.path.isdir(path):
        raise ConversionError(f"checkpoint path is a directory: {path}; pass the .ckpt file inside it")
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if head.startswith(_LEGACY_MAGIC):
        raise ConversionError(
            f"{path} uses torch's legacy (pre-1.6) format, which cannot be memory-mapped; re-save it in a "
            "trusted environment with torch.save(torch.load(path, weights_only=False), new_path)"
        )
    if not head.startswith(_ZIP_MAGIC):
        raise ConversionError(f"{path} is not a torch checkpoint (no zip header); check --checkpoint-path")


def refuse(path: str, entry: str, obj: Any) -> None:
    name = safe_pickle.refused_global(obj)
    if name is not None:
        raise ConversionError(
            f"{path}: {entry} contains a pickled reference to {name}, which streamconv refuses to load "
            "(only tensors, containers and OmegaConf configs are allowed); do not trust this file"
        )


_PAGE = mmap.PAGESIZE
_READAHEAD_SLICE = 4 * 2**20
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _madvise(tensor: torch.Tensor, advice: int) -> None:
    """madvise over the whole pages spanned by a contiguous tensor in the checkpoint's file mapping.

    The mapping is private and never written, so MADV_DONTNEED only forgets pages: touching them again
    re-reads the file (from the page cache). Never use it on anonymous memory, where it zeroes data.
    Widening to whole pages is harmless: a neighbouring tensor sharing an edge page faults it back in.
    """
    if tensor.numel() == 0:
        return
    start = tensor.data_ptr()
    end = start + tensor.nbytes
    start &= ~(_PAGE - 1)
    end = (end + _PAGE - 1) & ~(_PAGE - 1)
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice)
