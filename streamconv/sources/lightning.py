"""PyTorch Lightning `.ckpt` files as NeMo-Megatron writes them.

The file is opened with `torch.load(mmap=True, weights_only=True)`: tensors are views into one private
mapping of the whole file, so nothing is read until it is touched, and optimizer state is never touched.
The pickle may only build the classes in `ALLOWED_GLOBALS` (torch's weights-only unpickler enforces it),
so a checkpoint cannot run code. Pages of the mapping stay resident once touched; `Checkpoint.release`
hands them back after a tensor has been consumed, which is what keeps memory bounded.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import mmap
import os
import pickle
import typing
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from streamconv.errors import ConversionError


def _omegaconf_globals() -> list[Any]:
    """The OmegaConf classes NeMo pickles into `hyper_parameters` (a DictConfig tree of AnyNodes)."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode

    return [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode]


# Beyond torch's own tensor and storage rebuild functions: what a NeMo `.ckpt` really holds.
_PLAIN_GLOBALS: list[Any] = [typing.Any, dict, list, int, collections.defaultdict]


@dataclass
class Checkpoint:
    """A NeMo checkpoint opened lazily: `tensors` maps state_dict keys to mmap-backed tensors."""

    path: str
    tensors: Mapping[str, torch.Tensor]
    hparams: Any  # the `cfg` mapping (OmegaConf DictConfig or dict); read keys through `hparam`
    mapped: tuple[int, int] = (0, 0)  # address range of the file mapping the tensors live in

    def release(self, tensor: torch.Tensor) -> None:
        """Hand back the pages behind a consumed source tensor (a view into this checkpoint's mapping)."""
        if self._in_mapping(tensor):
            _madvise(tensor, mmap.MADV_DONTNEED)

    def prefetch(self, tensor: torch.Tensor) -> None:
        """Ask the kernel to start reading a tensor's bytes into the page cache (returns at once)."""
        if self._in_mapping(tensor):
            _madvise(tensor, mmap.MADV_WILLNEED)

    def _in_mapping(self, tensor: torch.Tensor) -> bool:
        start = tensor.data_ptr()
        return tensor.device.type == "cpu" and self.mapped[0] <= start and start + tensor.nbytes <= self.mapped[1]

    def hparam(self, key: str, default: Any = None) -> Any:
        """One hyper-parameter, with OmegaConf interpolations such as `${.encoder_seq_length}` resolved."""
        try:
            return self.hparams.get(key, default)
        except Exception as exc:  # an interpolation that cannot be resolved
            raise ConversionError(
                f"hyper-parameter {key!r} in {self.path} cannot be read ({exc}); fix the checkpoint's cfg"
            ) from None


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a Lightning `.ckpt` without reading any weights."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConversionError(f"checkpoint not found: {path}; check --checkpoint-path")
    if os.path.isdir(path):
        raise ConversionError(f"checkpoint path is a directory: {path}; pass the .ckpt file inside it")
    if not zipfile.is_zipfile(path):
        raise ConversionError(
            f"{path} is not a torch zip checkpoint (torch >= 1.6 format); "
            "re-save it with torch.save(torch.load(path), new_path) in a trusted environment"
        )
    try:
        with torch.serialization.safe_globals(_omegaconf_globals() + _PLAIN_GLOBALS):
            payload = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(
            f"{path} holds objects streamconv will not unpickle ({first_line}); "
            "only tensors, containers and OmegaConf configs are allowed"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ConversionError(f"cannot read checkpoint {path}: {exc}; is the file complete?") from None

    if not isinstance(payload, Mapping) or "state_dict" not in payload:
        raise ConversionError(
            f"{path} has no 'state_dict' entry; expected a NeMo/Lightning .ckpt with state_dict and hyper_parameters"
        )
    hparams = payload.get("hyper_parameters")
    cfg = hparams.get("cfg") if isinstance(hparams, Mapping) or hasattr(hparams, "get") else None
    if cfg is None:
        raise ConversionError(
            f"{path} has no 'hyper_parameters.cfg' entry; expected a NeMo/Lightning .ckpt saved with its model config"
        )
    tensors = {k: v for k, v in payload["state_dict"].items() if isinstance(v, torch.Tensor)}
    storages = [t.untyped_storage() for t in tensors.values()]
    mapped = (
        (min(s.data_ptr() for s in storages), max(s.data_ptr() + s.nbytes() for s in storages))
        if storages
        else (0, 0)
    )
    return Checkpoint(path=path, tensors=tensors, hparams=cfg, mapped=mapped)


_PAGE = mmap.PAGESIZE
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
