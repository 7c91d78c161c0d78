"""A synthetic Llama-shaped megatron-core distributed checkpoint for the benchmarks (`--profile llama8b`).

Llama 3 8B's shapes (hidden 4096, 32 heads in 8 key/value groups, ffn 14336, vocabulary 128256, an untied
output layer, bf16), two layers, saved as NeMo 1.x saves a megatron-core model: a torch_dist folder written by
torch's own DCP writer from `tp` gloo processes, each handing it its tensor-parallel slices as ShardedTensors
(layers stacked, one chunk per layer and slice; `linear_fc1`'s gate and up halves as separate chunks, as
megatron-core's SwiGLU factory does), and a `common.pt` holding the NeMo cfg. Weights are random normals.

`--profile bridge8b` is the same model as Megatron-Bridge saves it with megatron-core 0.19: no `common.pt`, the
common state (without hyper-parameters) as the bytes item `common_state/shard_0_1`, the architecture and the true
vocabulary in `run_config.yaml`'s `model:` section, so that streamconv converts it with no flag.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from benchmarks.workloads import COMMON_KEYS, DIST_METADATA, _generate_once

BRIDGE_RUN_CONFIG = Path(__file__).resolve().parents[1] / "tests/fixtures/bridge062/tp1/iter_0000000/run_config.yaml"


@dataclass(frozen=True)
class LlamaModel:
    hidden: int = 4096
    heads: int = 32
    groups: int = 8
    ffn: int = 14336
    vocab_size: int = 128256
    n_layer: int = 2
    positions: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def shapes(self) -> dict[str, tuple[tuple[int, ...], int | None]]:
        """megatron-core key (below `model.`) -> (global shape, the axis TP slices, None if replicated)."""
        h, L = self.hidden, self.n_layer
        qkv = (self.heads + 2 * self.groups) * self.head_dim
        layers = "decoder.layers."
        return {
            "embedding.word_embeddings.weight": ((self.vocab_size, h), 0),
            layers + "self_attention.linear_qkv.layer_norm_weight": ((L, h), None),
            layers + "self_attention.linear_qkv.weight": ((L, qkv, h), 1),
            layers + "self_attention.linear_proj.weight": ((L, h, self.heads * self.head_dim), 2),
            layers + "mlp.linear_fc1.layer_norm_weight": ((L, h), None),
            layers + "mlp.linear_fc1.weight": ((L, 2 * self.ffn, h), 1),
            layers + "mlp.linear_fc2.weight": ((L, h, self.ffn), 2),
            "decoder.final_layernorm.weight": ((h,), None),
            "output_layer.weight": ((self.vocab_size, h), 0),
        }

    def weight_bytes(self) -> int:
        return sum(2 * math.prod(shape) for shape, _ in self.shapes().values())

    def cfg(self, tp: int) -> dict:
        return {"mcore_gpt": True, "precision": "bf16", "tensor_model_parallel_size": tp,
                "pipeline_model_parallel_size": 1, "num_layers": self.n_layer, "hidden_size": self.hidden,
                "ffn_hidden_size": self.ffn, "num_attention_heads": self.heads, "num_query_groups": self.groups,
                "encoder_seq_length": self.positions, "max_position_embeddings": self.positions,
                "normalization": "rmsnorm", "activation": "fast-swiglu", "position_embedding_type": "rope",
                "rotary_base": 500000, "bias": False, "share_embeddings_and_output_weights": False,
                "layernorm_epsilon": 1e-5, "make_vocab_size_divisible_by": 128}

    def run_config(self, tp: int) -> str:
        """The run_config.yaml Megatron-Bridge 0.6.2 wrote for the test fixture (its whole ConfigContainer: some 340
        model fields), with this model's sizes."""
        import yaml

        whole = yaml.safe_load(BRIDGE_RUN_CONFIG.read_text())
        whole["model"].update({
            "tensor_model_parallel_size": tp, "num_layers": self.n_layer, "hidden_size": self.hidden,
            "ffn_hidden_size": self.ffn, "num_attention_heads": self.heads, "num_query_groups": self.groups,
            "kv_channels": self.head_dim, "seq_length": self.positions, "vocab_size": self.vocab_size})
        return yaml.safe_dump(whole)


def ensure_llama(cache: Path, model: LlamaModel, tp: int, bridge: bool = False) -> Path:
    """The distributed checkpoint folder `llama8b-L<layers>-tp<tp>.dist` in `cache` (`bridge8b-...` as
    Megatron-Bridge lays it out), written once."""
    need = model.weight_bytes()
    name = "bridge8b" if bridge else "llama8b"
    return _generate_once(cache / f"{name}-L{model.n_layer}-tp{tp}.dist", need, need / tp + tp * 2**30,
                          f"{need / 1e9:.2f} GB, Llama 3 8B shapes, {tp} TP ranks, torch_dist"
                          + (", as Megatron-Bridge saves it" if bridge else ""),
                          lambda partial: _write(partial, model, tp, bridge))


def _write(folder: Path, model: LlamaModel, tp: int, bridge: bool) -> None:
    import torch.multiprocessing as mp

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    rendezvous = folder.with_name(folder.name + ".rendezvous")
    rendezvous.unlink(missing_ok=True)
    try:
        mp.spawn(_write_rank, args=(tp, model, str(folder), str(rendezvous), bridge), nprocs=tp)
    finally:
        rendezvous.unlink(missing_ok=True)


def _chunks(key: str, shape: tuple[int, ...], axis: int | None, rank: int, tp: int, ffn: int
            ) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(offsets, shape) of this rank's chunks of a global tensor: per layer for stacked ones, then its TP slice;
    fc1's gate and up halves apart (gate_r at r x ffn/tp, up_r at ffn + r x ffn/tp)."""
    if axis is None:
        return [] if rank else [((0,) * len(shape), shape)]
    stacked = len(shape) == 3
    layers = range(shape[0]) if stacked else [None]
    out = []
    for layer in layers:
        local = list(shape[1:] if stacked else shape)
        along = axis - 1 if stacked else axis
        if key.endswith("linear_fc1.weight"):
            starts, size = (rank * ffn // tp, ffn + rank * ffn // tp), ffn // tp
        else:
            starts, size = (rank * local[along] // tp,), local[along] // tp
        for start in starts:
            offsets = [0] * len(local)
            offsets[along] = start
            piece = list(local)
            piece[along] = size
            if stacked:
                out.append(((layer, *offsets), (1, *piece)))
            else:
                out.append((tuple(offsets), tuple(piece)))
    return out


def _write_rank(rank: int, tp: int, model: LlamaModel, folder: str, rendezvous: str, bridge: bool) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed._shard.sharded_tensor import Shard, ShardMetadata, init_from_local_shards

    class BytesAsTheyAre(dcp.DefaultSavePlanner):
        """megatron-core's planner writes a bytes item as it is (torch's default would torch.save it again)."""

        def transform_object(self, write_item, object):
            return object

    dist.init_process_group("gloo", init_method=Path(rendezvous).as_uri(), rank=rank, world_size=tp)
    try:
        generator = torch.Generator().manual_seed(rank)
        state = {}
        for key, (shape, axis) in model.shapes().items():
            local = [Shard((torch.randn(piece, generator=generator) * 0.02).to(torch.bfloat16),
                           ShardMetadata(list(offsets), list(piece), f"rank:{rank}/cpu"))
                     for offsets, piece in _chunks(key, shape, axis, rank, tp, model.ffn)]
            state["model." + key] = init_from_local_shards(local, *shape)
        if bridge and rank == 0:  # megatron-core 0.19's ShardedObject: the archive of [common state], rank 0's copy
            common = io.BytesIO()
            torch.save([{"checkpoint_version": 3.0, "iteration": 0, "content_metadata": {}}], common)
            state["common_state/shard_0_1"] = io.BytesIO(common.getvalue())
        dcp.save(state, checkpoint_id=folder, planner=BytesAsTheyAre())
        if rank == 0:
            with open(os.path.join(folder, "metadata.json"), "w") as f:
                json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1} if bridge else
                          DIST_METADATA, f)
            if bridge:
                Path(folder, "run_config.yaml").write_text(model.run_config(tp))
            else:
                torch.save({"hyper_parameters": {"cfg": model.cfg(tp)}, **COMMON_KEYS},
                           os.path.join(folder, "common.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
