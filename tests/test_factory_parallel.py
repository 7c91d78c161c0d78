"""The tensor/pipeline-parallel checkpoint factory (benchmarks.parallel) and the SentencePiece model builder
(tests.writers)."""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections import OrderedDict

import pytest
import torch

from benchmarks.parallel import COLUMN_PARALLEL, ROW_PARALLEL, make_parallel, split_for_parallel
from streamconv.demo import PREFIX, SyntheticModel, random_gpt2_state_dict, to_nemo_state_dict
from tests.writers import make_sentencepiece_model

MODEL = SyntheticModel(n_embd=32, n_layer=4, n_head=4, vocab_size=1100, n_positions=32)
LAYER = re.compile(r"^(model\.language_model\.encoder\.layers\.)(\d+)\.(.+)$")
TIED = "model.word_embeddings.weight"


def consolidated(model: SyntheticModel, seed: int = 0) -> OrderedDict:
    return to_nemo_state_dict(random_gpt2_state_dict(model, torch.float32, seed), model, seed + 1)


def merge(ranks: dict[tuple[int, int], dict[str, torch.Tensor]], tp: int, pp: int) -> dict[str, torch.Tensor]:
    """Megatron's merge, written independently of the factory: renumber layers, then concatenate over TP."""
    per_stage = 1 + max((int(m.group(2)) for k in ranks[0, 0] if (m := LAYER.match(k))), default=-1)
    merged: dict[str, torch.Tensor] = {}
    for p in range(pp):
        for key in ranks[0, p]:
            if key == TIED:
                continue
            m = LAYER.match(key)
            name = f"{m.group(1)}{p * per_stage + int(m.group(2))}.{m.group(3)}" if m else key
            pieces = [ranks[t, p][key] for t in range(tp)]
            if key.endswith(COLUMN_PARALLEL):
                merged[name] = torch.cat(pieces, dim=0)
            elif key.endswith(ROW_PARALLEL):
                merged[name] = torch.cat(pieces, dim=1)
            else:
                assert all(torch.equal(pieces[0], x) for x in pieces[1:]), key
                merged[name] = pieces[0]
    return merged


@pytest.mark.parametrize(("tp", "pp"), [(2, 2), (2, 1), (1, 2), (4, 4)])
def test_split_then_merge_is_identity(tp: int, pp: int) -> None:
    model = SyntheticModel(n_embd=32, n_layer=4, n_head=4, vocab_size=1100, tensor_model_parallel_size=tp)
    full = consolidated(model)
    ranks = split_for_parallel(full, tp, pp)
    assert set(ranks) == {(t, p) for t in range(tp) for p in range(pp)}
    merged = merge(ranks, tp, pp)
    assert list(merged) == list(full)
    for key, tensor in full.items():
        assert torch.equal(merged[key], tensor), key


def test_rank_contents_for_tp2_pp2() -> None:
    model = SyntheticModel(n_embd=32, n_layer=4, n_head=4, vocab_size=1100, tensor_model_parallel_size=2)
    full = consolidated(model)
    ranks = split_for_parallel(full, 2, 2)
    wte = PREFIX + "embedding.word_embeddings.weight"
    for t in range(2):
        first, last = ranks[t, 0], ranks[t, 1]
        layers = {int(m.group(2)) for k in [*first, *last] if (m := LAYER.match(k))}
        assert layers == {0, 1}
        assert wte in first and PREFIX + "embedding.position_embeddings.weight" in first
        assert not any(k.startswith(PREFIX + "embedding.") for k in last)
        assert not any("final_layernorm" in k for k in first)
        assert {k for k in last if "final_layernorm" in k} == {PREFIX + "encoder.final_layernorm.weight",
                                                               PREFIX + "encoder.final_layernorm.bias"}
        assert TIED not in first and list(last)[-1] == TIED
        assert torch.equal(last[TIED], first[wte])
        assert last[TIED].shape == (model.padded_vocab // 2, model.n_embd)
        # stage 1's local layer 0 is global layer 2
        qkv = "encoder.layers.{}.self_attention.query_key_value.weight"
        assert torch.equal(last[PREFIX + qkv.format(0)], torch.chunk(full[PREFIX + qkv.format(2)], 2)[t])
        dense = PREFIX + "encoder.layers.1.self_attention.dense.weight"
        assert torch.equal(first[dense], torch.chunk(full[dense], 2, dim=1)[t])
        bias = PREFIX + "encoder.layers.1.self_attention.dense.bias"
        assert torch.equal(first[bias], full[bias])
        for tensor in [*first.values(), *last.values()]:
            assert tensor.untyped_storage().nbytes() == tensor.nbytes  # cloned slices, not views
    assert TIED not in split_for_parallel(full, 2, 2, tied_copy=False)[0, 1]
    assert TIED not in split_for_parallel(full, 2, 1)[0, 0]


def test_split_rejects_uneven_splits() -> None:
    full = consolidated(SyntheticModel(n_embd=32, n_layer=3, n_head=4, vocab_size=1000))  # 1024 rows, 3 layers
    with pytest.raises(ValueError, match="pipeline stages"):
        split_for_parallel(full, 1, 2)
    with pytest.raises(ValueError, match="make_vocab_size_divisible_by"):
        split_for_parallel(full, 3, 1)


def test_vocab_is_padded_to_128_times_tp() -> None:
    assert SyntheticModel(vocab_size=1100).padded_vocab == 1152
    assert SyntheticModel(vocab_size=1100, tensor_model_parallel_size=2).padded_vocab == 1280
    assert SyntheticModel(vocab_size=1000, tensor_model_parallel_size=3).padded_vocab == 1152


def rank_folders(tp: int, pp: int) -> list[str]:
    if pp == 1:
        return [f"mp_rank_{t:02d}" for t in range(tp)]
    return [f"tp_rank_{t:02d}_pp_rank_{p:03d}" for t in range(tp) for p in range(pp)]


def test_rank_folder_names() -> None:
    assert rank_folders(2, 1) == ["mp_rank_00", "mp_rank_01"]
    assert rank_folders(1, 2) == ["tp_rank_00_pp_rank_000", "tp_rank_00_pp_rank_001"]


def load_rank(data: bytes | str) -> dict[str, torch.Tensor]:
    import io

    return torch.load(io.BytesIO(data) if isinstance(data, bytes) else data, weights_only=True)


@pytest.mark.parametrize("kind", ["nemo", "nemo-gzip"])
def test_nemo_tar_members(tmp_path, kind: str) -> None:
    from omegaconf import OmegaConf

    path = tmp_path / "model.nemo"
    c = make_parallel(path, MODEL, tp=2, pp=2, kind=kind, dtype=torch.float32)
    assert c.path == str(path) and c.model.tensor_model_parallel_size == 2 and c.model.padded_vocab == 1280
    with open(path, "rb") as f:
        assert (f.read(2) == b"\x1f\x8b") == (kind == "nemo-gzip")
    with tarfile.open(path, "r:*") as tar:
        files = sorted(m.name for m in tar.getmembers() if m.isfile())
        expected = sorted(["./model_config.yaml", "./4f2a1c9e_tokenizer.model",
                           *(f"./{r}/model_weights.ckpt" for r in rank_folders(2, 2))])
        assert files == expected
        cfg = OmegaConf.create(tar.extractfile("./model_config.yaml").read().decode())
        ranks = {(t, p): load_rank(tar.extractfile(f"./tp_rank_{t:02d}_pp_rank_{p:03d}/model_weights.ckpt").read())
                 for t in range(2) for p in range(2)}
    assert cfg.tensor_model_parallel_size == 2 and cfg.pipeline_model_parallel_size == 2
    assert cfg.make_vocab_size_divisible_by == 128 and cfg.num_layers == 4
    assert cfg.tokenizer.model == "nemo:4f2a1c9e_tokenizer.model"
    full = to_nemo_state_dict(c.hf_state_dict, c.model, 1)
    merged = merge(ranks, 2, 2)
    assert list(merged) == list(full) and all(torch.equal(merged[k], full[k]) for k in full)


def test_same_weights_as_make_checkpoint(tmp_path) -> None:
    c = make_parallel(tmp_path / "m.nemo", MODEL, tp=2, seed=3)
    expected = random_gpt2_state_dict(MODEL, torch.bfloat16, 3)
    assert list(c.hf_state_dict) == list(expected)
    assert all(torch.equal(c.hf_state_dict[k], v) for k, v in expected.items())


def test_extracted_folder(tmp_path) -> None:
    path = tmp_path / "extracted"
    make_parallel(path, MODEL, tp=2, kind="extracted")
    files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)
    assert files == ["4f2a1c9e_tokenizer.model", "model_config.yaml",
                     "mp_rank_00/model_weights.ckpt", "mp_rank_01/model_weights.ckpt"]
    weights = load_rank(str(path / "mp_rank_01" / "model_weights.ckpt"))
    assert weights[PREFIX + "embedding.word_embeddings.weight"].shape == (1280 // 2, 32)
    assert TIED not in weights


def test_ckpt_folder(tmp_path) -> None:
    from omegaconf import DictConfig

    path = tmp_path / "checkpoints"
    c = make_parallel(path, MODEL, tp=2, pp=2, kind="ckpt-folder", dtype=torch.float32)
    files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)
    assert files == [f"{r}/megatron_gpt--step=100-last.ckpt" for r in rank_folders(2, 2)]
    ranks = {}
    for t in range(2):
        for p in range(2):
            ckpt = torch.load(path / f"tp_rank_{t:02d}_pp_rank_{p:03d}" / "megatron_gpt--step=100-last.ckpt",
                              weights_only=False)
            assert ckpt["global_step"] == 100 and ckpt["hparams_type"] is DictConfig
            cfg = ckpt["hyper_parameters"]["cfg"]
            assert cfg.tensor_model_parallel_size == 2 and cfg.pipeline_model_parallel_size == 2
            assert cfg.num_layers == 4 and cfg.tokenizer.model == "nemo:4f2a1c9e_tokenizer.model"
            assert len(ckpt["optimizer_states"][0]["optimizer"]["state"]) == len(ckpt["state_dict"])
            ranks[t, p] = ckpt["state_dict"]
    full = to_nemo_state_dict(c.hf_state_dict, c.model, 1)
    merged = merge(ranks, 2, 2)
    assert list(merged) == list(full) and all(torch.equal(merged[k], full[k]) for k in full)


def test_bad_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="kind"):
        make_parallel(tmp_path / "x", MODEL, tp=2, kind="zip")
    with pytest.raises(ValueError, match="heads"):
        make_parallel(tmp_path / "x", MODEL, tp=3)
    with pytest.raises(ValueError, match="pipeline stages"):
        make_parallel(tmp_path / "x", MODEL, tp=1, pp=3)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> str:
    return make_sentencepiece_model(tmp_path_factory.mktemp("spm") / "tokenizer.model", 1000)


def test_sentencepiece_model(spm_model: str, tmp_path) -> None:
    import sentencepiece as spm
    from transformers import GPTSw3Tokenizer

    sp = spm.SentencePieceProcessor(model_file=spm_model)
    assert sp.get_piece_size() == 1000
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "<|endoftext|>"]
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    again = make_sentencepiece_model(tmp_path / "again.model", 1000)
    with open(spm_model, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()

    tok = GPTSw3Tokenizer(vocab_file=spm_model)
    assert len(tok) == tok.vocab_size == 1000
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    ids = tok("hej på dig, Världen!")["input_ids"]
    assert all(0 <= i < 1000 for i in ids) and tok.unk_token_id not in ids  # byte fallback covers the rest
    assert tok.decode(ids) == "hej på dig, Världen!"


@pytest.mark.parametrize("size", [34, 64, 300])
def test_sentencepiece_small_sizes(tmp_path, size: int) -> None:
    import sentencepiece as spm

    path = make_sentencepiece_model(tmp_path / "t.model", size)
    assert spm.SentencePieceProcessor(model_file=path).get_piece_size() == size
    with pytest.raises(ValueError, match="at least"):
        make_sentencepiece_model(tmp_path / "t.model", 33)


@pytest.mark.parametrize("marker", ["tokenizer_config.json", "config.json"])
def test_auto_tokenizer_from_folder(spm_model: str, tmp_path, monkeypatch, marker: str) -> None:
    import shutil

    from transformers import AutoTokenizer, GPTSw3Tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shutil.copy(spm_model, tmp_path / "spiece.model")
    (tmp_path / marker).write_text(json.dumps({"tokenizer_class": "GPTSw3Tokenizer"}))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(tok, GPTSw3Tokenizer) and len(tok) == 1000
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 2, 3)


def test_tokenizer_artifact(spm_model: str, tmp_path) -> None:
    from omegaconf import OmegaConf

    path = tmp_path / "model.nemo"
    make_parallel(path, MODEL, tp=2, kind="nemo", tokenizer=spm_model)
    with tarfile.open(path) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile() and m.name.endswith("_tokenizer.model")]
        assert len(names) == 1 and re.fullmatch(r"\./[0-9a-f]{8}_tokenizer\.model", names[0])
        with open(spm_model, "rb") as f:
            assert tar.extractfile(names[0]).read() == f.read()
        cfg = OmegaConf.create(tar.extractfile("./model_config.yaml").read().decode())
    assert OmegaConf.to_container(cfg.tokenizer) == {
        "library": "sentencepiece", "type": None, "model": "nemo:" + names[0][2:], "vocab_file": None,
        "merge_file": None}

    folder = tmp_path / "ckpts"
    make_parallel(folder, MODEL, tp=2, kind="ckpt-folder", tokenizer=spm_model, optimizer=False)
    ckpt = torch.load(folder / "mp_rank_00" / "megatron_gpt--step=100-last.ckpt", weights_only=False)
    assert ckpt["hyper_parameters"]["cfg"].tokenizer.model == os.path.abspath(spm_model)
    assert ckpt["optimizer_states"] == []
