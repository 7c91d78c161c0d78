"""The megatron-core checkpoint writer (tests/mcore_models.py) itself: resharding keeps every weight, the layouts
hold what they claim, the logits are deterministic and are GPT-2's. Nothing of streamconv is used here."""

from __future__ import annotations

import importlib.util
import tarfile

import pytest
import torch

from tests import mcore_models


def _have_megatron_core() -> bool:
    """Without importing it (5 s, and it would be pytest's process): find_spec imports only `megatron`."""
    try:
        return importlib.util.find_spec("megatron.core") is not None
    except ImportError:  # no `megatron` package at all
        return False


if not _have_megatron_core():
    pytest.skip("megatron-core is not installed", allow_module_level=True)

CASES = {
    "tp1": dict(layout="bare"),
    "tp2pp2": dict(layout="bare", tp=2, pp=2),
    "tp2pp2_opt": dict(layout="bare", tp=2, pp=2, optimizer=True),
    "megatron_lm": dict(layout="megatron_lm", tp=2, pp=2),
    "nemo1": dict(layout="nemo1", tp=2),
    "nemo1_train": dict(layout="nemo1_train", pp=2),
    "nemo2": dict(layout="nemo2", tp=2),
    "legacy": dict(layout="legacy_container"),
    "legacy_tp2": dict(layout="legacy_container", tp=2),
    "legacy_pp2": dict(layout="legacy_container", pp=2),
    "fp32_legacy": dict(layout="legacy_container", dtype="fp32"),
}


@pytest.fixture(scope="module")
def cases(mcore_cases):
    return mcore_cases(CASES)


_WHOLE: dict = {}


def whole(folder, prefix: str = "") -> dict:
    """A distributed checkpoint read whole by torch's own converter, `prefix` stripped from the model's keys."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if folder not in _WHOLE:
        with tempfile.TemporaryDirectory() as tmp:  # (not beside the checkpoint: the cases stay as written)
            dcp_to_torch_save(str(folder), f"{tmp}/whole.pt")
            _WHOLE[folder] = torch.load(f"{tmp}/whole.pt", weights_only=False)
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in _WHOLE[folder].items()}


def tensors(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def test_resharded_checkpoint_holds_the_tp1_weights(cases):
    one, four = tensors(whole(cases["tp1"].checkpoint)), tensors(whole(cases["tp2pp2"].checkpoint))
    assert one.keys() == four.keys()
    assert "model.decoder.layers.self_attention.linear_qkv.weight" in one  # layers stacked, layer norms renamed
    assert one["model.decoder.layers.self_attention.linear_qkv.weight"].shape == (4, 192, 64)
    for k in one:
        assert torch.equal(one[k], four[k]), k
        assert one[k].dtype == torch.bfloat16, k  # Float16Module: every parameter bf16
    assert not any("output_layer" in k for k in one)  # tied: the last stage's copy is not saved


def test_pipeline_stages_save_global_layer_offsets(cases):
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(cases["tp2pp2"].checkpoint)).read_metadata()
    qkv = md.state_dict_metadata["model.decoder.layers.self_attention.linear_qkv.weight"]
    assert sorted((c.offsets[0], c.offsets[1]) for c in qkv.chunks) == [(i, r) for i in range(4) for r in (0, 96)]
    assert sorted({s.relative_path for s in md.storage_data.values()}) == [
        f"__{r}_{t}.distcp" for r in range(4) for t in range(2)]


def test_optimizer_state_is_fp32_sharded_like_the_weights_and_large(cases):
    sd = tensors(whole(cases["tp2pp2_opt"].checkpoint))
    weights = {k: v for k, v in sd.items() if k.startswith("model.")}
    for name in ("exp_avg", "exp_avg_sq", "fp32_param"):
        for k, w in weights.items():
            state = sd[f"optimizer.state.{name}.{k}"]
            assert state.dtype == torch.float32 and state.shape == w.shape, (name, k)
    for k, w in weights.items():  # fp32 masters one Adam step (lr 1e-4) past the bf16 weights: close, not equal
        master = sd[f"optimizer.state.fp32_param.{k}"]
        assert torch.allclose(master, w.float(), atol=2e-4, rtol=0) and not torch.equal(master, w.float()), k
    weight_bytes = sum(v.numel() * v.element_size() for v in weights.values())
    optimizer_bytes = sum(v.numel() * v.element_size() for k, v in sd.items() if k.startswith("optimizer."))
    assert optimizer_bytes >= 3 * weight_bytes


def test_logits_are_deterministic_for_the_seed(cases, tmp_path):
    again, other = mcore_models.write_many(tmp_path, [dict(layout="bare"), dict(layout="bare", seed=99)])
    first = cases["tp1"]
    assert torch.equal(again.input_ids, first.input_ids) and torch.equal(again.logits, first.logits)
    assert not torch.allclose(other.logits, first.logits, atol=1e-2)
    assert first.logits.dtype == torch.float32 and first.logits.shape == (1, first.input_ids.shape[1], 256)
    assert (first.logits - first.logits_fp32).abs().max() < 0.1  # bf16 compute against fp32 compute
    assert first.logits.abs().max() > 1  # init std 0.1: attention far from uniform, a wrong mapping shows


def _gpt2_logits(sd: dict, config: dict, input_ids: torch.Tensor) -> torch.Tensor:
    """transformers' GPT-2 with megatron-core's plain (local spec) state_dict, in fp32: the oracle's cross-check."""
    from transformers import GPT2Config, GPT2LMHeadModel

    h, heads = config["hidden"], config["heads"]

    def g(k: str) -> torch.Tensor:
        return sd["model." + k].float()

    def regroup(t: torch.Tensor) -> torch.Tensor:  # megatron's [heads, (q, k, v), head_dim] to [(q, k, v), ...]
        return t.view(heads, 3, h // heads, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    hf = {"transformer.wte.weight": g("embedding.word_embeddings.weight"),
          "transformer.wpe.weight": g("embedding.position_embeddings.weight"),
          "transformer.ln_f.weight": g("decoder.final_layernorm.weight"),
          "transformer.ln_f.bias": g("decoder.final_layernorm.bias")}
    for i in range(config["layers"]):
        m, t = f"decoder.layers.{i}.", f"transformer.h.{i}."
        hf.update({
            t + "ln_1.weight": g(m + "input_layernorm.weight"), t + "ln_1.bias": g(m + "input_layernorm.bias"),
            t + "ln_2.weight": g(m + "pre_mlp_layernorm.weight"), t + "ln_2.bias": g(m + "pre_mlp_layernorm.bias"),
            t + "attn.c_attn.weight": regroup(g(m + "self_attention.linear_qkv.weight")).t(),
            t + "attn.c_attn.bias": regroup(g(m + "self_attention.linear_qkv.bias")),
            t + "attn.c_proj.weight": g(m + "self_attention.linear_proj.weight").t(),
            t + "attn.c_proj.bias": g(m + "self_attention.linear_proj.bias"),
            t + "mlp.c_fc.weight": g(m + "mlp.linear_fc1.weight").t(),
            t + "mlp.c_fc.bias": g(m + "mlp.linear_fc1.bias"),
            t + "mlp.c_proj.weight": g(m + "mlp.linear_fc2.weight").t(),
            t + "mlp.c_proj.bias": g(m + "mlp.linear_fc2.bias")})
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=config["vocab"], n_positions=config["seq"], n_embd=h, n_layer=config["layers"], n_head=heads,
        n_inner=config["ffn"], activation_function="gelu", layer_norm_epsilon=1e-5, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)).eval()
    model.load_state_dict(hf, strict=False)  # lm_head: tied to wte
    with torch.no_grad():
        return model(input_ids).logits


def _legacy_weights(case, member: str = "./model_weights.ckpt") -> dict:
    with tarfile.open(case.checkpoint) as tar:
        return torch.load(tar.extractfile(member), weights_only=False)


@pytest.mark.parametrize("name", ["fp32_legacy", "legacy"])
def test_the_oracle_is_gpt2(cases, name):
    case = cases[name]
    hf = _gpt2_logits(_legacy_weights(case), case.config, case.input_ids)
    assert (hf - case.logits_fp32).abs().max() < 2e-5
    if case.config["dtype"] == "fp32":
        assert torch.equal(case.logits, case.logits_fp32)


def test_legacy_container_plain_state_dicts(cases):
    full = _legacy_weights(cases["legacy"])
    assert "model.decoder.layers.0.input_layernorm.weight" in full  # the local spec's own names, unstacked
    assert full["model.decoder.layers.0.self_attention.linear_qkv._extra_state"] is None
    ranks = [_legacy_weights(cases["legacy_tp2"], f"./mp_rank_{r:02d}/model_weights.ckpt") for r in range(2)]
    qkv = "model.decoder.layers.1.self_attention.linear_qkv.weight"
    assert torch.equal(torch.cat([r[qkv] for r in ranks]), full[qkv])
    proj = "model.decoder.layers.1.self_attention.linear_proj.weight"
    assert torch.equal(torch.cat([r[proj] for r in ranks], dim=1), full[proj])
    last = _legacy_weights(cases["legacy_pp2"], "./tp_rank_00_pp_rank_001/model_weights.ckpt")
    # PP stages number their layers locally here; the last stage holds the tied output layer's copy
    assert torch.equal(last["model.decoder.layers.0.mlp.linear_fc1.weight"],
                       full["model.decoder.layers.2.mlp.linear_fc1.weight"])
    assert torch.equal(last["model.output_layer.weight"], full["model.embedding.word_embeddings.weight"])


def test_container_files(cases):
    import yaml

    with tarfile.open(cases["nemo1"].checkpoint) as tar:  # plain tar ("r:" fails on a compressed one)
        names = tar.getnames()
        cfg = yaml.safe_load(tar.extractfile("./model_config.yaml"))
    assert "./model_weights/.metadata" in names and "./model_weights/common.pt" in names
    assert cfg["mcore_gpt"] is True and cfg["tensor_model_parallel_size"] == 2 and cfg["num_layers"] == 4

    train = cases["nemo1_train"].checkpoint
    assert train.name == "megatron_gpt--step=10-last" and (train / ".metadata").exists()
    common = torch.load(train / "common.pt", weights_only=False)
    assert common["hyper_parameters"]["cfg"]["pipeline_model_parallel_size"] == 2 and common["global_step"] == 10

    nemo2 = cases["nemo2"].checkpoint
    assert {p.name for p in (nemo2 / "context").iterdir()} == {"model.yaml", "io.json"}
    assert yaml.safe_load((nemo2 / "context" / "model.yaml").read_text())["config"]["num_layers"] == 4
    assert "module.embedding.word_embeddings.weight" in whole(nemo2 / "weights")

    mlm = cases["megatron_lm"].checkpoint
    assert (mlm / "latest_checkpointed_iteration.txt").read_text() == "10"
    common = torch.load(mlm / "iter_0000010" / "common.pt", weights_only=False)
    assert common["args"].tensor_model_parallel_size == 2 and common["checkpoint_version"] == 3.0
    new, stale = tensors(whole(mlm / "iter_0000010")), tensors(whole(mlm / "iter_0000005"))
    one = tensors(whole(cases["tp1"].checkpoint, "model."))
    assert "embedding.word_embeddings.weight" in new  # no prefix
    for k, v in one.items():
        assert torch.equal(new[k], v) and torch.equal(stale[k], -v), k
