"""An independent, in-memory implementation of the reference conversion (transformers' gpt_sw3 script).

The reference mapping itself lives in `benchmarks/naive.py` (the naive contender runs it); here it is
applied to a whole checkpoint loaded trustingly (test files only), keeping what a current GPT-2 model
loads: no causal-mask buffers, and `lm_head.weight` left to the tie with `wte`.
"""

import torch

from benchmarks.naive import convert_megatron_checkpoint

NOT_WRITTEN = (".attn.bias", ".attn.masked_bias", "lm_head.weight")


def reference_convert(checkpoint_path, vocab_size=64000):
    ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    out = convert_megatron_checkpoint(ckpt["state_dict"], ckpt["hyper_parameters"]["cfg"], vocab_size)
    return {k: v.contiguous() for k, v in out.items() if not k.endswith(NOT_WRITTEN)}
