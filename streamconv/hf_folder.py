"""The Hugging Face folder around the shards: config.json, the index, the tokenizer's files, all made durable."""

from __future__ import annotations

import contextlib
import json
import os
import stat

from streamconv import tokenizer
from streamconv.errors import ConversionError
from streamconv.output import fsync
from streamconv.plan import Plan
from streamconv.sources.records import Checkpoint

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"


def read_tokenizer(path: str) -> bytes:
    """The SentencePiece model given with --tokenizer, refused if sentencepiece is installed and cannot read it."""
    try:  # (opened without waiting: a pipe would block the open, or the read forever)
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ConversionError(f"the tokenizer {path} is not a regular file (a folder, a pipe or a device?); "
                                      "give --tokenizer the SentencePiece model file itself")
            model = f.read(tokenizer.MAX_BYTES + 1)
    except OSError as exc:
        raise ConversionError(f"cannot read the tokenizer {path} ({exc.strerror}); check --tokenizer") from None
    if len(model) > tokenizer.MAX_BYTES:
        raise ConversionError(f"{path} is larger than {tokenizer.MAX_BYTES} bytes, too large for a SentencePiece "
                              "model; check --tokenizer")
    if tokenizer.sentencepiece_available() and tokenizer.vocab_size(model) is None:
        raise ConversionError(f"{path} is not a SentencePiece model that sentencepiece can read; check --tokenizer")
    return model


def write_extras(folder: str, checkpoint: Checkpoint, plan: Plan, config: dict, notes: list[str]
                 ) -> tokenizer.LoadCheck | None:
    """`config.json` and the tokenizer's files; returns the tokenizer's load check, started in a child process."""
    _write_config(folder, config)
    sentencepiece = plan.family.sentencepiece
    if not sentencepiece and checkpoint.tokenizer_files:
        for name, data in checkpoint.tokenizer_files.items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
        return tokenizer.LoadCheck("hf", folder, config)
    if not sentencepiece:
        what = "its SentencePiece model is not copied for this family yet" if checkpoint.tokenizer \
            else "one is copied from NeMo 2.0's context/nemo_tokenizer/ or Megatron-Bridge's tokenizer/"
        notes.append(f"no tokenizer copied ({what}; copy yours beside the model" + _named_tokenizer(checkpoint) + ")")
    elif checkpoint.tokenizer is None:
        notes.append("no tokenizer copied (--tokenizer MODEL adds one)")
    elif tokenizer.sentencepiece_available() and tokenizer.vocab_size(checkpoint.tokenizer) is None:
        notes.append("the checkpoint's tokenizer file is not a SentencePiece model: not copied")
    else:  # checked (transformers imported) while the tensors stream
        tokenizer.save(folder, checkpoint.tokenizer, plan.family.tokenizer_settings(config))
        if not tokenizer.sentencepiece_available():
            notes.append(tokenizer.UNCHECKED)
            return None
        return tokenizer.LoadCheck("sentencepiece", folder, config)
    return None


def finish(folder: str, plan: Plan, checked: tokenizer.LoadCheck | None, notes: list[str]) -> None:
    """Phase 3: the tokenizer check's outcome, the index, and everything in `folder` made durable."""
    if checked is not None:
        notes.append(checked.result())
    if plan.is_sharded:
        with open(os.path.join(folder, INDEX_NAME), "w") as f:
            json.dump(plan.index(), f, indent=2, sort_keys=True)
            f.write("\n")
    for name in os.listdir(folder):  # the shards are fsynced already; config, index and tokenizer files
        fsync(os.path.join(folder, name))
    fsync(folder)


def _named_tokenizer(checkpoint: Checkpoint) -> str:
    """What the cfg names as the tokenizer (NeMo's `tokenizer.type`, Megatron-LM's `tokenizer_model`: often a hub
    name), said, never fetched nor opened."""
    for key in ("tokenizer.type", "tokenizer_model"):
        try:
            name = checkpoint.hparam(key)
        except ConversionError:
            continue
        if isinstance(name, str) and name.isprintable() and 0 < len(name) <= 200:
            return f"; the cfg names {name!r} as its tokenizer, not fetched"
    return ""


def _write_config(folder: str, config: dict) -> None:
    """`config.json` as `GPT2Config(**config).to_json_file` (or LlamaConfig's) writes it, without importing
    transformers.

    That import reads hundreds of files and costs over two seconds of a cold conversion, competing with the
    stream for the disk and the CPU. The config class fills every field not given here with its default when it
    loads the file (tests/test_convert.py checks the two load the same).
    """
    from importlib.metadata import PackageNotFoundError, version

    written = dict(config)
    with contextlib.suppress(PackageNotFoundError):  # transformers without its metadata: the field is optional
        written["transformers_version"] = version("transformers")
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(written, f, indent=2, sort_keys=True)
        f.write("\n")
