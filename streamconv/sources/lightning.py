"""PyTorch Lightning `.ckpt` files as NeMo-Megatron writes them, opened without torch.

`torch_zip.load` reads the pickle (by `safe_pickle`, which builds only allow-listed classes and turns every
other global into an inert placeholder, so a checkpoint cannot run code) and describes each tensor by
where its bytes lie. The file is then mapped once, read-only, and each tensor becomes a view into the
mapping (`records`). Placeholders inside `state_dict` or `hyper_parameters` are refused by name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from streamconv.errors import ConversionError
from streamconv.sources import safe_pickle, torch_zip
from streamconv.sources.hparams import lightning_cfg
from streamconv.sources.records import Checkpoint, MappedFile, tensors_of


def open_ckpt(path: str) -> Checkpoint:
    """Open a Lightning `.ckpt` without reading any weights."""
    _check_container(path)
    payload = torch_zip.load(path)
    if not isinstance(payload, Mapping):
        safe_pickle.refuse(path, "the checkpoint", payload)
        raise ConversionError(f"{path} holds a {type(payload).__name__}, not a Lightning checkpoint dict")
    if not isinstance(payload.get("state_dict"), Mapping):
        raise ConversionError(
            f"{path} has no 'state_dict' entry; expected a NeMo/Lightning .ckpt with state_dict and hyper_parameters"
        )
    cfg = lightning_cfg(path, payload)
    mapped = MappedFile(path)
    try:
        tensors = tensors_of(path, payload["state_dict"], mapped)
    except BaseException:
        mapped.close()
        raise
    return Checkpoint(path=path, tensors=tensors, hparams=cfg, files=[mapped])


def _check_container(path: str) -> None:
    """A missing file or a folder, named before anything is read (torch_zip.load names what is inside)."""
    if not os.path.exists(path):
        raise ConversionError(f"checkpoint not found: {path}; check --checkpoint-path")
    if os.path.isdir(path):
        raise ConversionError(f"checkpoint path is a directory: {path}, holding no checkpoint streamconv knows "
                              "(model_config.yaml, rank folders, metadata.json, weights/ and context/, "
                              "latest_checkpointed_iteration.txt); pass the .ckpt file inside it or the "
                              "checkpoint's folder")
