"""megatron-core distributed checkpoints: where they sit, their hyper-parameters, their layers unstacked.

A distributed checkpoint is a folder holding `metadata.json` (`sharded_backend`: `torch_dist` or `zarr`), the
backend's files (read by `dcp` or `zarr`) and, up to megatron-core 0.18, `common.pt` (everything not sharded).
It sits in one of several layouts, each with its own source of hyper-parameters:
- a NeMo 1.x `.nemo` or its folder: `model_weights/`, beside `model_config.yaml` (read by `nemo`, which hands the
  folder here);
- a NeMo 1.x training checkpoint: the folder itself, `common.pt`'s `hyper_parameters` (OmegaConf objects);
- NeMo 2.0: `weights/` beside `context/model.yaml` (a fiddle-serialised config, read as data: no `_target_`
  is ever imported) and its tokenizer file;
- Megatron-LM: `iter_NNNNNNN/` (the one `latest_checkpointed_iteration.txt` names, when given the parent),
  `common.pt`'s `args` (an argparse.Namespace, read as an inert record).

megatron-core stacks a transformer block's layers: `decoder.layers.self_attention.linear_qkv.weight` has the
global shape `[layers, 3h, h]`, one chunk per layer and tensor-parallel slice. Each layer becomes its own tensor,
`decoder.layers.N.self_attention.linear_qkv.weight`, the names a plain mcore state_dict has; a tensor made of
several chunks becomes a `Split` of views into them, so nothing is read before it is streamed. A mixture of
experts' weights are grouped the same way, one more axis: `...mlp.experts.experts.linear_fc1.weight` is
`[layers, experts, 2f, h]` (without the layer axis where layers are saved one by one), one chunk per expert (and per
gate/up half); each expert becomes `...mlp.experts.local_experts.E.linear_fc1.weight`, a one-rank state_dict's name,
E counted over all expert-parallel ranks. A Mamba mixer's input projection and convolution are saved in named row
blocks (`mixer.in_proj.weight.z`, `.x`, `.B`, `.C`, `.dt`, each sliced across tensor-parallel ranks): they are
joined back, in megatron-core's order, into the one tensor a one-rank model holds (`ROW_BLOCKS`).
"""

from __future__ import annotations

import json
import os
import re
import resource
from collections.abc import Mapping
from typing import Any

from streamconv.errors import ConversionError, describe
from streamconv.sources import dcp, torch_zip
from streamconv.sources.hparams import MAX_CONFIG_BYTES, Config, lightning_cfg, yaml_config
from streamconv.sources.records import Checkpoint, Files, Folder, MappedFile, SourceTensor, Split
from streamconv.tokenizer import HF_MAX_BYTES, HF_TOKENIZER_FILES, MAX_BYTES, check_hf_files

METADATA_JSON = "metadata.json"
COMMON = "common.pt"
TRACKER = "latest_checkpointed_iteration.txt"
_MAX_JSON = 2**20
_MAX_COMMON = 2**30  # common.pt: the hyper-parameters, the optimizer's param groups, scheduler state
_MAX_LAYERS = 4096  # a stacked tensor's first axis (the deepest models have a few hundred layers)
_MAX_EXPERTS = 2**16  # a grouped expert tensor's expert axis (the largest models have a few hundred experts)
_STACKED = re.compile(r"(.*?(?:^|\.)layers\.)(?![0-9]+(?:\.|$))(.+)", re.DOTALL)  # `layers.` not followed by N.
_GROUPED = re.compile(r"(.*\.experts\.)experts\.(?![0-9]+(?:\.|$))(.+)", re.DOTALL)  # `experts.experts.` not ... N.
# Tensors megatron-core saves as named row blocks, and the order of the blocks in the tensor (its Mamba mixer's)
ROW_BLOCKS = {"mixer.in_proj.weight": ("z", "x", "B", "C", "dt"), "mixer.conv1d.weight": ("x", "B", "C"),
              "mixer.conv1d.bias": ("x", "B", "C")}
# Hyper-parameters are asked for by their NeMo 1.x names (what the families read); other writers' names:
MEGATRON_LM = {"encoder_seq_length": "max_position_embeddings", "layernorm_epsilon": "norm_epsilon",
               "num_moe_experts": "num_experts", "seq_len_interpolation_factor": "rotary_seq_len_interpolation_factor"}
NEMO2 = {"encoder_seq_length": "seq_length"}
INTEGRITY = "integrity.json"  # megatron-core >= 0.18's optional {"algorithm": "sha256", "files": {name: digest}}
RUN_CONFIG = "run_config.yaml"  # Megatron-Bridge's, beside the weights: its ConfigContainer, the model under model:
HF_TOKENIZER = "nemo_tokenizer"  # NeMo 2.0's folder in context/ for a Hugging Face tokenizer's save_pretrained
BRIDGE_TOKENIZER = "tokenizer"  # Megatron-Bridge's, beside the weights (save_tokenizer_assets, on by default)


def is_distributed(path: str) -> bool:
    """A folder that holds a distributed checkpoint or one of the layouts around one."""
    if not os.path.isdir(path):
        return False
    return bool(set(os.listdir(path)) & {METADATA_JSON, dcp.METADATA, TRACKER}) or _nemo2(path) is not None


def _nemo2(path: str) -> tuple[str, str] | None:
    """(weights, context) of a NeMo 2.0 checkpoint given as its folder or as its `weights/`; None otherwise."""
    if {"weights", "context"} <= set(os.listdir(path)):
        return os.path.join(path, "weights"), os.path.join(path, "context")
    context = os.path.join(path, os.pardir, "context")
    if os.path.basename(os.path.normpath(path)) == "weights" and os.path.isdir(context):
        return path, context
    return None


def open_folder(path: str) -> Checkpoint:
    """Open a distributed checkpoint in any of the folder layouts above, reading no weights."""
    if os.path.lexists(os.path.join(path, TRACKER)):
        return open_folder(_tracked_iteration(path))
    nemo2 = _nemo2(path)
    if nemo2 is not None:
        return _open_nemo2(*nemo2, path)
    return open_distributed(Folder(path))


def open_distributed(files: Files, cfg: Config | None = None, config_name: str | None = None,
                     tokenizer: bytes | None = None) -> Checkpoint:
    """The distributed checkpoint in `files`; hyper-parameters from `cfg` (a layout's config file) or else its
    `common.pt` (NeMo's `hyper_parameters`, Megatron-LM's `args`)."""
    backend = _backend(files)
    index = dcp.read_metadata(files) if backend == "torch_dist" else None
    vocab_size, tokenizer_files = None, {}
    if cfg is None and files.exists(RUN_CONFIG):  # (Megatron-Bridge keeps no hyper-parameters in the common state)
        cfg = yaml_config(files.path(RUN_CONFIG), files.read(RUN_CONFIG, MAX_CONFIG_BYTES), ("model",), NEMO2)
        if cfg is None:
            raise ConversionError(f"{files.path(RUN_CONFIG)} has no model: section, where Megatron-Bridge keeps the "
                                  "architecture; the checkpoint is damaged: copy it again")
        config_name, vocab_size = f"'model' section of {RUN_CONFIG}", cfg.get("vocab_size")
        tokenizer_files = hf_tokenizer(files, BRIDGE_TOKENIZER)
    if cfg is None and files.exists(COMMON):  # (a legacy common.pt wins, as in megatron-core's loader)
        cfg, config_name = _common_cfg(files.path(COMMON), *files.locate(COMMON), COMMON)
    elif cfg is None and index is not None and index.common_state is not None:
        name, offset, length = index.common_state
        file, start, _ = files.locate(name)
        cfg, config_name = _common_cfg(f"{files.path(name)} ({dcp.COMMON_STATE})", file, start + offset, length,
                                       "common_state")
    mapped: dict[str, MappedFile] = {}
    try:
        tensors = _tensors(files, index, mapped)
        return Checkpoint(path=files.label, tensors=tensors, hparams=cfg, files=list(mapped.values()),
                          config_name=config_name or f"hyper-parameters (no {COMMON} or layout config beside it)",
                          tokenizer=tokenizer, tokenizer_files=tokenizer_files, vocab_size=vocab_size,
                          integrity=files if files.exists(INTEGRITY) else None)
    except BaseException:
        for m in mapped.values():
            m.close()
        raise


def _backend(files: Files) -> str:
    """`metadata.json`'s sharded_backend ('torch_dist' when there is only torch's `.metadata`)."""
    if not files.exists(METADATA_JSON):
        if files.exists(dcp.METADATA):
            return "torch_dist"
        raise ConversionError(f"{files.label} has neither {METADATA_JSON} nor {dcp.METADATA}: not a distributed "
                              "checkpoint; check --checkpoint-path")
    try:
        config = json.loads(files.read(METADATA_JSON, _MAX_JSON))
    except (ValueError, UnicodeError, RecursionError) as exc:
        raise ConversionError(f"{files.path(METADATA_JSON)} is not JSON ({str(exc)[:120]}); the checkpoint is "
                              "damaged, copy it again") from None
    backend = config.get("sharded_backend") if isinstance(config, dict) else None
    if backend not in ("torch_dist", "zarr"):
        raise ConversionError(f"{files.path(METADATA_JSON)} says sharded_backend {describe(backend)}; streamconv "
                              "reads torch_dist and zarr distributed checkpoints")
    return backend


def _common_cfg(label: str, file: str, offset: int, size: int, where: str) -> tuple[Config | None, str]:
    """The hyper-parameters in megatron-core's common state (`common.pt`, or from 0.17 on the `common_state` item,
    whose archive holds `[state]`): NeMo's Lightning `hyper_parameters.cfg`, or Megatron-LM's `args`."""
    if size > _MAX_COMMON:
        raise ConversionError(f"{label} has {size} bytes, more than such a file needs; the checkpoint is damaged or "
                              "hostile")
    payload = torch_zip.load(file, offset, size, label)
    if where != COMMON and isinstance(payload, list) and len(payload) == 1:
        payload = payload[0]
    if not isinstance(payload, Mapping):
        raise ConversionError(f"{label} holds a {type(payload).__name__}, not megatron-core's common state dict")
    if "hyper_parameters" in payload:
        return lightning_cfg(label, payload), f"'hyper_parameters.cfg' entry of {where}"
    if "args" in payload:  # Megatron-LM's: only plain values are read (its enums and dtypes stay inert placeholders)
        return Config.of(payload, ("args",), f"{label} (args)", MEGATRON_LM), f"'args' entry of {where}"
    return None, f"hyper-parameters ({where} has neither NeMo's hyper_parameters nor Megatron-LM's args)"


def _tracked_iteration(path: str) -> str:
    """The iteration folder `latest_checkpointed_iteration.txt` names (`iter_0000100`, or `release`)."""
    text = Folder(path).read(TRACKER, 64).decode("ascii", errors="replace").strip()
    name = "release" if text == "release" else f"iter_{int(text):07d}" if text.isdecimal() else None
    if name is None:
        raise ConversionError(f"{os.path.join(path, TRACKER)} says {text[:40]!r}, not an iteration number or "
                              "'release'; fix it or pass the iter_NNNNNNN folder")
    folder = os.path.join(path, name)
    if not os.path.isdir(folder) or os.path.islink(folder):
        raise ConversionError(f"{os.path.join(path, TRACKER)} names iteration {text}, but {folder} is not a folder; "
                              "copy it, or pass the iter_NNNNNNN folder to convert")
    return folder


def _open_nemo2(weights: str, context: str, label: str) -> Checkpoint:
    """NeMo 2.0: the architecture from `context/model.yaml`'s `config`, the tokenizer file it names, the Hugging
    Face tokenizer in `context/nemo_tokenizer/`."""
    if not os.path.isdir(context):
        raise ConversionError(f"{label} has no context/ folder beside weights/; copy the whole NeMo 2.0 checkpoint")
    for linked in (weights, context):
        if os.path.islink(linked.rstrip("/")):
            raise ConversionError(f"{linked} is a symbolic link; streamconv reads a NeMo 2.0 checkpoint only from its "
                                  "own folders (replace the link by the folder)")
    folder = Folder(context)
    source = folder.path("model.yaml")
    cfg = yaml_config(source, folder.read("model.yaml", MAX_CONFIG_BYTES), ("config",), NEMO2) \
        if folder.exists("model.yaml") else None
    tokenizer = None
    try:  # the tokenizer file model.yaml names, read only from inside context/; else none (--tokenizer adds one)
        name = cfg and Config(cfg.root, (), source).get("tokenizer.model_path")
        if isinstance(name, str) and name.endswith(".model") and folder.exists(name):
            tokenizer = folder.read(name, MAX_BYTES)
    except ConversionError:
        tokenizer = None
    checkpoint = open_distributed(Folder(weights), cfg, "'config' section of context/model.yaml", tokenizer)
    try:
        checkpoint.tokenizer_files = hf_tokenizer(folder, HF_TOKENIZER)
    except BaseException:
        checkpoint.close()
        raise
    return checkpoint


def hf_tokenizer(files: Files, folder: str) -> dict[str, bytes]:
    """The Hugging Face tokenizer a trainer saved in `folder` (NeMo 2.0's context/nemo_tokenizer/, Megatron-Bridge's
    tokenizer/ beside the weights): files of known names only, checked as data before anything copies or loads them."""
    found = {name: files.read(f"{folder}/{name}", HF_MAX_BYTES)
             for name in HF_TOKENIZER_FILES if files.exists(f"{folder}/{name}")}
    check_hf_files(found, files.path(folder))
    return found


def _tensors(files: Files, index: dcp.DcpIndex | None, mapped: dict[str, MappedFile]) -> dict[str, Any]:
    """Every weight, its stacked layers unstacked, each a view into the mapped files (or a `Split` of views)."""
    def view(file: str, stored: torch_zip.StoredTensor) -> SourceTensor:
        if file not in mapped:
            mapped[file] = MappedFile(file)
        return mapped[file].tensor(stored)

    pieces: dict[str, tuple[tuple[int, ...], list[tuple[tuple[int, ...], SourceTensor]]]] = {}
    if index is not None:  # (torch_dist; else zarr)
        tensors = index.tensors
        names = {c.file for t in tensors.values() for c in t.chunks}
        _allow_open_files(files.label, len({files.locate(name)[0] for name in names}))
        for fqn, tensor in tensors.items():
            pieces[fqn] = (tensor.shape, [(c.offsets, view(*dcp.chunk_tensor(files, c))) for c in tensor.chunks])
    else:
        from streamconv.sources import zarr

        index = zarr.read_zarr(files)
        _allow_open_files(files.label, len({c.file for t in index.values() for c in t.chunks}))
        for fqn, tensor in index.items():
            pieces[fqn] = (tensor.shape, [(c.offsets, view(c.file, c.stored)) for c in tensor.chunks])
    out: dict[str, Any] = {}
    for fqn, (shape, chunks) in pieces.items():
        for name, sub_shape, sub_chunks in _unstacked(files.label, fqn, shape, chunks):
            if name in out:
                raise ConversionError(f"{files.label} holds {name!r} twice (stacked and per layer); the checkpoint "
                                      "is damaged")
            out[name] = _joined(files.label, name, sub_shape, sub_chunks)
    return _blocks_joined(files.label, out)


def _blocks_joined(label: str, tensors: dict[str, Any]) -> dict[str, Any]:
    """`tensors` with each tensor saved in named row blocks (`ROW_BLOCKS`) joined back: a `Split` along its rows of
    every block's slices, in order."""
    for suffix, blocks in ROW_BLOCKS.items():
        for base in [k[: -len(blocks[0]) - 1] for k in tensors if k.endswith(f"{suffix}.{blocks[0]}")]:
            names = [f"{base}.{block}" for block in blocks]
            missing = [n for n in names if n not in tensors]
            if missing:
                raise ConversionError(f"{label} holds {names[0]!r} but not {missing[0]!r}: a tensor saved in row "
                                      "blocks is incomplete; the checkpoint is damaged")
            parts = [part for n in names for part in _row_parts(label, n, tensors.pop(n))]
            if len({p.shape[1:] for p in parts}) != 1 or len({p.dtype for p in parts}) != 1:
                raise ConversionError(f"{label}: the row blocks of {base!r} differ in width or dtype; the checkpoint "
                                      "is damaged")
            tensors[base] = Split(tuple(parts), 0)
    return tensors


def _row_parts(label: str, name: str, tensor: SourceTensor | Split) -> tuple[SourceTensor, ...]:
    if isinstance(tensor, SourceTensor):
        return (tensor,)
    if tensor.axis != 0:
        raise ConversionError(f"{label}: {name!r} is sliced along axis {tensor.axis}, not by rows as megatron-core "
                              "slices a row block; the checkpoint is damaged")
    return tensor.parts


def _allow_open_files(label: str, count: int) -> None:
    """Raise the open-file limit to hold one mapping per chunk file (each keeps its descriptor, for copies in
    the kernel): megatron-core writes two .distcp files per rank, zarr one file per chunk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = count + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            raise ConversionError(f"{label} has {count} chunk files, more than the {hard} files this process may "
                                  "open; raise the limit (ulimit -Hn) or save the checkpoint with torch_dist")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


Pieces = list[tuple[tuple[int, ...], SourceTensor]]  # (offsets in the tensor, the chunk's view)


Unstacked = list[tuple[str, tuple[int, ...], Pieces]]


def _unstacked(label: str, fqn: str, shape: tuple[int, ...], chunks: Pieces) -> Unstacked:
    """A stacked layer tensor as one tensor per layer (`...layers.N.rest`), and a grouped expert tensor as one per
    expert (`...experts.local_experts.E.rest`); any other tensor as it is."""
    return [expert for layer in _split_first_axis(label, fqn, shape, chunks, _STACKED, "{}{}.{}", _MAX_LAYERS, "layers")
            for expert in _split_first_axis(label, *layer, _GROUPED, "{}local_experts.{}.{}", _MAX_EXPERTS, "experts")]


def _split_first_axis(label: str, fqn: str, shape: tuple[int, ...], chunks: Pieces, pattern: re.Pattern, name: str,
                      most: int, what: str) -> Unstacked:
    """The tensor as one tensor per index of its first axis, named `name.format(before, index, after)` around
    where `pattern` matches the name; as it is where it does not match."""
    m = pattern.fullmatch(fqn)
    if m is None or not shape:
        return [(fqn, shape, chunks)]
    if not 0 < shape[0] <= most or 0 in shape:
        raise ConversionError(f"{label}: the stacked {what} {fqn!r} have the shape {list(shape)}: no model has "
                              f"that many {what}, or none; the checkpoint is damaged")
    parts: list[Pieces] = [[] for _ in range(shape[0])]
    for offsets, chunk in chunks:
        for index in range(offsets[0], offsets[0] + chunk.shape[0]):
            parts[index].append((offsets[1:], SourceTensor(chunk.bits[index - offsets[0], ...], chunk.dtype)))
    return [(name.format(m.group(1), i, m.group(2)), shape[1:], part) for i, part in enumerate(parts)]


def _joined(label: str, name: str, shape: tuple[int, ...], chunks: Pieces) -> SourceTensor | Split:
    """The chunks that tile a tensor (checked by the backend) as one view, or a `Split` along the one axis
    they divide: megatron-core slices a tensor on one axis only."""
    chunks = [c for c in chunks if 0 not in c[1].shape]
    if not chunks:  # (an empty tensor: its chunks were checked to tile it)
        raise ConversionError(f"{label}: {name!r} is empty ({list(shape)}); no model weight is, the checkpoint is "
                              "damaged")
    if len(chunks) == 1:
        return chunks[0][1]
    axes = {d for offsets, c in chunks for d in range(len(shape)) if offsets[d] != 0 or c.shape[d] != shape[d]}
    if len(axes) != 1:
        raise ConversionError(f"{label}: the chunks of {name!r} {list(shape)} divide it along axes {sorted(axes)}; "
                              "streamconv merges chunks divided along one axis, as megatron-core writes them")
    axis = axes.pop()
    ordered = [c for _, c in sorted(chunks, key=lambda item: item[0][axis])]
    if len({c.shape[axis] for c in ordered}) != 1:
        raise ConversionError(f"{label}: the chunks of {name!r} along axis {axis} differ in size "
                              f"({sorted({c.shape[axis] for c in ordered})}); streamconv merges equal slices")
    return Split(tuple(ordered), axis)
