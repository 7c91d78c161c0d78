"""The SentencePiece tokenizer a `.nemo` ships: its vocabulary size, and the files transformers loads it from.

GPT-SW3's tokenizer is a SentencePiece model; transformers' `GPTSw3Tokenizer` reads it as `spiece.model`,
and `AutoTokenizer.from_pretrained(folder)` finds that class through `tokenizer_config.json`. Reading the
model needs the `sentencepiece` package (the `tokenizer` extra); without it the file is still copied, but
neither its vocabulary size nor the tokenizer can be checked.
"""

from __future__ import annotations

import functools
import json
import os

from streamconv import recipes
from streamconv.errors import first_line

MODEL_FILE = "spiece.model"
CONFIG_FILE = "tokenizer_config.json"
MAX_BYTES = 256 * 2**20  # GPT-SW3's tokenizer is about 1 MB
# A Hugging Face tokenizer's files (`save_pretrained`), the ones a conversion copies; a Llama model's, as NeMo 2.0
# ships them. Code (tokenization_*.py) is never among them.
HF_MAX_BYTES = 48 * 2**20  # each of them: Llama 3's tokenizer.json is 9 MB; parsing JSON takes some 20 x its size
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def sentencepiece_available() -> bool:
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return False
    return True


def vocab_size(model: bytes) -> int | None:
    """The number of pieces in a SentencePiece model; None without the sentencepiece package or for a
    file it cannot read (the conversion then falls back to --vocab-size or GPT-SW3's 64000)."""
    return _pieces(model) if sentencepiece_available() else None


@functools.lru_cache(maxsize=4)  # asked for the plan, the summary and the copy: the model is parsed once
def _pieces(model: bytes) -> int | None:
    import sentencepiece

    try:
        return int(sentencepiece.SentencePieceProcessor(model_proto=model).vocab_size())
    except (RuntimeError, OSError, ValueError):
        return None


def ships(model_type: str) -> bool:
    """Whether a conversion to this config.json `model_type` ships a SentencePiece tokenizer (GPT-SW3's; a Llama
    model's not yet)."""
    family = recipes.by_model_type(model_type)
    return family is not None and getattr(family, "tokenizer_settings", None) is not None


@functools.lru_cache(maxsize=4)  # (asked for the plan and the summary: parsed once)
def _hf_vocab_size(tokenizer_json: bytes) -> int | None:
    try:
        data = json.loads(tokenizer_json)
        ids = [*data["model"]["vocab"].values(), *(t["id"] for t in data.get("added_tokens") or [])]
        return 1 + max(i for i in ids if isinstance(i, int) and not isinstance(i, bool))
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError):
        return None


def hf_vocab_size(files: dict[str, bytes]) -> int | None:
    """The vocabulary of a Hugging Face tokenizer: one more than the largest id in its `tokenizer.json` (model
    vocabulary and added tokens); None without one that reads."""
    return _hf_vocab_size(files["tokenizer.json"]) if "tokenizer.json" in files else None


def check_hf(folder: str, config: dict) -> str:
    """Load the copied Hugging Face tokenizer as a user would and compare its size with the model's."""
    from transformers import AutoTokenizer

    try:
        loaded = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # whatever a damaged or foreign file makes the library raise
        return f"tokenizer files copied but they do not load ({first_line(exc)})"
    name, size = type(loaded).__name__, len(loaded)
    if size > config["vocab_size"]:
        return f"tokenizer files copied: {name} of {size} tokens, more than the model's {config['vocab_size']}"
    return f"tokenizer files copied and checked: {name} of {size} tokens"


def settings(config: dict) -> dict:
    """`tokenizer_config.json` for a model's config (its family says which class, length and special tokens)."""
    return recipes.by_model_type(config["model_type"]).tokenizer_settings(config)


def save(folder: str, model: bytes, config: dict) -> None:
    """Write `spiece.model` and its `tokenizer_config.json`."""
    with open(os.path.join(folder, MODEL_FILE), "wb") as f:
        f.write(model)
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(settings(config), f, indent=2)
        f.write("\n")


def check(folder: str, config: dict) -> str:
    """Load the saved tokenizer as a user would, compare it with the model's config, and say so in a note."""
    if not sentencepiece_available():
        return (f"tokenizer copied as {MODEL_FILE} but not checked (install streamconv[tokenizer], i.e. "
                "sentencepiece, to check it)")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # a damaged model file fails inside sentencepiece or transformers
        return f"tokenizer copied as {MODEL_FILE} but it does not load ({first_line(exc)})"
    name, size = type(tokenizer).__name__, len(tokenizer)
    if size != config["vocab_size"]:
        return (f"tokenizer copied as {MODEL_FILE}: {name} of {size} tokens, but the model's vocabulary is "
                f"{config['vocab_size']}; check --vocab-size")
    ids = {key: tokenizer.convert_tokens_to_ids(getattr(tokenizer, key)) for key in ("bos_token", "eos_token",
                                                                                     "pad_token")}
    wrong = [f"{key} {getattr(tokenizer, key)!r} is id {ids[key]}, config.json says {config[key + '_id']}"
             for key in ids if ids[key] != config[key + "_id"]]
    if wrong:
        return f"tokenizer copied as {MODEL_FILE}: {name}, but " + "; ".join(wrong)
    return f"tokenizer copied as {MODEL_FILE} and checked: {name} of {size} tokens"
