"""Model families, one registered file each (see `base.Family`); `choose` picks the one a checkpoint is."""

from __future__ import annotations

# Each family module registers itself on import: one name each.
from streamconv.families import (  # noqa: F401
    deepseek_v3,
    gemma3,
    gpt_oss,
    gpt_sw3,
    llama,
    mistral,
    mixtral,
    nemotron_h,
    olmoe,
    qwen2,
    qwen3,
    qwen3_moe,
)
from streamconv.families.registry import FAMILIES, by_model_type, check_forced, choose

__all__ = ["FAMILIES", "by_model_type", "check_forced", "choose"]
