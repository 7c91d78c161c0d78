"""The SentencePiece tokenizer a `.nemo` ships: its vocabulary size, and the files transformers loads it from.

GPT-SW3's tokenizer is a SentencePiece model; transformers' `GPTSw3Tokenizer` reads it as `spiece.model`,
and `AutoTokenizer.from_pretrained(folder)` finds that class through `tokenizer_config.json`. Reading the
model needs the `sentencepiece` package (the `tokenizer` extra); without it the file is still copied, but
neither its vocabulary size nor the tokenizer can be checked.
"""

from __future__ import annotations

import json
import os

MODEL_FILE = "spiece.model"
CONFIG_FILE = "tokenizer_config.json"


def sentencepiece_available() -> bool:
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return False
    return True


def vocab_size(model: bytes) -> int | None:
    """The number of pieces in a SentencePiece model; None without the sentencepiece package or for a
    file it cannot read (the conversion then falls back to --vocab-size or GPT-SW3's 64000)."""
    if not sentencepiece_available():
        return None
    import sentencepiece

    try:
        return int(sentencepiece.SentencePieceProcessor(model_proto=model).vocab_size())
    except (RuntimeError, OSError, ValueError):
        return None


def save(folder: str, model: bytes, max_length: int) -> None:
    """Write `spiece.model` and the `tokenizer_config.json` that names GPTSw3Tokenizer."""
    with open(os.path.join(folder, MODEL_FILE), "wb") as f:
        f.write(model)
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump({"tokenizer_class": "GPTSw3Tokenizer", "model_max_length": max_length}, f, indent=2)
        f.write("\n")


def check(folder: str, vocab: int) -> str:
    """Load the saved tokenizer as a user would and say what came out, for the summary line."""
    if not sentencepiece_available():
        return (f"tokenizer copied as {MODEL_FILE} but not checked (install streamconv[tokenizer], i.e. "
                "sentencepiece, to check it)")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # a damaged model file fails inside sentencepiece or transformers
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"tokenizer copied as {MODEL_FILE} but it does not load ({reason})"
    size = len(tokenizer)
    if size != vocab:
        return (f"tokenizer copied as {MODEL_FILE}: {type(tokenizer).__name__} of {size} tokens, but the model's "
                f"vocabulary is {vocab}; check --vocab-size")
    return f"tokenizer copied as {MODEL_FILE} and checked: {type(tokenizer).__name__} of {size} tokens"
