"""Real megatron-core checkpoints of a tiny GPT-SW3 (GPT-2 architecture) model, written by megatron-core itself.

streamconv's converter is tested against these: the weights are laid out by megatron-core 0.16's own
`dist_checkpointing.save` (torch_dist backend) or its plain `state_dict()`, in the containers NeMo 1.x, NeMo 2.0
and Megatron-LM put them in, and `Case.logits` are megatron-core's own logits of the model (the oracle).

The same seed gives the same weights whatever the parallelism: the model is built and initialised once at
TP=1, PP=1 (its logits computed there), saved as a distributed checkpoint, and every TPxPP case loads that
checkpoint in a TPxPP process group with `dist_checkpointing.load` (megatron's own resharding) and saves again.

The same code runs unchanged under Python 3.12 with megatron-core 0.19.2 (plus psutil, which its writer needs),
which keeps the non-sharded state as the sharded object `common_state` inside rank 0's `.distcp` instead of
`common.pt`: tests/fixtures/generate_mcore019.py writes the committed 0.19.2 fixtures with it.

Megatron runs in a child process (`python -m tests.mcore_models`): pytest's process never initialises
torch.distributed, and importing this module costs nothing (no torch, no megatron at import). Everything on
CPU: a few torch.cuda calls megatron makes unconditionally are stubbed in the child only (see `_cpu_stubs`).

    case = write(tmp_path, tp=2, pp=2, layout="nemo1")
    convert(case.checkpoint, ...); compare with case.logits (fp32 [1, n, vocab]) for case.input_ids

Results are cached in `root` by their parameters: `write_many` makes every missing case in one child process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DIMS = ("hidden", "layers", "heads", "ffn", "vocab", "seq")
INIT = ("std", "seed")
DEFAULTS: dict[str, Any] = dict(tp=1, pp=1, dtype="bf16", layout="bare", optimizer=False, hidden=64, layers=4,
                                heads=4, ffn=256, vocab=256, seq=64, seed=1234, std=0.1, groups=0, tied=False,
                                experts=0)
# groups > 0: a Llama-style model (RMSNorm, SwiGLU, rotary positions with ROPE_BASE, that many key/value groups, no
# biases, an untied output layer unless `tied`); 0: GPT-SW3's GPT-2 architecture (always tied). experts > 0 (with
# groups): Qwen3-MoE's shape, every MLP that many experts of width ffn / 2, top-2 softmax routing, query and key
# norms per head.
MOE_TOPK = 2
ROPE_BASE = 500000
ITERATION = 10  # the step every training layout records
STALE_ITERATION = 5  # megatron_lm also holds this older iteration, with other (negated) weights
MAKE_VOCAB_DIVISIBLE_BY = 128
EPS = 1e-5


# --- The layouts: where the weights go, under which key prefix, and what the container adds ------------------------
#
# `weights`: the distributed checkpoint's folder (or, for the legacy container, the folder holding the rank
# folders), relative to the case folder; `checkpoint`: the path handed to streamconv; `prefix`: the prefix of
# the model's sharded keys; `pack`: the folder tarred into `checkpoint` as a plain (uncompressed) .nemo.
# What each container puts beside the ShardedTensors (common.pt; megatron-core >= 0.17: common_state) is in
# `_container_state`.


@dataclasses.dataclass(frozen=True)
class Layout:
    prefix: str
    weights: str
    checkpoint: str
    pack: str | None = None


TRAIN_DIR = f"megatron_gpt--step={ITERATION}-last"  # NeMo 1: the .ckpt suffix dropped for a dist checkpoint
NEMO2_DIR = f"model--step={ITERATION}-consumed_samples={ITERATION * 8}.0-last"
LAYOUTS: dict[str, Layout] = {
    "bare": Layout("model.", "dcp", "dcp"),
    "nemo1": Layout("model.", "nemo/model_weights", "model.nemo", pack="nemo"),
    "nemo1_folder": Layout("model.", "nemo/model_weights", "nemo"),
    "nemo1_train": Layout("model.", f"checkpoints/{TRAIN_DIR}", f"checkpoints/{TRAIN_DIR}"),
    "nemo2": Layout("module.", f"checkpoints/{NEMO2_DIR}/weights", f"checkpoints/{NEMO2_DIR}"),
    "megatron_lm": Layout("", f"checkpoints/iter_{ITERATION:07d}", "checkpoints"),
    "legacy_container": Layout("model.", "nemo", "model.nemo", pack="nemo"),
}
TOKENIZER = "4f2a1c9e_tokenizer.model"  # the .nemo artifact name (NeMo prefixes a hash of the file)


@dataclasses.dataclass(frozen=True)
class Case:
    """One written checkpoint and megatron-core's own logits of its model."""

    checkpoint: Path  # what to hand streamconv
    input_ids: Any  # torch.LongTensor [1, n]
    logits: Any  # torch.FloatTensor [1, n, vocab]: megatron-core's, computed in the model's dtype, cast to fp32
    logits_fp32: Any  # megatron-core's logits of the same weights (bf16 values kept) computed in fp32
    config: dict  # the parameters: dims, tp, pp, dtype, layout, optimizer, seed
    seconds: float  # wall time of writing this case (its share of the child process; the base not included)


def write(root: str | os.PathLike[str], **params: Any) -> Case:
    """One case (see DEFAULTS for the parameters); cached in `root` by its parameters."""
    return write_many(root, [params])[0]


def write_many(root: str | os.PathLike[str], cases: list[dict[str, Any]]) -> list[Case]:
    """Several cases, every missing one made in a single child process (one megatron import for all)."""
    root = Path(root)
    full = [_complete(c) for c in cases]
    missing = [c for c in full if not (root / _case_name(c) / "case.pt").exists()]
    if missing:
        root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
        done = subprocess.run([sys.executable, "-m", "tests.mcore_models", str(root), json.dumps(missing)],
                              cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"megatron writer failed ({done.returncode}):\n{done.stdout[-4000:]}\n"
                               f"{done.stderr[-8000:]}")
    return [_read_case(root, c) for c in full]


def _complete(params: dict[str, Any]) -> dict[str, Any]:
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown parameters {sorted(unknown)}")
    c = {**DEFAULTS, **params}
    if c["layout"] not in LAYOUTS:
        raise ValueError(f"layout {c['layout']!r} is not one of {sorted(LAYOUTS)}")
    if c["dtype"] not in ("bf16", "fp32"):
        raise ValueError("dtype is bf16 or fp32")
    if c["layers"] % c["pp"] or c["heads"] % c["tp"] or c["vocab"] % c["tp"] or c["ffn"] % c["tp"]:
        raise ValueError("layers must divide by pp; heads, vocab and ffn by tp")
    if c["groups"] and (c["heads"] % c["groups"] or c["groups"] % c["tp"]):
        raise ValueError("groups must divide heads, and tp groups")
    if c["experts"] and not c["groups"]:
        raise ValueError("experts need a Llama-style model (groups > 0)")
    return c


def _base_name(c: dict[str, Any]) -> str:
    moe = f"-moe{c['experts']}" if c["experts"] else ""
    llama = f"-llama{c['groups']}{'-tied' if c['tied'] else ''}{moe}" if c["groups"] else ""
    return "base-" + "-".join(f"{k}{c[k]}" for k in (*DIMS, "dtype", *INIT)) + llama


def _case_name(c: dict[str, Any]) -> str:
    opt = "-opt" if c["optimizer"] else ""
    return f"{c['layout']}-tp{c['tp']}-pp{c['pp']}{opt}-" + _base_name(c)[5:]


def _read_case(root: Path, c: dict[str, Any]) -> Case:
    import torch

    saved = torch.load(root / _case_name(c) / "case.pt", weights_only=True)  # our own file
    return Case(root / _case_name(c) / saved["checkpoint"], saved["input_ids"], saved["logits"],
                saved["logits_fp32"], json.loads(saved["config"]), saved["seconds"])


# --- What each container holds besides the model (built in the child, where torch and megatron are loaded) --------


def nemo_cfg(c: dict[str, Any]) -> dict[str, Any]:
    """model_config.yaml of a NeMo 1.x megatron_gpt model (mcore), also `hyper_parameters.cfg` of its training ckpt."""
    return {
        "mcore_gpt": True, "precision": "bf16" if c["dtype"] == "bf16" else 32,
        "megatron_amp_O2": c["dtype"] == "bf16", "micro_batch_size": 1, "global_batch_size": 8,
        "tensor_model_parallel_size": c["tp"], "pipeline_model_parallel_size": c["pp"],
        "encoder_seq_length": c["seq"], "max_position_embeddings": c["seq"], "num_layers": c["layers"],
        "hidden_size": c["hidden"], "ffn_hidden_size": c["ffn"], "num_attention_heads": c["heads"],
        "kv_channels": None, "init_method_std": c["std"], "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "layernorm_epsilon": EPS, "make_vocab_size_divisible_by": MAKE_VOCAB_DIVISIBLE_BY, "pre_process": True,
        "post_process": True, "share_embeddings_and_output_weights": True, "position_embedding_type":
        "learned_absolute", "normalization": "layernorm", "activation": "gelu", "bias": True,
        "transformer_block_type": "pre_ln", "dist_ckpt_format": "torch_dist",
        "tokenizer": {"library": "sentencepiece", "type": None, "model": f"nemo:{TOKENIZER}",
                      "vocab_file": None, "merge_file": None},
        "optim": {"name": "distributed_fused_adam", "lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.1},
        **({"normalization": "rmsnorm", "activation": "fast-swiglu", "position_embedding_type": "rope",
            "bias": False, "share_embeddings_and_output_weights": c["tied"], "num_query_groups": c["groups"],
            "rotary_base": ROPE_BASE, "rotary_percentage": 1.0} if c["groups"] else {}),
        **({"num_moe_experts": c["experts"], "moe_router_topk": MOE_TOPK, "moe_ffn_hidden_size": c["ffn"] // 2,
            "qk_layernorm": True} if c["experts"] else {}),
    }


def megatron_lm_args(c: dict[str, Any]):
    """Megatron-LM's `args` (an argparse.Namespace, pickled into common.pt or common_state) for this model."""
    import argparse

    import torch
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    bf16 = c["dtype"] == "bf16"
    args = dict(
        num_layers=c["layers"], hidden_size=c["hidden"], ffn_hidden_size=c["ffn"],
        num_attention_heads=c["heads"], num_query_groups=c["heads"], group_query_attention=False,
        kv_channels=c["hidden"] // c["heads"], max_position_embeddings=c["seq"], seq_length=c["seq"],
        padded_vocab_size=c["vocab"], vocab_size=None, make_vocab_size_divisible_by=MAKE_VOCAB_DIVISIBLE_BY,
        tensor_model_parallel_size=c["tp"], pipeline_model_parallel_size=c["pp"], data_parallel_size=1,
        world_size=c["tp"] * c["pp"], normalization="LayerNorm", norm_epsilon=EPS, layernorm_epsilon=EPS,
        apply_layernorm_1p=False, position_embedding_type="learned_absolute", add_position_embedding=True,
        swiglu=False, openai_gelu=False, squared_relu=False, untie_embeddings_and_output_weights=False,
        add_bias_linear=True, add_qkv_bias=True, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16, fp16=False, transformer_impl="local", ckpt_format="torch_dist", use_dist_ckpt=True,
        model_type=ModelType.encoder_or_decoder, attention_backend=AttnBackend.auto,
        tokenizer_type="GPTSentencePieceTokenizer", iteration=ITERATION, consumed_train_samples=ITERATION * 8,
        hidden_dropout=0.0, attention_dropout=0.0, use_distributed_optimizer=False,
    )
    if c["groups"]:
        args.update(normalization="RMSNorm", swiglu=True, position_embedding_type="rope", add_position_embedding=False,
                    untie_embeddings_and_output_weights=not c["tied"], add_bias_linear=False, add_qkv_bias=False,
                    num_query_groups=c["groups"], group_query_attention=c["groups"] < c["heads"],
                    rotary_base=ROPE_BASE, rotary_percent=1.0, use_rope_scaling=False,
                    tokenizer_type="HuggingFaceTokenizer", tokenizer_model="meta-llama/Meta-Llama-3-8B")
    if c["experts"]:
        args.update(num_experts=c["experts"], moe_router_topk=MOE_TOPK, moe_ffn_hidden_size=c["ffn"] // 2,
                    qk_layernorm=True)
    return argparse.Namespace(**args)


def _container_state(c: dict[str, Any], model_sd: dict, optim_sd: dict | None, iteration: int,
                     rank: tuple[int, int]) -> dict:
    """The state dict given to dist_checkpointing.save: the model's ShardedTensors nested as each container nests
    them, and the container's other entries, which megatron's save puts into common.pt (rank 0's copy;
    megatron-core >= 0.17: the byte item `common_state/shard_0_1` in rank 0's .distcp)."""
    layout = c["layout"]
    if layout in ("bare", "nemo1", "nemo1_folder"):
        return {**model_sd, **({"optimizer": optim_sd} if optim_sd else {})}
    if layout in ("nemo1_train", "nemo2"):
        from collections import OrderedDict

        from omegaconf import OmegaConf

        state = {"epoch": 0, "global_step": iteration, "pytorch-lightning_version": "2.4.0",
                 "state_dict": OrderedDict(), "sharded_state_dict": model_sd, "loops": {}, "callbacks": {},
                 "lr_schedulers": [{"last_epoch": iteration, "base_lrs": [1e-4]}]}
        if layout == "nemo1_train":
            state["hyper_parameters"] = OmegaConf.create({"cfg": nemo_cfg(c)})
            state["hparams_name"] = "cfg"
            if optim_sd:
                state["optimizer_states"] = [optim_sd]
        elif optim_sd:
            state["optimizer"] = [optim_sd]
        return state
    if layout == "megatron_lm":
        import random

        import numpy as np
        import torch
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        tp_rank, pp_rank = rank
        rng = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
               "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": None, "rng_tracker_states": {}}
        state = {"args": megatron_lm_args(c), "checkpoint_version": 3.0, "iteration": iteration, "model": model_sd,
                 "rng_state": ShardedObject("rng_state", [rng], (c["pp"], c["tp"]), (pp_rank, tp_rank),
                                            replica_id=0),
                 "opt_param_scheduler": {"num_steps": iteration * 8, "max_lr": 1e-4},
                 "num_floating_point_operations_so_far": 0}
        if optim_sd:
            state["optimizer"] = optim_sd
        return state
    raise AssertionError(layout)


# --- The child process ------------------------------------------------------------------------------------------


def _cpu_stubs() -> None:
    """megatron-core 0.16 and 0.19 call these unconditionally; on a CPU-only torch they would raise (on the CUDA
    build without a GPU, in a forked rank: "Cannot re-initialize CUDA in forked subprocess"). Also imports
    megatron-core with its `jit_fuser` a no-op (as megatron itself falls back to): `torch.compile` as a decorator
    imports torch._dynamo, ~3 s, for fused kernels this model does not use (bias/activation fusion is off)."""
    import torch

    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"  # megatron allocates buffers on `current_device()`
    torch.Tensor.cuda = lambda self, *a, **k: self  # the tied output layer's all-reduce at PP > 1
    compile_ = torch.compile
    torch.compile = lambda fn=None, **kwargs: fn if fn is not None else (lambda f: f)
    try:
        import megatron.core  # noqa: F401
    finally:
        torch.compile = compile_


def _setup_process(rank: int, world: int, port: int, tp: int, pp: int) -> None:
    import contextlib
    import multiprocessing

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tp, pp)
    torch.manual_seed(0)
    # No CUDA rng states to track: dropout is off and the model is in eval mode, the fork is a no-op.
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    # The writer collects its results through a Manager queue it starts with "spawn" (a fresh interpreter
    # importing megatron, ~6 s per save); a forked Manager is the same queue at no cost.
    filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()


def _teardown_process() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    filesystem_async._results_queue = None


def _build(c: dict[str, Any]):
    """The model in the current TPxPP group (each PP stage its own layers), megatron's Float16Module for bf16."""
    import torch
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    dtype = torch.bfloat16 if c["dtype"] == "bf16" else torch.float32
    llama = bool(c["groups"])
    family = dict(normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                  num_query_groups=c["groups"]) if llama else \
        dict(normalization="LayerNorm", add_bias_linear=True, activation_func=F.gelu)
    if c["experts"]:  # (the allgather dispatcher: alltoall's creates a CUDA stream)
        from megatron.core.transformer.moe import moe_utils

        if not hasattr(moe_utils, "te_general_gemm"):  # (0.16.1's router reads this name, bound only with TE)
            moe_utils.te_general_gemm = None
        family.update(num_moe_experts=c["experts"], moe_router_topk=MOE_TOPK, moe_ffn_hidden_size=c["ffn"] // 2,
                      qk_layernorm=True, moe_token_dispatcher_type="allgather", moe_grouped_gemm=False)
    config = TransformerConfig(
        num_layers=c["layers"], hidden_size=c["hidden"], num_attention_heads=c["heads"], ffn_hidden_size=c["ffn"],
        use_cpu_initialization=True, layernorm_epsilon=EPS, params_dtype=dtype, bf16=c["dtype"] == "bf16",
        pipeline_dtype=dtype, tensor_model_parallel_size=c["tp"], pipeline_model_parallel_size=c["pp"],
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=c["std"], **family)
    positions = dict(position_embedding_type="rope", rotary_base=ROPE_BASE,
                     share_embeddings_and_output_weights=c["tied"]) \
        if llama else dict(position_embedding_type="learned_absolute", share_embeddings_and_output_weights=True)
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, qk_layernorm=config.qk_layernorm,
                                    normalization=config.normalization)
    gpt = GPTModel(config, spec, c["vocab"], c["seq"],
                   pre_process=parallel_state.is_pipeline_first_stage(),
                   post_process=parallel_state.is_pipeline_last_stage(), **positions)
    # As Megatron-LM and NeMo (O2) train in bf16: every parameter (layer norms, position embeddings too) bf16.
    model = Float16Module(config, gpt) if c["dtype"] == "bf16" else gpt
    model.eval()
    return model, gpt


def _make_base(root: Path, c: dict[str, Any]) -> None:
    """Build and initialise the model at TP=1, PP=1, compute its logits, save it (prefix "model.")."""
    import torch
    from megatron.core import dist_checkpointing

    base = root / _base_name(c)
    tmp = base.with_name(base.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(c["seed"])  # use_cpu_initialization: the full weights are drawn from torch's CPU generator
    model, gpt = _build({**c, "tp": 1, "pp": 1})
    # megatron initialises biases to 0 and layer norms to (1, 0): a reader dropping them would go unseen.
    g = torch.Generator().manual_seed(c["seed"] + 2)
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                p.add_((torch.randn(p.shape, generator=g) * c["std"]).to(p.dtype))
    n = min(c["seq"], 24)
    ids = torch.randint(0, c["vocab"], (1, n), generator=torch.Generator().manual_seed(c["seed"] + 1))
    causal = torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), diagonal=1)  # True = masked
    with torch.no_grad():
        logits = model(ids, torch.arange(n)[None], causal).float()  # Float16Module casts its bf16 output up
    (tmp / "dcp").mkdir(parents=True)
    dist_checkpointing.save(gpt.sharded_state_dict(prefix="model."), str(tmp / "dcp"))
    fp32, _ = _build({**c, "tp": 1, "pp": 1, "dtype": "fp32"})  # the same (rounded) weights, computed in fp32
    fp32.load_state_dict({k: v.float() if isinstance(v, torch.Tensor) else v for k, v in gpt.state_dict().items()})
    with torch.no_grad():
        logits_fp32 = fp32(ids, torch.arange(n)[None], causal)
    torch.save({"input_ids": ids, "logits": logits, "logits_fp32": logits_fp32}, tmp / "logits.pt")
    tmp.rename(base)


def _optimizer_state(gpt, model_sd: dict) -> dict:
    """Mixed-precision Adam state as megatron's (non-distributed) Float16Optimizer lays it out: fp32 exp_avg,
    exp_avg_sq and master weights, each a ShardedTensor sharded as its weight, keyed
    `optimizer.state.<name>.<weight key>` (megatron's own helpers make them). The state comes from one real
    torch Adam step (lr 1e-4) on fp32 copies of the weights with gradients that are an elementwise function of
    them, so it is the same at any TP/PP; the masters are those after the step (close to the weights, not
    equal: a reader taking them for the weights shows)."""
    import torch
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        make_sharded_optimizer_tensor,
        optim_state_to_sharding_state,
    )

    params = [p for p in gpt.parameters()]
    masters = [p.detach().float().clone().requires_grad_(True) for p in params]
    for m in masters:
        m.grad = torch.sin(m.detach() * 37.0 + 1.0) * 1e-2
    adam = torch.optim.Adam(masters, lr=1e-4, betas=(0.9, 0.95))
    adam.step()
    id_to_sharded = get_param_id_to_sharded_param_map(model_sd, params)
    state = {"optimizer": adam.state_dict()}
    optim_state_to_sharding_state(state["optimizer"], id_to_sharded, exclude_keys=("step",))
    state["fp32_from_fp16_params"] = [[make_sharded_optimizer_tensor(id_to_sharded[i], m.detach(),
                                                                     prefix="optimizer.state.fp32_param")
                                       for i, m in enumerate(masters) if i in id_to_sharded]]
    return state


def _save_case(root: Path, c: dict[str, Any], out: Path, rank: tuple[int, int]) -> None:
    """In the current TPxPP group: load the base checkpoint (megatron resharding it), save it in the layout."""
    from collections import OrderedDict

    import torch
    from megatron.core import dist_checkpointing, parallel_state

    model, gpt = _build(c)
    loaded = dist_checkpointing.load(gpt.sharded_state_dict(prefix="model."), str(root / _base_name(c) / "dcp"))
    gpt.load_state_dict({k[len("model."):]: v for k, v in loaded.items()})
    layout = LAYOUTS[c["layout"]]
    if c["layout"] == "legacy_container":
        tp_rank, pp_rank = rank
        name = (f"tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:03d}" if c["pp"] > 1 else
                f"mp_rank_{tp_rank:02d}" if c["tp"] > 1 else "")
        folder = out / layout.weights / name
        folder.mkdir(parents=True, exist_ok=True)
        # The plain state_dict, `_extra_state` entries kept as megatron-core writes them (None, local spec).
        weights = OrderedDict(("model." + k, v) for k, v in gpt.state_dict().items())  # as module.state_dict()
        torch.save(weights, folder / "model_weights.ckpt")
        return
    iterations = [ITERATION]
    if c["layout"] == "megatron_lm":
        iterations = [STALE_ITERATION, ITERATION]
    for iteration in iterations:
        stale = iteration != ITERATION
        if stale:
            with torch.no_grad():
                for p in gpt.parameters():
                    p.neg_()  # exact: negating twice restores every bit
        model_sd = gpt.sharded_state_dict(prefix=layout.prefix)
        optim_sd = _optimizer_state(gpt, model_sd) if c["optimizer"] else None
        folder = out / layout.weights
        if stale:
            folder = folder.with_name(f"iter_{iteration:07d}")
        if parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.is_pipeline_first_stage():
            folder.mkdir(parents=True, exist_ok=True)
        torch.distributed.barrier()
        dist_checkpointing.save(_container_state(c, model_sd, optim_sd, iteration, rank), str(folder))
        if stale:
            with torch.no_grad():
                for p in gpt.parameters():
                    p.neg_()


def _finish_case(root: Path, c: dict[str, Any], out: Path, seconds: float) -> float:
    """The files around the weights (configs, tokenizer, pointers), the .nemo tar, and case.pt; then publish.
    Returns `seconds` plus the time this took."""
    import tarfile

    import torch
    import yaml

    start = time.perf_counter()
    layout = LAYOUTS[c["layout"]]
    if c["layout"] in ("nemo1", "nemo1_folder", "legacy_container"):
        (out / "nemo" / "model_config.yaml").write_text(yaml.safe_dump(nemo_cfg(c), sort_keys=False))
        _write_tokenizer(out / "nemo" / TOKENIZER, c["vocab"])
    if c["layout"] == "megatron_lm":
        (out / "checkpoints" / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    if c["layout"] == "nemo2":
        context = out / layout.checkpoint / "context"
        context.mkdir(parents=True)
        (context / "model.yaml").write_text(yaml.safe_dump(nemo2_model_yaml(c), sort_keys=False))
        (context / "io.json").write_text(json.dumps(nemo2_io_json(c)))
        if c["groups"]:  # a Llama model: NeMo 2.0 saves its Hugging Face tokenizer beside the config
            _write_hf_tokenizer(context / "nemo_tokenizer", c["vocab"])
    if layout.pack:
        with tarfile.open(out / layout.checkpoint, "w:") as tar:  # NeMo's save_to: plain tar, members "./..."
            tar.add(out / layout.pack, arcname=".")
        shutil.rmtree(out / layout.pack)
    base = torch.load(root / _base_name(c) / "logits.pt", weights_only=True)
    seconds += time.perf_counter() - start
    torch.save({"checkpoint": layout.checkpoint, "config": json.dumps(c), "seconds": seconds, **base},
               out / "case.pt")
    final = root / _case_name(c)
    shutil.rmtree(final, ignore_errors=True)
    out.rename(final)
    return seconds


def _write_tokenizer(path: Path, vocab: int) -> None:
    """A real SentencePiece model of `vocab` pieces where sentencepiece is installed, else placeholder bytes."""
    try:
        from tests.writers import make_sentencepiece_model

        make_sentencepiece_model(path, vocab)
    except (ImportError, ValueError):
        path.write_bytes(bytes(range(256)) * 16)


def _write_hf_tokenizer(folder: Path, vocab: int) -> None:
    """A Hugging Face tokenizer of `vocab` tokens (a word-level one: what matters is its files), saved as
    NeMo 2.0's `save_hf_tokenizer_assets` saves one, with `save_pretrained`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    core = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=DEFAULTS["seq"]).save_pretrained(folder)


# NeMo 2.0's context/: `model.yaml` is the model's fiddle config written as YAML (`_target_` keys, as
# nemo/lightning/io/mixin.py's _io_dump_yaml does with defaults included), `io.json` the whole TrainerContext
# (model, trainer, extra) serialised by fiddle's `serialization.dump_json` ({"root", "objects", "refcounts",
# "version"}). Both are written by hand here, minimal: the GPTConfig fields of nemo/collections/llm/gpt/model/
# base.py that describe this model, dtypes as NeMo's yaml writes them (torch.dtype objects have no qualname).


def _nemo2_config_fields(c: dict[str, Any]) -> dict[str, Any]:
    bf16 = c["dtype"] == "bf16"
    return {
        "num_layers": c["layers"], "hidden_size": c["hidden"], "ffn_hidden_size": c["ffn"],
        "num_attention_heads": c["heads"], "num_query_groups": None, "kv_channels": None,
        "seq_length": c["seq"], "vocab_size": c["vocab"], "make_vocab_size_divisible_by": MAKE_VOCAB_DIVISIBLE_BY,
        "position_embedding_type": "learned_absolute", "share_embeddings_and_output_weights": True,
        "normalization": "LayerNorm", "layernorm_epsilon": EPS, "add_bias_linear": True, "add_qkv_bias": False,
        "gated_linear_unit": False, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "tensor_model_parallel_size": c["tp"], "pipeline_model_parallel_size": c["pp"], "bf16": bf16,
        "fp16": False,
        **({"normalization": "RMSNorm", "gated_linear_unit": True, "position_embedding_type": "rope",
            "share_embeddings_and_output_weights": c["tied"], "add_bias_linear": False,
            "num_query_groups": c["groups"],
            "rotary_base": ROPE_BASE} if c["groups"] else {}),
        **({"num_moe_experts": c["experts"], "moe_router_topk": MOE_TOPK, "moe_ffn_hidden_size": c["ffn"] // 2,
            "qk_layernorm": True} if c["experts"] else {}),
    }


def nemo2_model_yaml(c: dict[str, Any]) -> dict[str, Any]:
    fn = {"_call_": False, "_target_": f"torch.nn.functional.{'silu' if c['groups'] else 'gelu'}"}
    dtype = {"_call_": True, "_target_": "torch.dtype"}
    return {
        "_target_": "nemo.collections.llm.gpt.model.base.GPTModel",
        "config": {"_target_": "nemo.collections.llm.gpt.model.base.GPTConfig", **_nemo2_config_fields(c),
                   "activation_func": fn, "params_dtype": dtype, "pipeline_dtype": dtype, "autocast_dtype": dtype},
        "model_transform": None, "optim": None, "tokenizer": None,
    }


def nemo2_io_json(c: dict[str, Any]) -> dict[str, Any]:
    """fiddle's JSON form: Configs as objects {type, items [[path, value]], metadata, paths}, refs between them."""

    def pyref(module: str, name: str) -> dict:
        return {"type": "pyref", "module": module, "name": name}

    def config(target: tuple[str, str], args: dict[str, Any], path: str) -> dict:
        items = [[f"Attr(name='{k}')", ({"type": "leaf", "value": v, "paths": [f"{path}.{k}"]}
                                         if not isinstance(v, dict) else v)] for k, v in args.items()]
        metadata = {"type": pyref("fiddle._src.config", "BuildableTraverserMetadata"),
                    "items": [["Attr(name='fn_or_cls')", pyref(*target)],
                              ["Attr(name='argument_names')", {"type": pyref("builtins", "tuple"),
                                                                "items": [[f"Index(index={i})", k]
                                                                          for i, k in enumerate(args)],
                                                                "metadata": None}],
                              ["Attr(name='argument_tags')", {"type": pyref("builtins", "dict"), "items": [],
                                                               "metadata": {"type": pyref("builtins", "tuple"),
                                                                            "items": [], "metadata": None}}]],
                    "metadata": pyref("fiddle._src.config", "BuildableTraverserMetadata")}
        return {"type": pyref("fiddle._src.config", "Config"), "items": items, "metadata": metadata,
                "paths": [path]}

    fields = _nemo2_config_fields(c)
    gpt_config = config(("nemo.collections.llm.gpt.model.base", "GPTConfig"), {
        **fields, "activation_func": pyref("torch.nn.functional", "silu" if c["groups"] else "gelu"),
        "params_dtype": pyref("torch", "bfloat16" if fields["bf16"] else "float32")}, "<root>.model.config")
    objects = {
        "trainer_context_1": config(("nemo.lightning.io.pl", "TrainerContext"), {
            "model": {"type": "ref", "key": "gptmodel_1"}, "trainer": {"type": "ref", "key": "trainer_1"},
            "extra": {"type": pyref("builtins", "dict"), "items": [], "metadata": None}}, "<root>"),
        "gptmodel_1": config(("nemo.collections.llm.gpt.model.base", "GPTModel"),
                             {"config": {"type": "ref", "key": "gptconfig_1"}}, "<root>.model"),
        "gptconfig_1": gpt_config,
        "trainer_1": config(("nemo.lightning.pytorch.trainer", "Trainer"), {
            "accelerator": "gpu", "devices": c["tp"] * c["pp"], "max_steps": ITERATION}, "<root>.trainer"),
    }
    return {"root": {"type": "ref", "key": "trainer_context_1"}, "objects": objects,
            "refcounts": {k: 1 for k in objects if k != "trainer_context_1"}, "version": "0.0.1"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, tp: int, pp: int, port: int, root: str, bases: list[dict], jobs: list[tuple[dict, str]]) -> None:
    """One rank of a TPxPP group: the bases (TP=1, PP=1 only), then each case; rank 0 notes each case's time."""
    _setup_process(rank, tp * pp, port, tp, pp)
    from megatron.core import parallel_state

    me = (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank())
    for c in bases:
        start = time.perf_counter()
        _make_base(Path(root), c)
        print(f"base {_base_name(c)}: {time.perf_counter() - start:.2f} s", flush=True)
    for c, out in jobs:
        start = time.perf_counter()
        _save_case(Path(root), c, Path(out), me)
        if rank == 0:
            (Path(out) / "seconds").write_text(str(time.perf_counter() - start))
    _teardown_process()


def main(root: Path, cases: list[dict[str, Any]]) -> None:
    """Every process group is a fork of this one, which imports megatron once and never initialises
    torch.distributed itself (megatron's parallel_state keeps state a destroy does not clear: a later group
    in the same process hangs): first TP=1, PP=1 making the missing bases and the TP=1, PP=1 cases, then one
    group per other (tp, pp) for all its cases."""
    import multiprocessing

    _cpu_stubs()
    bases = list({_base_name(c): c for c in cases if not (root / _base_name(c)).exists()}.values())
    outs = {}
    groups: dict[tuple[int, int], list[dict]] = {(1, 1): []}
    for c in cases:
        outs[_case_name(c)] = out = root / (_case_name(c) + ".tmp")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        groups.setdefault((c["tp"], c["pp"]), []).append(c)
    fork = multiprocessing.get_context("fork")
    for (tp, pp), members in groups.items():
        port = _free_port()
        jobs = [(c, str(outs[_case_name(c)])) for c in members]
        procs = [fork.Process(target=_worker, args=(r, tp, pp, port, str(root), bases if tp * pp == 1 else [],
                                                    jobs)) for r in range(tp * pp)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise RuntimeError(f"a TP={tp} PP={pp} rank failed: exit codes {[p.exitcode for p in procs]}")
    for c in cases:
        out = outs[_case_name(c)]
        spent = float((out / "seconds").read_text())
        (out / "seconds").unlink()
        seconds = _finish_case(root, c, out, spent)
        print(f"case {_case_name(c)}: {seconds:.2f} s", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))
