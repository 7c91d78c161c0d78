"""Synthetic NeMo-Megatron GPT-SW3 checkpoints, shaped like the real thing, for tests, the demo and benchmarks.

A seeded random GPT-2 state dict is mapped backwards into NeMo's layout (the inverse of the recipe,
written independently of it) and saved as PyTorch Lightning does: top-level training keys, OmegaConf
`DictConfig` hyper-parameters with unresolved interpolations, fp32 Adam state beside the weights, and
vocabulary rows padded to a multiple of `make_vocab_size_divisible_by`.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from streamconv.sources.parallel import rank_name

PREFIX = "model.language_model."


@dataclass
class SyntheticModel:
    """A GPT-SW3-shaped model; defaults are tiny. `n_inner` defaults to 4 x `n_embd` as in GPT-SW3.

    `tensor_model_parallel_size` is the TP degree the model was trained with: NeMo pads the vocabulary to a
    multiple of `make_vocab_size_divisible_by` x TP so the embedding splits evenly across TP ranks.
    """

    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_inner: int | None = None
    vocab_size: int = 64000
    n_positions: int = 128
    make_vocab_size_divisible_by: int = 128
    tensor_model_parallel_size: int = 1

    @property
    def ffn(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def padded_vocab(self) -> int:
        m = self.make_vocab_size_divisible_by * self.tensor_model_parallel_size
        return -(-self.vocab_size // m) * m


@dataclass
class SyntheticCheckpoint:
    path: str
    model: SyntheticModel
    hf_state_dict: dict[str, torch.Tensor] = field(repr=False)  # the GPT-2 weights the checkpoint encodes

    def gpt2_config(self):
        """The GPT2Config of the source model, for building it in transformers as an oracle."""
        from transformers import GPT2Config

        m = self.model
        return GPT2Config(
            vocab_size=m.vocab_size, n_positions=m.n_positions, n_embd=m.n_embd, n_layer=m.n_layer,
            n_head=m.n_head, n_inner=m.ffn, activation_function="gelu", layer_norm_epsilon=1e-5,
            tie_word_embeddings=True,
        )


def random_gpt2_state_dict(model: SyntheticModel, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """GPT-2 (Conv1D layout) weights: normal(0, 0.02) matrices, layer-norm weights near 1, small biases."""
    sd: dict[str, torch.Tensor] = {}
    for group in random_gpt2_groups(model, dtype, seed):
        sd.update(group)
    return sd


def random_gpt2_groups(model: SyntheticModel, dtype: torch.dtype, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """The same weights as `random_gpt2_state_dict`, drawn in the same order, one group at a time
    (embeddings, each layer, the final norm), so a large model never needs two copies in memory."""
    gen = torch.Generator().manual_seed(seed)
    h, f = model.n_embd, model.ffn

    def normal(*shape: int, mean: float = 0.0, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std + mean).to(dtype)

    yield {
        "transformer.wte.weight": normal(model.vocab_size, h),
        "transformer.wpe.weight": normal(model.n_positions, h, std=0.01),
    }
    for i in range(model.n_layer):
        p = f"transformer.h.{i}."
        yield {
            p + "ln_1.weight": normal(h, mean=1.0, std=0.1),
            p + "ln_1.bias": normal(h),
            p + "attn.c_attn.weight": normal(h, 3 * h),
            p + "attn.c_attn.bias": normal(3 * h),
            p + "attn.c_proj.weight": normal(h, h),
            p + "attn.c_proj.bias": normal(h),
            p + "ln_2.weight": normal(h, mean=1.0, std=0.1),
            p + "ln_2.bias": normal(h),
            p + "mlp.c_fc.weight": normal(h, f),
            p + "mlp.c_fc.bias": normal(f),
            p + "mlp.c_proj.weight": normal(f, h),
            p + "mlp.c_proj.bias": normal(h),
        }
    yield {
        "transformer.ln_f.weight": normal(h, mean=1.0, std=0.1),
        "transformer.ln_f.bias": normal(h),
    }


def to_nemo_state_dict(sd: dict[str, torch.Tensor], model: SyntheticModel, seed: int = 1) -> OrderedDict:
    """GPT-2 layout -> NeMo-Megatron layout: un-transpose, regroup QKV rows as (heads, 3, head_dim), pad vocab."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    out.update(_nemo_embeddings(sd, model, seed))
    for i in range(model.n_layer):
        out.update(_nemo_layer(sd, model, i))
    out.update(_nemo_final(sd))
    return out


def _nemo_embeddings(sd: dict[str, torch.Tensor], model: SyntheticModel, seed: int) -> dict[str, torch.Tensor]:
    wte = sd["transformer.wte.weight"]
    padding = torch.randn(model.padded_vocab - model.vocab_size, model.n_embd,
                          generator=torch.Generator().manual_seed(seed)).to(wte.dtype)
    return {
        PREFIX + "embedding.word_embeddings.weight": torch.cat([wte, padding]),
        PREFIX + "embedding.position_embeddings.weight": sd["transformer.wpe.weight"].clone(),
    }


def _nemo_layer(sd: dict[str, torch.Tensor], model: SyntheticModel, i: int) -> dict[str, torch.Tensor]:
    h, heads = model.n_embd, model.n_head
    hd = h // heads
    src, dst = f"transformer.h.{i}.", f"{PREFIX}encoder.layers.{i}."
    qkv_w = sd[src + "attn.c_attn.weight"].t()  # [3h, h], rows (3, heads, hd)
    qkv_b = sd[src + "attn.c_attn.bias"]
    return {
        dst + "input_layernorm.weight": sd[src + "ln_1.weight"].clone(),
        dst + "input_layernorm.bias": sd[src + "ln_1.bias"].clone(),
        dst + "self_attention.query_key_value.weight": (
            qkv_w.reshape(3, heads, hd, h).transpose(0, 1).reshape(3 * h, h).clone()
        ),
        dst + "self_attention.query_key_value.bias": (
            qkv_b.reshape(3, heads, hd).transpose(0, 1).reshape(3 * h).clone()
        ),
        dst + "self_attention.dense.weight": sd[src + "attn.c_proj.weight"].t().contiguous(),
        dst + "self_attention.dense.bias": sd[src + "attn.c_proj.bias"].clone(),
        dst + "post_attention_layernorm.weight": sd[src + "ln_2.weight"].clone(),
        dst + "post_attention_layernorm.bias": sd[src + "ln_2.bias"].clone(),
        dst + "mlp.dense_h_to_4h.weight": sd[src + "mlp.c_fc.weight"].t().contiguous(),
        dst + "mlp.dense_h_to_4h.bias": sd[src + "mlp.c_fc.bias"].clone(),
        dst + "mlp.dense_4h_to_h.weight": sd[src + "mlp.c_proj.weight"].t().contiguous(),
        dst + "mlp.dense_4h_to_h.bias": sd[src + "mlp.c_proj.bias"].clone(),
    }


def _nemo_final(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        PREFIX + "encoder.final_layernorm.weight": sd["transformer.ln_f.weight"].clone(),
        PREFIX + "encoder.final_layernorm.bias": sd["transformer.ln_f.bias"].clone(),
    }


def nemo_weight_bytes(model: SyntheticModel, itemsize: int = 2) -> int:
    """Bytes of the checkpoint's `state_dict` (vocabulary padded), without building it: benchmarks divide by it."""
    h, f = model.n_embd, model.ffn
    layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (f * h + f) + (h * f + h)
    return itemsize * (model.padded_vocab * h + model.n_positions * h + model.n_layer * layer + 2 * h)


def nemo_config(
    model: SyntheticModel,
    precision: str | int,
    *,
    pipeline_model_parallel_size: int = 1,
    tokenizer_model: str = "nemo:4f2a1c9e_tokenizer.model",
):
    """`hyper_parameters` as NeMo saves it: one DictConfig({'cfg': ...}) with interpolations unresolved.

    The TP degree is the model's `tensor_model_parallel_size` (it also sets the vocabulary padding)."""
    from omegaconf import OmegaConf

    cfg = {
        "precision": precision,
        "micro_batch_size": 4,
        "global_batch_size": 256,
        "tensor_model_parallel_size": model.tensor_model_parallel_size,
        "pipeline_model_parallel_size": pipeline_model_parallel_size,
        "encoder_seq_length": model.n_positions,
        "max_position_embeddings": "${.encoder_seq_length}",
        "num_layers": model.n_layer,
        "hidden_size": model.n_embd,
        "ffn_hidden_size": model.ffn,
        "num_attention_heads": model.n_head,
        "init_method_std": 0.02,
        "hidden_dropout": 0.1,
        "kv_channels": None,
        "apply_query_key_layer_scaling": True,
        "layernorm_epsilon": 1e-5,
        "make_vocab_size_divisible_by": model.make_vocab_size_divisible_by,
        "pre_process": True,
        "post_process": True,
        "share_embeddings_and_output_weights": True,
        "position_embedding_type": "learned_absolute",
        "activation": "gelu",
        "normalization": "layernorm",
        "transformer_block_type": "pre_ln",
        "tokenizer": {"library": "sentencepiece", "type": None,
                      "model": tokenizer_model, "vocab_file": None, "merge_file": None},
        "optim": {"name": "fused_adam", "lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.1,
                  "sched": {"name": "CosineAnnealing", "warmup_steps": 100, "min_lr": "${multiply:${..lr},0.1}"}},
    }
    return OmegaConf.create({"cfg": cfg})


def adam_state(weights: OrderedDict, zeros_file: str | None = None) -> dict:
    """fp32 Adam moments plus fp32 master weights, as NeMo's mixed-precision optimizer wrapper saves them.

    With `zeros_file` (a sparse file at least as large as the largest fp32 parameter) every optimizer tensor
    is a private mapping of it, all zeros: the saved file has the real layout and size, but building it costs
    page cache instead of six bytes of RAM per parameter (a 2.6 GB bf16 model carries 16 GB of such state).
    """
    params = list(weights.values())

    def fp32(p: torch.Tensor, fill: float) -> torch.Tensor:
        if zeros_file is None:
            return torch.full(p.shape, fill) if fill else torch.zeros(p.shape)
        return torch.from_file(zeros_file, shared=False, size=p.numel(), dtype=torch.float32).view(p.shape)

    return {
        "optimizer": {
            "state": {
                i: {"exp_avg": fp32(p, 0.0), "exp_avg_sq": fp32(p, 1e-8), "step": torch.tensor(100.0)}
                for i, p in enumerate(params)
            },
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1,
                              "params": list(range(len(params)))}],
        },
        "fp32_from_fp16_params": [[p.float() if zeros_file is None else fp32(p, 0.0) for p in params]],
    }


def make_checkpoint(
    path: str | os.PathLike[str],
    model: SyntheticModel | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    optimizer: bool = True,
    seed: int = 0,
    keep_hf: bool = True,
) -> SyntheticCheckpoint:
    """Write a NeMo-style Lightning `.ckpt` for `model` and return it with the GPT-2 weights it encodes.

    `keep_hf=False` is the memory-lean path for benchmark-sized models: the same weights are built one layer
    at a time without keeping the GPT-2 copy (the result's `hf_state_dict` is empty), and optimizer state is
    zeros mapped from a sparse scratch file, so RAM holds the NeMo weights once plus one layer.
    """
    model = model or SyntheticModel()
    zeros_file = None
    if keep_hf:
        hf = random_gpt2_state_dict(model, dtype, seed)
        weights = to_nemo_state_dict(hf, model, seed + 1)
    else:
        hf = {}
        weights = OrderedDict()
        for i, group in enumerate(random_gpt2_groups(model, dtype, seed)):
            if i == 0:
                weights.update(_nemo_embeddings(group, model, seed + 1))
            elif i <= model.n_layer:
                weights.update(_nemo_layer(group, model, i - 1))
            else:
                weights.update(_nemo_final(group))
            del group
        if optimizer:
            zeros_file = f"{os.fspath(path)}.zeros"
            with open(zeros_file, "wb") as f:
                f.truncate(4 * max(p.numel() for p in weights.values()))
    checkpoint = lightning_checkpoint(
        weights, nemo_config(model, _precision(dtype)), [adam_state(weights, zeros_file)] if optimizer else []
    )
    try:
        torch.save(checkpoint, path)
    finally:
        if zeros_file is not None:
            os.remove(zeros_file)
    return SyntheticCheckpoint(os.fspath(path), model, hf)


def _precision(dtype: torch.dtype) -> str | int:
    return {torch.bfloat16: "bf16", torch.float16: 16, torch.float32: 32}[dtype]


def lightning_checkpoint(weights: Mapping[str, torch.Tensor], hyper_parameters, optimizer_states: list) -> dict:
    """The dict PyTorch Lightning saves for a NeMo model: training keys around `state_dict` and the config."""
    from omegaconf import DictConfig

    return {
        "epoch": 0,
        "global_step": 100,
        "pytorch-lightning_version": "1.9.5",
        "state_dict": weights,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 1, "completed": 0}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
            "best_model_score": torch.tensor(2.42), "best_model_path": "", "kth_best_model_path": ""}},
        "optimizer_states": optimizer_states,
        "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 100, "_step_count": 101}],
        "NativeMixedPrecisionPlugin": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                       "growth_interval": 1000, "_growth_tracker": 0},
        "hparams_name": "cfg",
        "hyper_parameters": hyper_parameters,
        "hparams_type": DictConfig,
    }


def make_nemo(
    path: str | os.PathLike[str],
    model: SyntheticModel | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    gzip: bool = False,
    extracted: bool = False,
    seed: int = 0,
) -> SyntheticCheckpoint:
    """Write a `.nemo` as NeMo's `save_to` does: a tar of `./model_config.yaml`, `./model_weights.ckpt` (the
    bare state_dict) and a tokenizer artifact, members in sorted order; gzip-compressed as before NeMo 1.7
    with `gzip`, or the extracted folder itself with `extracted`. The weights equal `make_checkpoint`'s."""
    import tarfile
    import tempfile

    from omegaconf import OmegaConf

    model = model or SyntheticModel()
    path = os.fspath(path)
    hf = random_gpt2_state_dict(model, dtype, seed)
    weights = to_nemo_state_dict(hf, model, seed + 1)
    precision = {torch.bfloat16: "bf16", torch.float16: 16, torch.float32: 32}[dtype]
    cfg = nemo_config(model, precision)["cfg"]

    def fill(folder: str) -> None:
        with open(os.path.join(folder, "model_config.yaml"), "w") as f:
            f.write(OmegaConf.to_yaml(cfg))
        torch.save(weights, os.path.join(folder, "model_weights.ckpt"))
        with open(os.path.join(folder, "4f2a1c9e_tokenizer.model"), "wb") as f:
            f.write(bytes(range(256)) * 16)  # stands in for a SentencePiece model

    if extracted:
        os.makedirs(path, exist_ok=True)
        fill(path)
    else:
        with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as folder:
            fill(folder)
            with tarfile.open(path, "w:gz" if gzip else "w:") as tar:
                tar.add(folder, arcname=".")
    return SyntheticCheckpoint(path, model, hf)


# Runs a command, samples the resident memory of its process tree every INTERVAL seconds (psutil: RSS, and
# RSS minus file-backed and shared pages, i.e. RssAnon) and prints one JSON line: wall seconds, ru_maxrss,
# the samples, the exit code. Linux starts a child's ru_maxrss at its parent's RSS at fork (the hiwater mark
# survives exec), so measuring from a large parent (pytest holding test models, a benchmark that built a
# checkpoint) would report the parent. This launcher is a small Python with no torch: the command's own
# peak dominates.
_LAUNCHER = """import json, resource, subprocess, sys, threading, time
interval, command = float(sys.argv[1]), sys.argv[2:]
samples, done = [], threading.Event()
start = time.perf_counter()
proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
import psutil  # after the fork: the child's ru_maxrss starts at this process's RSS
def sample():
    root = psutil.Process(proc.pid)
    while not done.is_set():
        rss = anon = 0
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                m = p.memory_info()
            except psutil.Error:
                continue
            rss, anon = rss + m.rss, anon + m.rss - m.shared
        samples.append((round(time.perf_counter() - start, 4), rss, anon))
        done.wait(interval)
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
code = proc.wait()
wall = time.perf_counter() - start
done.set()
sampler.join()
maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"wall": wall, "peak_rss": maxrss, "returncode": code, "timeline": samples}))
"""


@dataclass
class Measurement:
    """One child process's run: wall seconds, peak RSS (ru_maxrss), peak sampled RssAnon and the samples."""

    wall: float
    peak_rss: int
    peak_anon: int
    timeline: list[tuple[float, int, int]]  # (seconds since start, RSS bytes, anonymous RSS bytes)
    returncode: int
    stderr: str


def measure(command: list[str], interval: float = 0.05, check: bool = True) -> Measurement:
    """Run `command` (stdout discarded) through the launcher above; raise if it fails and `check`."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, str(interval), *map(str, command)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"launcher for {command} exited with {proc.returncode}: {proc.stderr.strip()}")
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    if check and record["returncode"] != 0:
        raise RuntimeError(f"{command} exited with {record['returncode']}: {proc.stderr.strip()}")
    timeline = [tuple(s) for s in record["timeline"]]
    return Measurement(record["wall"], record["peak_rss"], max((s[2] for s in timeline), default=0), timeline,
                       record["returncode"], proc.stderr)


def peak_rss_of(command: list[str]) -> int:
    """Run `command` (stdout discarded) and return its peak resident set in bytes; raise if it fails."""
    return measure(command).peak_rss


# --- Tensor- and pipeline-parallel checkpoints ------------------------------------------------------------------

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
    config = nemo_config(model, _precision(dtype), pipeline_model_parallel_size=pp, tokenizer_model=tokenizer_model)

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


# --- A real SentencePiece model ---------------------------------------------------------------------------------

_SP_LETTERS = "abcdefghijklmnopqrstuvwxyzåäö"


def make_sentencepiece_model(path: str | os.PathLike[str], vocab_size: int) -> str:
    """Write a small, deterministic SentencePiece BPE model of exactly `vocab_size` pieces and return its path.

    Trained in memory (no protobuf needed) on generated Swedish-lettered words. Ids as in GPT-SW3's tokenizer:
    `<pad>` 0, `<unk>` 1, `<s>` 2, `<|endoftext|>` 3 (the eos). Identity normalisation; with `vocab_size` >= 512
    it falls back to the 256 byte pieces for characters it lacks, as GPT-SW3's does. Needs `vocab_size` >= 34
    (4 special pieces, 29 letters and the word-boundary mark); a few hundredths of a second for 1000 pieces.
    """
    import io
    import random

    import sentencepiece as spm

    minimum = 4 + len(_SP_LETTERS) + 1
    if vocab_size < minimum:
        raise ValueError(f"a SentencePiece model here needs at least {minimum} pieces, got {vocab_size}")
    rng = random.Random(0)
    n = max(2000, 2 * vocab_size)
    words = ["".join(rng.choice(_SP_LETTERS) for _ in range(rng.randint(2, 9))) for _ in range(n)]
    sentences = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(n)]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=proto, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=vocab_size >= 512, normalization_rule_name="identity",
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>",
        eos_piece="<|endoftext|>", num_threads=1, minloglevel=2,
    )
    path = os.fspath(path)
    with open(path, "wb") as f:
        f.write(proto.getvalue())
    return path
