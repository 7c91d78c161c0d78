"""A synthetic Llama-shaped megatron-core distributed checkpoint for the benchmarks (`--profile llama8b`).

Llama 3 8B's shapes (hidden 4096, 32 heads in 8 key/value groups, ffn 14336, vocabulary 128256, an untied
output layer, bf16), two layers, saved as NeMo 1.x saves a megatron-core model: a torch_dist folder written by
torch's own DCP writer from `tp` gloo processes, each handing it its tensor-parallel slices as ShardedTensors
(layers stacked, one chunk per layer and slice; `linear_fc1`'s gate and up halves as separate chunks, as
megatron-core's SwiGLU factory does), and a `common.pt` holding the NeMo cfg. Weights are random normals.

`--profile bridge8b` is the same model as Megatron-Bridge 0.6.2 saves it with megatron-core 0.19 (the layout of
tests/fixtures/bridge062/tp2/), so that Bridge's own loader reads it and streamconv converts it with no flag: a run
folder (`latest_checkpointed_iteration.txt` "0", `latest_train_state.pt`, `iter_0000000/`), keys without a prefix,
the local layer spec's `*._extra_state/shard_<layer>_<layers>` byte items (`[None]`, rank 0's), no `common.pt` but
the common state (without hyper-parameters) as the bytes item `common_state/shard_0_1`, the architecture and the
true vocabulary in `run_config.yaml`'s `model:` section, Bridge's `train_state.pt` of step 0. No tokenizer assets
(Bridge writes them only when handed a tokenizer; a small one would not match the vocabulary).
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from benchmarks.workloads import COMMON_KEYS, DIST_METADATA, _generate_once

FIXTURES = Path(__file__).resolve().parents[1] / "tests/fixtures"
BRIDGE_RUN_CONFIG = FIXTURES / "bridge062/tp1/iter_0000000/run_config.yaml"
BRIDGE_HF = FIXTURES / "bridge062/hf"  # the Hugging Face model Bridge imported: config.json and a small tokenizer
# Bridge's train state at step 0 (torch.save of its counters as tensors), the same bytes in every run folder it saves
BRIDGE_TRAIN_STATE = FIXTURES / "bridge062/tp1/iter_0000000/train_state.pt"
ITERATION = "iter_0000000"  # where a Bridge run folder (save_megatron_model, step 0) keeps the checkpoint
# what Bridge 0.6.2's save records of its sharded state dict (the fixture's common_state)
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
NEMO_PREFIX = "model."  # NeMo 1.x keeps megatron-core's GPTModel under `model.`; Bridge saves the keys as they are
# How a rank cuts a global tensor into the chunks it hands the writer, one letter per axis (`_chunks`):
#   L  one chunk per index, on every rank (the stacked layers)
#   E  one chunk per index of this rank's share (an expert-parallel rank's experts)
#   T  this rank's share, one chunk (a tensor-parallel slice)
#   G  the two halves, this rank's share of each (fc1's gate and up halves, as megatron-core's SwiGLU slices them)
#   H  the two halves, whole (an expert's fc1, which expert parallelism does not slice)
#   .  whole
# A tensor whose layout has no E, T or G is the same on every rank, and rank 0 alone writes it.
SHARED = frozenset("ETG")


class SyntheticModel:
    """What the writer needs of a model: its tensors (`shapes`), the modules whose extra state a Megatron-Bridge
    run folder holds (`extra_states`), that folder's `run_config.yaml` (`run_config`), the NeMo cfg of a
    `common.pt` (`cfg`), and the Hugging Face reference Bridge's export needs (`HF_FIXTURE`, `hf_config`)."""

    HF_FIXTURE: ClassVar[Path | None] = None  # a test fixture's Hugging Face folder of this family

    def shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """megatron-core key -> (global shape, layout: how ranks cut it, see `_chunks`)."""
        raise NotImplementedError

    def extra_states(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Module -> (counts, layout) of its `_extra_state` byte items in a Bridge run folder: one item per index
        the layout gives a rank (`_chunks`; stacked layers "L", a rank's experts "E", one item "."), named
        `<module>._extra_state/shard_<indices>_<counts>` (joined by dots), as megatron-core's local spec saves them."""
        return {}

    def hf_config(self) -> dict:
        """The fields of `HF_FIXTURE`'s config.json that carry this model's sizes."""
        raise NotImplementedError

    def weight_bytes(self) -> int:
        return sum(2 * math.prod(shape) for shape, _ in self.shapes().values())

    def cfg(self, ranks: int) -> dict:
        raise NotImplementedError

    def run_config(self, ranks: int) -> str:
        raise NotImplementedError


def bridge_run_config(fixture: Path, sizes: dict) -> str:
    """The run_config.yaml Megatron-Bridge 0.6.2 wrote for a test fixture (its whole ConfigContainer: some 340 model
    fields), with `sizes` in its `model:` section."""
    import yaml

    whole = yaml.safe_load(fixture.read_text())
    whole["model"].update(sizes)
    return yaml.safe_dump(whole)


@dataclass(frozen=True)
class LlamaModel(SyntheticModel):
    hidden: int = 4096
    heads: int = 32
    groups: int = 8
    ffn: int = 14336
    vocab_size: int = 128256
    n_layer: int = 2
    positions: int = 8192

    HF_FIXTURE = BRIDGE_HF

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        h, L = self.hidden, self.n_layer
        qkv = (self.heads + 2 * self.groups) * self.head_dim
        layers = "decoder.layers."
        return {
            "embedding.word_embeddings.weight": ((self.vocab_size, h), "T."),
            layers + "self_attention.linear_qkv.layer_norm_weight": ((L, h), "L."),
            layers + "self_attention.linear_qkv.weight": ((L, qkv, h), "LT."),
            layers + "self_attention.linear_proj.weight": ((L, h, self.heads * self.head_dim), "L.T"),
            layers + "mlp.linear_fc1.layer_norm_weight": ((L, h), "L."),
            layers + "mlp.linear_fc1.weight": ((L, 2 * self.ffn, h), "LG."),
            layers + "mlp.linear_fc2.weight": ((L, h, self.ffn), "L.T"),
            "decoder.final_layernorm.weight": ((h,), "."),
            "output_layer.weight": ((self.vocab_size, h), "T."),
        }

    def cfg(self, tp: int) -> dict:
        return {"mcore_gpt": True, "precision": "bf16", "tensor_model_parallel_size": tp,
                "pipeline_model_parallel_size": 1, "num_layers": self.n_layer, "hidden_size": self.hidden,
                "ffn_hidden_size": self.ffn, "num_attention_heads": self.heads, "num_query_groups": self.groups,
                "encoder_seq_length": self.positions, "max_position_embeddings": self.positions,
                "normalization": "rmsnorm", "activation": "fast-swiglu", "position_embedding_type": "rope",
                "rotary_base": 500000, "bias": False, "share_embeddings_and_output_weights": False,
                "layernorm_epsilon": 1e-5, "make_vocab_size_divisible_by": 128}

    def extra_states(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {f"decoder.layers.{m}": ((self.n_layer,), "L") for m in
                ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")}

    def hf_config(self) -> dict:
        return {"hidden_size": self.hidden, "num_attention_heads": self.heads, "num_key_value_heads": self.groups,
                "head_dim": self.head_dim, "intermediate_size": self.ffn, "num_hidden_layers": self.n_layer,
                "vocab_size": self.vocab_size, "max_position_embeddings": self.positions}

    def run_config(self, tp: int) -> str:
        """Bridge's run_config.yaml of the Llama test fixture, with this model's sizes."""
        return bridge_run_config(BRIDGE_RUN_CONFIG, {
            "tensor_model_parallel_size": tp, "num_layers": self.n_layer, "hidden_size": self.hidden,
            "ffn_hidden_size": self.ffn, "num_attention_heads": self.heads, "num_query_groups": self.groups,
            "kv_channels": self.head_dim, "seq_length": self.positions, "vocab_size": self.vocab_size})


def ensure_llama(cache: Path, model: LlamaModel, tp: int, bridge: bool = False) -> Path:
    """The distributed checkpoint folder `llama8b-L<layers>-tp<tp>.dist` in `cache`, or the run folder
    `bridge8b-L<layers>-tp<tp>.run` as Megatron-Bridge lays it out, written once."""
    path = cache / (f"bridge8b-L{model.n_layer}-tp{tp}.run" if bridge else f"llama8b-L{model.n_layer}-tp{tp}.dist")
    return ensure_folder(path, model, tp, bridge, f"Llama 3 8B shapes, {tp} TP ranks, torch_dist"
                         + (", as Megatron-Bridge saves it" if bridge else ""))


def ensure_hf_reference(path: Path, model: SyntheticModel) -> Path:
    """`path`: the Hugging Face reference folder Megatron-Bridge's export needs beside a checkpoint (its
    `from_auto_config` reads the architecture from config.json, and the export saves a tokenizer it loads from
    there), written once: the family's test fixture config.json with this model's sizes, and its small
    tokenizer."""
    def write(folder: Path) -> None:
        config = json.loads((model.HF_FIXTURE / "config.json").read_text())
        sizes = model.hf_config()
        unknown = [k for k in sizes if k not in config]
        if unknown:
            raise ValueError(f"{model.HF_FIXTURE}/config.json has no {', '.join(unknown)}")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({**config, **sizes}, indent=2) + "\n")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(model.HF_FIXTURE / name, folder / name)

    if model.HF_FIXTURE is None:
        raise ValueError(f"{type(model).__name__} has no Hugging Face fixture to make a reference from")
    return _generate_once(path, 2**20, 0, "the Hugging Face reference of Megatron-Bridge's export", write)


def ensure_folder(path: Path, model: SyntheticModel, ranks: int, bridge: bool, what: str) -> Path:
    """`path`, the distributed checkpoint folder of `model` written by `ranks` processes (see `_write_rank`),
    generated once."""
    need = model.weight_bytes()
    return _generate_once(path, need, need / ranks + ranks * 2**30, f"{need / 1e9:.2f} GB, {what}",
                          lambda partial: _write(partial, model, ranks, bridge))


def _write(folder: Path, model: SyntheticModel, ranks: int, bridge: bool) -> None:
    """The checkpoint into `folder` (a Bridge run folder: into its iteration folder, then the run's files)."""
    import torch.multiprocessing as mp

    if folder.exists():
        shutil.rmtree(folder)
    weights = folder / ITERATION if bridge else folder
    weights.mkdir(parents=True)
    rendezvous = folder.with_name(folder.name + ".rendezvous")
    rendezvous.unlink(missing_ok=True)
    try:
        mp.spawn(_write_rank, args=(ranks, model, str(weights), str(rendezvous), bridge), nprocs=ranks)
    finally:
        rendezvous.unlink(missing_ok=True)
    if bridge:  # what Bridge's save_checkpoint adds at step 0 (its train state, and which iteration is the latest)
        shutil.copyfile(BRIDGE_TRAIN_STATE, weights / "train_state.pt")
        shutil.copyfile(BRIDGE_TRAIN_STATE, folder / "latest_train_state.pt")
        (folder / "latest_checkpointed_iteration.txt").write_text(str(int(ITERATION.removeprefix("iter_"))))


def _chunks(shape: tuple[int, ...], layout: str, rank: int, ranks: int
            ) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(offsets, shape) of this rank's chunks of a global tensor laid out as `layout` says (a letter per axis,
    see SHARED): every combination of the axes' pieces, the first axis outermost."""
    if rank and not SHARED & set(layout):
        return []
    pieces = [_pieces(size, kind, rank, ranks) for size, kind in zip(shape, layout, strict=True)]
    return [(tuple(start for start, _ in combo), tuple(n for _, n in combo)) for combo in itertools.product(*pieces)]


def _pieces(size: int, kind: str, rank: int, ranks: int) -> list[tuple[int, int]]:
    """(start, size) of this rank's pieces of an axis of `size` cut as the letter `kind` says (see SHARED)."""
    share, half = size // ranks, size // 2
    if kind == "L":
        return [(i, 1) for i in range(size)]
    if kind == "E":
        return [(i, 1) for i in range(rank * share, (rank + 1) * share)]
    if kind == "T":
        return [(rank * share, share)]
    if kind == "G":
        return [(start + rank * half // ranks, half // ranks) for start in (0, half)]
    if kind == "H":
        return [(0, half), (half, half)]
    assert kind == ".", kind
    return [(0, size)]


def _extra_state_items(model: SyntheticModel, rank: int, ranks: int) -> dict[str, bytes]:
    """This rank's `_extra_state` byte items (see `SyntheticModel.extra_states`): each `torch.save([None])`, what
    megatron-core's local spec saves for a module without extra state."""
    import torch

    empty = io.BytesIO()
    torch.save([None], empty)
    return {f"{module}._extra_state/shard_{'.'.join(map(str, offsets))}_{'.'.join(map(str, counts))}":
            empty.getvalue()
            for module, (counts, layout) in model.extra_states().items()
            for offsets, _ in _chunks(counts, layout, rank, ranks)}


def _write_rank(rank: int, ranks: int, model: SyntheticModel, folder: str, rendezvous: str, bridge: bool) -> None:
    """One of `ranks` gloo processes: its chunks of every tensor (random normals), as ShardedTensors, through
    torch's DCP writer; `bridge`: keys as they are, with the extra-state byte items, and rank 0 writes the common
    state as a bytes item and run_config.yaml; else keys under `model.`, and rank 0 writes common.pt."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed._shard.sharded_tensor import Shard, ShardMetadata, init_from_local_shards

    class BytesAsTheyAre(dcp.DefaultSavePlanner):
        """megatron-core's planner writes a bytes item as it is (torch's default would torch.save it again)."""

        def transform_object(self, write_item, object):
            return object

    dist.init_process_group("gloo", init_method=Path(rendezvous).as_uri(), rank=rank, world_size=ranks)
    try:
        generator = torch.Generator().manual_seed(rank)
        state = {}
        for key, (shape, layout) in model.shapes().items():
            local = [Shard((torch.randn(piece, generator=generator) * 0.02).to(torch.bfloat16),
                           ShardMetadata(list(offsets), list(piece), f"rank:{rank}/cpu"))
                     for offsets, piece in _chunks(shape, layout, rank, ranks)]
            state[("" if bridge else NEMO_PREFIX) + key] = init_from_local_shards(local, *shape)
        if bridge:
            state.update({k: io.BytesIO(v) for k, v in _extra_state_items(model, rank, ranks).items()})
        if bridge and rank == 0:  # megatron-core 0.19's ShardedObject: the archive of [common state], rank 0's copy
            common = io.BytesIO()
            torch.save([{"checkpoint_version": 3.0, "iteration": 0, "content_metadata": CONTENT_METADATA}], common)
            state["common_state/shard_0_1"] = io.BytesIO(common.getvalue())
        dcp.save(state, checkpoint_id=folder, planner=BytesAsTheyAre())
        if rank == 0:
            with open(os.path.join(folder, "metadata.json"), "w") as f:
                json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1} if bridge else
                          DIST_METADATA, f)
            if bridge:
                Path(folder, "run_config.yaml").write_text(model.run_config(ranks))
            else:
                torch.save({"hyper_parameters": {"cfg": model.cfg(ranks)}, **COMMON_KEYS},
                           os.path.join(folder, "common.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
