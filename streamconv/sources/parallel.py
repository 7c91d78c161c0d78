"""Models saved in parts: tensor-parallel (TP) slices and pipeline-parallel (PP) stages, merged lazily.

Megatron saves one file per rank, in folders named `mp_rank_XX` (TP only) or `tp_rank_XX_pp_rank_YYY`.
Merging reads nothing: each stage's layers are renumbered after the stages before it, and a tensor sliced
across TP ranks becomes a `Split`, the list of its slices (still views into each rank's file mapping)
with the axis they are concatenated on. The pipeline places each slice where it belongs in the output
tensor, so only one slice's chunk is read at a time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from streamconv.errors import ConversionError, describe, is_whole
from streamconv.sources.records import SourceTensor, Split

# Megatron's tensor parallelism: which axis of a tensor is sliced across TP ranks (name suffix -> axis), in
# the legacy names and in megatron-core's. Column-parallel layers split their output rows, row-parallel ones
# their input columns; the rest (layer norms, position embeddings, row-parallel biases) is replicated.
TP_SPLIT_AXIS = {
    "word_embeddings.weight": 0,  # vocab-parallel
    "output_layer.weight": 0,
    "self_attention.query_key_value.weight": 0,
    "self_attention.query_key_value.bias": 0,
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_qkv.bias": 0,
    "mlp.dense_h_to_4h.weight": 0,
    "mlp.dense_h_to_4h.bias": 0,
    "linear_fc1.weight": 0,  # (a dense MLP's `mlp.linear_fc1`, an expert's `local_experts.E.linear_fc1`, ...)
    "linear_fc1.bias": 0,
    "self_attention.dense.weight": 1,
    "self_attention.linear_proj.weight": 1,
    "mlp.dense_4h_to_h.weight": 1,
    "linear_fc2.weight": 1,
}
TIED_OUTPUT_COPY = "model.word_embeddings.weight"  # the last pipeline stage's copy of the tied embedding (legacy)
_MCORE_OUTPUT = "output_layer.weight"  # megatron-core's: the tied copy on the last stage, or an untied layer
_LAYER_KEY = re.compile(r"(.*\.layers\.)([0-9]+)\.(.*)", re.DOTALL)  # a stage's layers count from 0


def tp_split_axis(name: str) -> int | None:
    """The axis a state_dict tensor is sliced on across tensor-parallel ranks; None if replicated."""
    return next((axis for suffix, axis in TP_SPLIT_AXIS.items() if name.endswith("." + suffix)), None)


RANK_FOLDER = re.compile(r"mp_rank_([0-9]{2,})|tp_rank_([0-9]{2,})_pp_rank_([0-9]{3,})")


# Megatron-LM's folders of expert-parallel ranks (`mp_rank_TT_EEE`, `mp_rank_TT_PPP_EEE`), not read
EXPERT_RANK_FOLDER = re.compile(r"(?:^|.*/)mp_rank_[0-9]{2,}(?:_[0-9]{3,}){1,2}(?:/.*)?", re.DOTALL)


def refuse_expert_ranks(path: str, names: list[str]) -> None:
    """A checkpoint saved rank by rank with expert parallelism is refused by name (its experts are numbered per
    rank, and nothing here renumbers them): not converted without its experts."""
    found = next((n for n in names if EXPERT_RANK_FOLDER.fullmatch(n)), None)
    if found is not None:
        raise ConversionError(f"{path} holds expert-parallel rank folders ({found!r}): streamconv does not read "
                              "rank-by-rank expert-parallel checkpoints yet; save a distributed checkpoint "
                              "(torch_dist), which it reads at any expert-parallel size")


def rank_of(folder: str) -> tuple[int, int] | None:
    """(tp rank, pp rank) of a rank folder's name, None if it is not one."""
    m = RANK_FOLDER.fullmatch(folder)
    if m is None:
        return None
    return (int(m.group(1)), 0) if m.group(1) is not None else (int(m.group(2)), int(m.group(3)))


def rank_name(rank: tuple[int, int], pp: int) -> str:
    return f"mp_rank_{rank[0]:02d}" if pp == 1 else f"tp_rank_{rank[0]:02d}_pp_rank_{rank[1]:03d}"


def merge(path: str, ranks: Mapping[tuple[int, int], Mapping[str, SourceTensor]], hparam: Any,
          has_cfg: bool = True) -> dict[str, Any]:
    """One state_dict, in global names, from every rank's state_dict; `hparam(key)` reads the cfg. Without a
    cfg (`has_cfg` False) an mcore last stage's `output_layer.weight` is kept: it may be untied.

    Raises ConversionError for a missing rank, ranks that disagree on names or shapes, or a cfg whose
    parallel sizes differ from the ranks found.
    """
    tp = 1 + max(t for t, _ in ranks)
    pp = 1 + max(p for _, p in ranks)
    for rank in ((t, p) for p in range(pp) for t in range(tp)):
        if rank not in ranks:
            raise ConversionError(f"{path} lacks rank {rank_name(rank, pp)} (found {len(ranks)} of {tp} x {pp} "
                                  "TP x PP ranks); copy the missing rank's files next to the others")
    for key, found in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)):
        said = hparam(key)
        if said is not None and not is_whole(said):
            raise ConversionError(f"the cfg of {path} says {key} {describe(said)}, not a whole number; fix the cfg")
        if said is not None and said != found:
            raise ConversionError(f"the cfg of {path} says {key} {said} but the files hold {found}; "
                                  "is a rank missing, or the cfg from another run?")

    expert_tp = hparam("expert_tensor_parallel_size")
    if tp > 1 and expert_tp is not None and expert_tp != tp and any(".experts." in key for key in ranks[(0, 0)]):
        raise ConversionError(f"the cfg of {path} says expert_tensor_parallel_size {describe(expert_tp)}, not the "
                              f"{tp} tensor-parallel ranks: streamconv merges experts sliced as the other layers "
                              "are; save the checkpoint as a distributed checkpoint (torch_dist) instead")
    tied = has_cfg and hparam("share_embeddings_and_output_weights", True) is True  # (NeMo's default: tied)
    merged: dict[str, Any] = {}
    first_layer = 0
    for p in range(pp):
        stage = {t: ranks[(t, p)] for t in range(tp)}
        layers = _layer_count(path, stage[0], rank_name((0, p), pp))
        for key in stage[0]:
            if pp > 1 and p == pp - 1 and (key == TIED_OUTPUT_COPY or tied and key.endswith(_MCORE_OUTPUT)):
                continue  # the output layer tied to the word embedding: the stage-0 embedding is the one kept
            name = _global_name(key, first_layer)
            if name in merged:
                continue
            merged[name] = _merge_slices(path, key, [stage[t].get(key) for t in range(tp)], p, pp)
        for t in range(1, tp):
            extra = sorted(set(stage[t]) - set(stage[0]))
            if extra:
                raise ConversionError(f"{path}: rank {rank_name((t, p), pp)} holds {extra[0]!r}, which rank "
                                      f"{rank_name((0, p), pp)} lacks; are the ranks from the same checkpoint?")
        first_layer += layers
    return merged


def _layer_count(path: str, state_dict: Mapping[str, SourceTensor], rank: str) -> int:
    ids = sorted({int(m.group(2)) for m in map(_LAYER_KEY.fullmatch, state_dict) if m is not None})
    if ids != list(range(len(ids))):
        raise ConversionError(f"{path}: rank {rank} holds layers {ids[0]}..{ids[-1]} ({len(ids)} in all), not "
                              "0, 1, 2, ...: every pipeline stage numbers its layers from 0; is the file damaged?")
    return len(ids)


def _global_name(key: str, first_layer: int) -> str:
    m = _LAYER_KEY.fullmatch(key)
    if m is None or first_layer == 0:
        return key
    return f"{m.group(1)}{int(m.group(2)) + first_layer}.{m.group(3)}"


def _merge_slices(path: str, key: str, slices: list[SourceTensor | None], p: int, pp: int) -> Any:
    for t, part in enumerate(slices):
        if part is None:
            raise ConversionError(f"{path}: rank {rank_name((t, p), pp)} lacks {key!r}, which rank "
                                  f"{rank_name((0, p), pp)} holds; are the ranks from the same checkpoint?")
        if part.shape != slices[0].shape or part.dtype != slices[0].dtype:
            raise ConversionError(
                f"{path}: {key!r} is {slices[0].dtype} {slices[0].shape} on rank {rank_name((0, p), pp)} "
                f"but {part.dtype} {part.shape} on rank {rank_name((t, p), pp)}; are the ranks from "
                "the same checkpoint?")
    axis = tp_split_axis(key)
    if len(slices) == 1 or axis is None:
        return slices[0]  # replicated: rank 0's copy
    return Split(tuple(slices), axis)  # type: ignore[arg-type]
