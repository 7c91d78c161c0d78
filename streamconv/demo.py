"""`streamconv --demo`: make a small GPT-SW3-style checkpoint, convert it, and show transformers agrees."""

from __future__ import annotations

import os
import sys
import tempfile

import torch

from streamconv.converter import convert
from streamconv.errors import one_line
from streamconv.output import check_save_path
from streamconv.testing import SyntheticModel, make_checkpoint


def run_demo(save_path: str | None = None, *, device: str = "cpu", shard_size: str = "5GB",
             overwrite: bool = False, quiet: bool = False) -> int:
    """Returns 0 when the converted model's logits equal the source model's exactly, else 1.

    `save_path` is checked before anything is built, as a conversion checks it.
    """
    if save_path is not None:
        check_save_path(save_path, overwrite)
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    model = SyntheticModel(n_embd=128, n_layer=4, n_head=4, vocab_size=64000, n_positions=256)
    with tempfile.TemporaryDirectory(prefix="streamconv-demo-") as tmp:
        ckpt_path = os.path.join(tmp, "megatron_gpt_sw3.ckpt")
        source = make_checkpoint(ckpt_path, model, dtype=torch.bfloat16)
        print(f"demo: wrote a NeMo-style checkpoint ({os.path.getsize(ckpt_path) / 1e6:.1f} MB with optimizer "
              f"state): hidden {model.n_embd}, {model.n_layer} layers, {model.n_head} heads, vocab {model.vocab_size}")
        out = save_path or os.path.join(tmp, "hf")
        result = convert(ckpt_path, out, device=device, shard_size=shard_size, overwrite=overwrite,
                         progress=not quiet)
        print(one_line(result.summary()))

        reference = GPT2LMHeadModel(source.gpt2_config())
        reference.load_state_dict(source.hf_state_dict, strict=False)  # lm_head is tied to wte
        reference.float().eval()
        converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        tokens = torch.randint(0, model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = (converted(tokens).logits - reference(tokens).logits).abs().max().item()
    ok = diff == 0.0
    print(f"demo: logits of the converted model vs the source model on {tokens.numel()} tokens: "
          f"max abs diff {diff} -> {'OK' if ok else 'MISMATCH'}")
    print(one_line(f"demo: the converted model is in {save_path}") if save_path
          else "demo: the converted model was in a temporary folder; pass --save-path DIR to keep it")
    sys.stdout.flush()
    return 0 if ok else 1
