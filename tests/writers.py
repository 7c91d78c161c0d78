"""Test-only checkpoint writers: `.nemo` archives of a synthetic model and a real SentencePiece model.

The `.ckpt` writer is `streamconv.demo.make_checkpoint` (the demo needs it on a bare install) and the
tensor/pipeline-parallel one `benchmarks.parallel.make_parallel` (the benchmarks generate a workload with it).
"""

from __future__ import annotations

import os

import torch

from streamconv.demo import (
    SyntheticCheckpoint,
    SyntheticModel,
    nemo_config,
    nemo_precision,
    random_gpt2_state_dict,
    to_nemo_state_dict,
)


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
    precision = nemo_precision(dtype)
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
