"""Synthetic checkpoints split into tensor- and pipeline-parallel ranks, as NeMo saves such a model.

`make_parallel` writes the legacy TP/PP rank files (`mp_rank_00/`, `tp_rank_00_pp_rank_000/`) in a `.nemo` or a
folder of Lightning checkpoints, from the same weights `streamconv.demo.make_checkpoint` writes; the benchmarks
generate their TP workload with it and the tests their parallel checkpoints.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Mapping

import torch

from streamconv.demo import (
    PREFIX,
    SyntheticCheckpoint,
    SyntheticModel,
    adam_state,
    lightning_checkpoint,
    nemo_config,
    nemo_precision,
    random_gpt2_state_dict,
    to_nemo_state_dict,
)
from streamconv.sources.parallel import rank_name

# NeMo key suffixes Megatron splits across TP ranks: column-parallel (and the vocab-parallel embedding) on dim 0,
# row-parallel on dim 1. Everything else (layer norms, position embeddings, row-parallel biases) is replicated.
COLUMN_PARALLEL = (
    "self_attention.query_key_value.weight",
    "self_attention.query_key_value.bias",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_h_to_4h.bias",
    "embedding.word_embeddings.weight",
)
ROW_PARALLEL = (
    "self_attention.dense.weight",
    "mlp.dense_4h_to_h.weight",
)
TIED_COPY = "model.word_embeddings.weight"  # the output layer's copy of the word embedding on the last PP stage
_LAYER = re.compile(r"^(model\.language_model\.encoder\.layers\.)(\d+)\.(.+)$")


def parallel_dim(key: str) -> int | None:
    """The dim Megatron splits `key` on across TP ranks, or None when every TP rank holds all of it."""
    if key == TIED_COPY or key.endswith(COLUMN_PARALLEL):
        return 0
    if key.endswith(ROW_PARALLEL):
        return 1
    return None


def split_for_parallel(
    state_dict: Mapping[str, torch.Tensor], tp: int, pp: int, *, tied_copy: bool = True
) -> dict[tuple[int, int], OrderedDict]:
    """(tp_rank, pp_rank) -> that rank's NeMo state_dict: the inverse of Megatron's merge rules.

    `state_dict` is consolidated, as `to_nemo_state_dict` makes it. TP: `COLUMN_PARALLEL` keys are chunked on
    dim 0, `ROW_PARALLEL` on dim 1, the rest replicated; slices are cloned so `torch.save` stores only them. PP:
    the layers are split evenly and renumbered from 0 on each stage; the embeddings live on stage 0, the final
    layer norm on the last, which (with pp > 1 and `tied_copy`) also holds its TP slice of the word embedding
    as `model.word_embeddings.weight`. A `model.word_embeddings.weight` in the input is ignored.
    """
    if tp < 1 or pp < 1:
        raise ValueError(f"tp and pp must be at least 1, got tp={tp}, pp={pp}")
    layers = sorted({int(m.group(2)) for k in state_dict if (m := _LAYER.match(k))})
    if layers != list(range(len(layers))):
        raise ValueError(f"layer indices are not 0..{len(layers) - 1}: {layers}")
    if len(layers) % pp:
        raise ValueError(f"{len(layers)} layers do not split evenly into {pp} pipeline stages")
    per_stage = len(layers) // pp

    ranks: dict[tuple[int, int], OrderedDict] = {(t, p): OrderedDict() for p in range(pp) for t in range(tp)}
    word_embeddings: torch.Tensor | None = None
    for key, tensor in state_dict.items():
        if key == TIED_COPY:
            continue
        if m := _LAYER.match(key):
            i = int(m.group(2))
            stage, local_key = i // per_stage, f"{m.group(1)}{i % per_stage}.{m.group(3)}"
        elif key.startswith(PREFIX + "embedding."):
            stage, local_key = 0, key
        elif key.startswith((PREFIX + "encoder.final_layernorm.", PREFIX + "output_layer.")):
            stage, local_key = pp - 1, key
        else:
            raise ValueError(f"do not know which pipeline stage holds {key!r}")
        if key == PREFIX + "embedding.word_embeddings.weight":
            word_embeddings = tensor
        for t, piece in enumerate(_tp_slices(key, tensor, tp)):
            ranks[t, stage][local_key] = piece
    if pp > 1 and tied_copy:
        if word_embeddings is None:
            raise ValueError(f"no {PREFIX}embedding.word_embeddings.weight to copy to the last stage")
        for t, piece in enumerate(_tp_slices(TIED_COPY, word_embeddings, tp)):
            ranks[t, pp - 1][TIED_COPY] = piece
    return ranks


def _tp_slices(key: str, tensor: torch.Tensor, tp: int) -> list[torch.Tensor]:
    dim = parallel_dim(key)
    if dim is None:
        return [tensor] * tp
    if tensor.shape[dim] % tp:
        hint = " (NeMo pads the vocabulary to make_vocab_size_divisible_by x TP)" if "word_embeddings" in key else ""
        raise ValueError(f"{key}: dim {dim} of {tuple(tensor.shape)} does not split into {tp} TP ranks{hint}")
    return [piece.clone() for piece in torch.chunk(tensor, tp, dim=dim)]


PARALLEL_KINDS = ("nemo", "nemo-gzip", "extracted", "ckpt-folder")
CKPT_NAME = "megatron_gpt--step=100-last.ckpt"


def make_parallel(
    path: str | os.PathLike[str],
    model: SyntheticModel | None = None,
    *,
    tp: int,
    pp: int = 1,
    kind: str = "nemo",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    tokenizer: str | os.PathLike[str] | None = None,
    optimizer: bool = True,
) -> SyntheticCheckpoint:
    """Write `model` split into tp x pp model-parallel ranks, as NeMo saves such a model, and return it with
    the consolidated GPT-2 weights (the same as `make_checkpoint` / `make_nemo` with the same seed).

    The vocabulary is padded to `make_vocab_size_divisible_by` x `tp` (the returned model's
    `tensor_model_parallel_size` is `tp`). Each rank's weights live in `mp_rank_{t:02d}` (pp == 1) or
    `tp_rank_{t:02d}_pp_rank_{p:03d}`. `kind`:

    - "nemo": a tar of `./model_config.yaml`, `./<rank>/model_weights.ckpt` (bare state_dicts) and the
      tokenizer artifact `./<8 hex>_tokenizer.model`; "nemo-gzip": the same gzip-compressed; "extracted": the
      same files in the folder `path`;
    - "ckpt-folder": the folder `path` holding `<rank>/megatron_gpt--step=100-last.ckpt`, each a Lightning
      checkpoint of that rank's weights (with its Adam state when `optimizer`) and the whole model's config.

    `tokenizer`, a SentencePiece model file, becomes the artifact (named by its content's hash), referenced as
    `nemo:<name>`; for "ckpt-folder" the config names the file's absolute path. Without one, the .nemo kinds
    carry `make_nemo`'s placeholder bytes as `4f2a1c9e_tokenizer.model`.
    """
    import dataclasses
    import hashlib
    import shutil
    import tarfile
    import tempfile

    from omegaconf import OmegaConf

    if kind not in PARALLEL_KINDS:
        raise ValueError(f"kind must be one of {PARALLEL_KINDS}, got {kind!r}")
    model = model or SyntheticModel()
    if model.tensor_model_parallel_size != tp:
        model = dataclasses.replace(model, tensor_model_parallel_size=tp)
    if model.n_head % tp:
        raise ValueError(f"{model.n_head} attention heads do not split into {tp} TP ranks")
    path = os.fspath(path)
    hf = random_gpt2_state_dict(model, dtype, seed)
    ranks = split_for_parallel(to_nemo_state_dict(hf, model, seed + 1), tp, pp)

    if tokenizer is None:
        artifact, content = "4f2a1c9e_tokenizer.model", bytes(range(256)) * 16  # stands in for a SentencePiece model
    else:
        with open(tokenizer, "rb") as f:
            content = f.read()
        artifact = f"{hashlib.sha256(content).hexdigest()[:8]}_tokenizer.model"
    if kind == "ckpt-folder":
        tokenizer_model = "nemo:" + artifact if tokenizer is None else os.path.abspath(tokenizer)
    else:
        tokenizer_model = "nemo:" + artifact
    config = nemo_config(model, nemo_precision(dtype), pipeline_model_parallel_size=pp, tokenizer_model=tokenizer_model)

    if kind == "ckpt-folder":
        for (t, p), weights in ranks.items():
            folder = os.path.join(path, rank_name((t, p), pp))
            os.makedirs(folder, exist_ok=True)
            states = [adam_state(weights)] if optimizer else []
            torch.save(lightning_checkpoint(weights, config, states), os.path.join(folder, CKPT_NAME))
        return SyntheticCheckpoint(path, model, hf)

    def fill(folder: str) -> None:
        with open(os.path.join(folder, "model_config.yaml"), "w") as f:
            f.write(OmegaConf.to_yaml(config["cfg"]))
        with open(os.path.join(folder, artifact), "wb") as f:
            f.write(content)
        for (t, p), weights in ranks.items():
            os.makedirs(os.path.join(folder, rank_name((t, p), pp)), exist_ok=True)
            torch.save(weights, os.path.join(folder, rank_name((t, p), pp), "model_weights.ckpt"))

    if kind == "extracted":
        os.makedirs(path, exist_ok=True)
        fill(path)
    else:
        folder = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(path)))
        try:
            fill(folder)
            with tarfile.open(path, "w:gz" if kind == "nemo-gzip" else "w:") as tar:
                tar.add(folder, arcname=".")
        finally:
            shutil.rmtree(folder)
    return SyntheticCheckpoint(path, model, hf)

