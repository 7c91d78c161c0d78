"""A synthetic Nemotron-H checkpoint as Megatron-Bridge saves it, for the benchmarks (`--profile nemotronh`).

Nemotron-H 8B's shapes (hidden 4096; Mamba-2 mixers of 128 heads of head size 64, state 128, 8 groups, a
convolution of kernel 4; attention of 32 heads in 8 key/value groups of head size 128, no positions; squared-ReLU
MLPs of ffn 21504; vocabulary 131072, an untied output layer, bf16), six layers by the pattern `M-M*M-` (Mamba,
MLP, Mamba, attention, Mamba, MLP), laid out as Megatron-Bridge 0.6.2 (megatron-core 0.19) saves a hybrid run
with TP 2 (tests/fixtures/bridge062-hybrid/nemotron_h/tp2/): two gloo processes write through torch's DCP writer,
keys without a prefix, one key per layer (the hybrid stack does not stack its layers); a Mamba mixer's input
projection as its named row blocks `mixer.in_proj.weight.{z,x,B,C,dt}` and its convolution as
`mixer.conv1d.{weight,bias}.{x,B,C}`, each sliced by rows across the ranks, as are `A_log`, `D`, `dt_bias`, the
gated norm, qkv, fc1, the embedding and the output layer; out_proj, linear_proj and fc2 sliced by columns; the
layer norms and the final norm written by rank 0; the local spec's `_extra_state` byte items of each layer's
projections and of the output layer (rank 0's); the common state as the bytes item `common_state/shard_0_1`; the
fixture's run_config.yaml with this model's sizes, in a run folder (`iter_0000000/`), so that streamconv converts it
with no flag. Weights are random normals (`benchmarks.llama`'s writer, which lays out the run folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmarks.llama import SyntheticModel, bridge_run_config, ensure_folder

HYBRID_RUN_CONFIG = (Path(__file__).resolve().parents[1]
                     / "tests/fixtures/bridge062-hybrid/nemotron_h/tp2/iter_0000000/run_config.yaml")
PATTERN = "M-M*M-"


@dataclass(frozen=True)
class NemotronHModel(SyntheticModel):
    hidden: int = 4096
    pattern: str = PATTERN  # a layer per letter: M Mamba, * attention, - MLP
    mamba_heads: int = 128
    mamba_head_dim: int = 64
    state: int = 128
    mamba_groups: int = 8
    conv_kernel: int = 4  # megatron-core's default d_conv; run_config.yaml does not hold it
    heads: int = 32
    groups: int = 8
    head_dim: int = 128  # kv_channels
    ffn: int = 21504
    vocab_size: int = 131072
    positions: int = 8192

    @property
    def n_layer(self) -> int:
        return len(self.pattern)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        h, inner, bc, k = self.hidden, self.mamba_heads * self.mamba_head_dim, self.mamba_groups * self.state, \
            self.conv_kernel
        blocks = {"z": inner, "x": inner, "B": bc, "C": bc, "dt": self.mamba_heads}
        shapes = {"embedding.word_embeddings.weight": ((self.vocab_size, h), "T.")}
        for i, kind in enumerate(self.pattern):
            layer = f"decoder.layers.{i}."
            if kind == "M":
                mixer = layer + "mixer."
                shapes[mixer + "in_proj.layer_norm_weight"] = ((h,), ".")
                shapes.update({f"{mixer}in_proj.weight.{b}": ((rows, h), "T.") for b, rows in blocks.items()})
                for b in "xBC":
                    shapes[f"{mixer}conv1d.weight.{b}"] = ((blocks[b], 1, k), "T..")
                    shapes[f"{mixer}conv1d.bias.{b}"] = ((blocks[b],), "T")
                shapes.update({mixer + name: ((self.mamba_heads,), "T") for name in ("A_log", "D", "dt_bias")})
                shapes[mixer + "norm.weight"] = ((inner,), "T")
                shapes[mixer + "out_proj.weight"] = ((h, inner), ".T")
            elif kind == "*":
                attention = layer + "self_attention."
                shapes[attention + "linear_qkv.layer_norm_weight"] = ((h,), ".")
                shapes[attention + "linear_qkv.weight"] = (((self.heads + 2 * self.groups) * self.head_dim, h), "T.")
                shapes[attention + "linear_proj.weight"] = ((h, self.heads * self.head_dim), ".T")
            elif kind == "-":
                mlp = layer + "mlp."
                shapes[mlp + "linear_fc1.layer_norm_weight"] = ((h,), ".")
                shapes[mlp + "linear_fc1.weight"] = ((self.ffn, h), "T.")  # squared ReLU: no gate half
                shapes[mlp + "linear_fc2.weight"] = ((h, self.ffn), ".T")
            else:
                raise ValueError(f"layer kind {kind!r} of {self.pattern!r}: this writer knows M, * and -")
        shapes["decoder.final_norm.weight"] = ((h,), ".")
        shapes["output_layer.weight"] = ((self.vocab_size, h), "T.")
        return shapes

    def extra_states(self) -> dict[str, tuple[tuple[int, ...], str]]:
        modules = {"M": ("mixer.in_proj", "mixer.out_proj"), "*": ("self_attention.linear_qkv",
                   "self_attention.linear_proj"), "-": ("mlp.linear_fc1", "mlp.linear_fc2")}
        layers = {f"decoder.layers.{i}.{m}": ((1,), ".") for i, kind in enumerate(self.pattern) for m in modules[kind]}
        return {**layers, "output_layer": ((1,), ".")}

    def run_config(self, tp: int) -> str:
        """Bridge's run_config.yaml of the Nemotron-H TP 2 test fixture, with this model's sizes."""
        return bridge_run_config(HYBRID_RUN_CONFIG, {
            "tensor_model_parallel_size": tp, "hybrid_layer_pattern": self.pattern, "num_layers": self.n_layer,
            "hidden_size": self.hidden, "ffn_hidden_size": self.ffn, "num_attention_heads": self.heads,
            "num_query_groups": self.groups, "kv_channels": self.head_dim, "mamba_num_heads": self.mamba_heads,
            "mamba_head_dim": self.mamba_head_dim, "mamba_state_dim": self.state,
            "mamba_num_groups": self.mamba_groups, "seq_length": self.positions, "vocab_size": self.vocab_size})


def pattern_of(layers: int | None) -> str:
    """`layers` letters of the profile's pattern, repeated (`--layers`): None or 6 is `M-M*M-`, 8 `M-M*M-M-`."""
    layers = layers or len(PATTERN)
    return (PATTERN * -(-layers // len(PATTERN)))[:layers]


def ensure_nemotronh(cache: Path, model: NemotronHModel, tp: int = 2) -> Path:
    """The run folder `nemotronh-L<layers>-tp<tp>.run` in `cache`, written once by `tp` tensor-parallel ranks."""
    for what, n in (("Mamba heads", model.mamba_heads), ("Mamba groups", model.mamba_groups),
                    ("attention groups", model.groups), ("ffn", model.ffn), ("vocabulary", model.vocab_size)):
        if n % tp:
            raise ValueError(f"{n} {what} do not divide among {tp} tensor-parallel ranks")
    return ensure_folder(cache / f"nemotronh-L{model.n_layer}-tp{tp}.run", model, tp, True,
                         f"Nemotron-H 8B shapes, pattern {model.pattern}, {tp} TP ranks, torch_dist as "
                         "Megatron-Bridge saves it")
