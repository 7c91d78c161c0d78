"""megatron-core checkpoints, written by megatron-core itself (tests/mcore_models.py), converted by streamconv.

The oracles are independent of streamconv: megatron-core's own logits of each model (its forward pass, in fp32 on
the stored weights) against transformers' logits of the converted folder, and every output tensor against torch's
own `dcp_to_torch_save` reading of the checkpoint put through the mapping written out below.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import sys
import tarfile

import pytest
import torch

import streamconv
from benchmarks.launcher import peak_rss_of
from streamconv.errors import ConversionError
from tests import mcore_models
from tests.conftest import run_cli
from tests.test_mcore_writer import _have_megatron_core, whole

if not _have_megatron_core():
    pytest.skip("megatron-core is not installed", allow_module_level=True)

VOCAB = 256  # the writer's embedding rows (a multiple of 128, so no padding)
CASES = {
    "bare_tp1_fp32": dict(layout="bare", dtype="fp32"),
    "bare_tp2": dict(layout="bare", tp=2),
    "bare_tp2pp2": dict(layout="bare", tp=2, pp=2),
    "bare_tp2pp2_fp32": dict(layout="bare", tp=2, pp=2, dtype="fp32"),
    "nemo1_tp2": dict(layout="nemo1", tp=2),
    "nemo1_folder_tp2pp2": dict(layout="nemo1_folder", tp=2, pp=2),
    "nemo1_train_tp2pp2_fp32": dict(layout="nemo1_train", tp=2, pp=2, dtype="fp32"),
    "nemo2_tp2pp2": dict(layout="nemo2", tp=2, pp=2),
    "megatron_lm_tp2": dict(layout="megatron_lm", tp=2),
    "megatron_lm_tp2pp2_fp32": dict(layout="megatron_lm", tp=2, pp=2, dtype="fp32"),
    "legacy_tp1": dict(layout="legacy_container"),
    "legacy_tp2_fp32": dict(layout="legacy_container", tp=2, dtype="fp32"),
    "legacy_pp2": dict(layout="legacy_container", pp=2),
    "bare_tp2_opt": dict(layout="bare", tp=2, optimizer=True),
}
# A layer of hidden 1024 (the largest tensor an MLP weight of 8.4 MB in bf16), for the memory bound.
WIDE = dict(hidden=1024, heads=16, ffn=4096, vocab=2048, layers=8, seq=64)
MEMORY_CASES = {"dist_opt": dict(layout="bare", tp=2, optimizer=True, **WIDE),
                "dist": dict(layout="bare", **WIDE),
                "tiny": dict(layout="bare", layers=1),
                "legacy": dict(layout="legacy_container", **WIDE)}
MiB = 2**20


@pytest.fixture(scope="session")
def cases(mcore_cases):
    return mcore_cases(CASES)


def convert(case, out, **kwargs):
    """The case converted; a bare distributed checkpoint has no hyper-parameters: its head count is given."""
    heads = {"num_heads": case.config["heads"]} if case.config["layout"] == "bare" else {}
    return streamconv.convert(case.checkpoint, out, vocab_size=case.config["vocab"], **heads, **kwargs)


def hf_logits(folder, input_ids):
    from transformers import GPT2LMHeadModel

    model, info = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return model.eval()(input_ids).logits


def output_tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_converted_logits_are_megatron_cores(cases, name, tmp_path):
    case = cases[name]
    result = convert(case, tmp_path / "out")
    assert result.tensors == 2 + 12 * case.config["layers"] + 2
    logits = hf_logits(tmp_path / "out", case.input_ids)
    assert (logits - case.logits_fp32).abs().max().item() < 1e-4
    dtype = torch.float32 if case.config["dtype"] == "fp32" else torch.bfloat16
    assert all(t.dtype == dtype for t in output_tensors(tmp_path / "out").values())


def gpt2_of(sd: dict[str, torch.Tensor], layers: int, heads: int) -> dict[str, torch.Tensor]:
    """The GPT-2 tensors of a megatron-core state_dict with stacked layers, as the tests map them."""
    h = sd["embedding.word_embeddings.weight"].shape[1]
    out = {"transformer.wte.weight": sd["embedding.word_embeddings.weight"],
           "transformer.wpe.weight": sd["embedding.position_embeddings.weight"],
           "transformer.ln_f.weight": sd["decoder.final_layernorm.weight"],
           "transformer.ln_f.bias": sd["decoder.final_layernorm.bias"]}
    layer = {k.removeprefix("decoder.layers."): v for k, v in sd.items() if k.startswith("decoder.layers.")}
    for i in range(layers):
        t = {k: v[i] for k, v in layer.items() if isinstance(v, torch.Tensor)}
        qkv, bias = t["self_attention.linear_qkv.weight"], t["self_attention.linear_qkv.bias"]
        out.update({
            f"transformer.h.{i}.ln_1.weight": t["self_attention.linear_qkv.layer_norm_weight"],
            f"transformer.h.{i}.ln_1.bias": t["self_attention.linear_qkv.layer_norm_bias"],
            # megatron rows (heads, q|k|v, head_dim) -> GPT-2 Conv1D columns (q|k|v, heads, head_dim)
            f"transformer.h.{i}.attn.c_attn.weight": qkv.view(heads, 3, h // heads, h).permute(3, 1, 0, 2)
            .reshape(h, 3 * h),
            f"transformer.h.{i}.attn.c_attn.bias": bias.view(heads, 3, h // heads).permute(1, 0, 2).reshape(-1),
            f"transformer.h.{i}.attn.c_proj.weight": t["self_attention.linear_proj.weight"].t(),
            f"transformer.h.{i}.attn.c_proj.bias": t["self_attention.linear_proj.bias"],
            f"transformer.h.{i}.ln_2.weight": t["mlp.linear_fc1.layer_norm_weight"],
            f"transformer.h.{i}.ln_2.bias": t["mlp.linear_fc1.layer_norm_bias"],
            f"transformer.h.{i}.mlp.c_fc.weight": t["mlp.linear_fc1.weight"].t(),
            f"transformer.h.{i}.mlp.c_fc.bias": t["mlp.linear_fc1.bias"],
            f"transformer.h.{i}.mlp.c_proj.weight": t["mlp.linear_fc2.weight"].t(),
            f"transformer.h.{i}.mlp.c_proj.bias": t["mlp.linear_fc2.bias"],
        })
    return out


@pytest.mark.parametrize("name", ["bare_tp2pp2", "bare_tp2pp2_fp32", "nemo2_tp2pp2", "megatron_lm_tp2",
                                  "bare_tp2_opt"])
def test_every_tensor_equals_torchs_reading_through_the_tests_mapping(cases, name, tmp_path):
    case = cases[name]
    prefix = mcore_models.LAYOUTS[case.config["layout"]].prefix
    expected = gpt2_of(whole(_dist_folder(case), prefix), case.config["layers"], case.config["heads"])
    convert(case, tmp_path / "out")
    got = output_tensors(tmp_path / "out")
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(bits(got[key]), bits(tensor.contiguous())), key


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _dist_folder(case):
    """The distributed checkpoint folder of a case (the Megatron-LM one inside the tracker's folder)."""
    if case.config["layout"] == "megatron_lm":
        return case.checkpoint / f"iter_{mcore_models.ITERATION:07d}"
    return case.checkpoint / "weights" if case.config["layout"] == "nemo2" else case.checkpoint


def test_a_gzip_nemo_with_a_distributed_checkpoint_is_extracted_and_converted(cases, tmp_path):
    case = cases["nemo1_tp2"]
    gz = tmp_path / "model.nemo"
    with open(case.checkpoint, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    result = streamconv.convert(gz, tmp_path / "out", vocab_size=VOCAB)
    assert "extracted from the gzip archive" in result.note
    assert (hf_logits(tmp_path / "out", case.input_ids) - case.logits_fp32).abs().max().item() < 1e-4
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".streamconv-nemo-")]


def test_the_nemo_tokenizer_is_shipped_and_sets_the_vocabulary(cases, tmp_path):
    case = cases["nemo1_tp2"]
    result = streamconv.convert(case.checkpoint, tmp_path / "out")  # no --vocab-size: the tokenizer's
    assert result.config["vocab_size"] == VOCAB
    assert os.path.exists(tmp_path / "out" / "spiece.model")


def test_a_nemo2_weights_folder_reads_its_context(cases, tmp_path):
    case = cases["nemo2_tp2pp2"]
    result = streamconv.convert(case.checkpoint / "weights", tmp_path / "out", vocab_size=VOCAB)
    assert result.config["n_head"] == case.config["heads"]  # (from context/model.yaml: no --num-heads)


def test_megatron_lm_converts_the_iteration_its_tracker_names(cases, tmp_path):
    case = cases["megatron_lm_tp2"]
    stale = case.checkpoint / f"iter_{mcore_models.STALE_ITERATION:07d}"
    convert(case, tmp_path / "tracked")
    streamconv.convert(stale, tmp_path / "stale", vocab_size=VOCAB)
    tracked, old = output_tensors(tmp_path / "tracked"), output_tensors(tmp_path / "stale")
    assert torch.equal(tracked["transformer.wte.weight"], -old["transformer.wte.weight"])


def test_the_cli_converts_a_distributed_checkpoint_and_verify_agrees(cases, tmp_path):
    case = cases["nemo2_tp2pp2"]
    done = run_cli("--checkpoint-path", str(case.checkpoint), "--save-path", str(tmp_path / "out"),
                   "--vocab-size", str(VOCAB), "--quiet")
    assert done.returncode == 0, done.stderr
    verified = run_cli("--verify", "--checkpoint-path", str(case.checkpoint), "--save-path", str(tmp_path / "out"),
                       "--quiet")
    assert verified.returncode == 0 and "OK" in verified.stdout, verified.stdout + verified.stderr


# --- the zarr backend, from a fixture of its documented layout ----------------------------------------------------

def zarr_copy(case, root, compressor=None, chunks_of=None):
    """The case's weights rewritten as megatron-core's zarr backend lays them out: a folder per key, chunks of
    one layer and one tensor-parallel slice (as in the torch_dist checkpoint; `chunks_of` may say others), raw
    little-endian bytes."""
    from tests.test_zarr import write_array

    index = pickle.loads((case.checkpoint / ".metadata").read_bytes())  # (trusted: megatron wrote it)
    sd = whole(case.checkpoint)
    root.mkdir()
    for fqn, entry in index.state_dict_metadata.items():
        if fqn in sd and isinstance(sd[fqn], torch.Tensor):
            chunks = (chunks_of or {}).get(fqn, tuple(entry.chunks[0].sizes))
            write_array(root, fqn, sd[fqn], chunks, **({"compressor": compressor} if compressor else {}))
    (root / "metadata.json").write_text('{"sharded_backend": "zarr", "sharded_backend_version": 1}')
    (root / "common.pt").write_bytes((case.checkpoint / "common.pt").read_bytes())
    return root


def test_a_zarr_checkpoint_converts_to_megatron_cores_logits(cases, tmp_path):
    case = cases["bare_tp2pp2"]
    folder = zarr_copy(case, tmp_path / "zarr")
    streamconv.convert(folder, tmp_path / "out", vocab_size=VOCAB, num_heads=4)
    assert (hf_logits(tmp_path / "out", case.input_ids) - case.logits_fp32).abs().max().item() < 1e-4
    convert(case, tmp_path / "dcp")
    for name in ("model.safetensors",):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "dcp" / name).read_bytes()


def test_an_embedding_in_column_chunks_keeps_every_column_of_the_vocabulary(cases, tmp_path):
    """Chunks side by side: the vocabulary's rows are cut from each of them (the rest of the model as it is)."""
    case = cases["bare_tp2"]
    folder = zarr_copy(case, tmp_path / "zarr", chunks_of={"model.embedding.word_embeddings.weight": (256, 32)})
    streamconv.convert(folder, tmp_path / "columns", vocab_size=200, num_heads=4)
    streamconv.convert(case.checkpoint, tmp_path / "rows", vocab_size=200, num_heads=4)
    got, expected = output_tensors(tmp_path / "columns"), output_tensors(tmp_path / "rows")
    assert got["transformer.wte.weight"].shape == (200, 64)
    assert all(torch.equal(bits(got[k]), bits(expected[k])) for k in expected)


# --- refusals: one line, exit 2, nothing written -------------------------------------------------------------------

def refused(checkpoint, tmp_path, *extra) -> str:
    out = tmp_path / "out"
    done = run_cli("--checkpoint-path", str(checkpoint), "--save-path", str(out), "--vocab-size", str(VOCAB),
                   "--quiet", *extra)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".out")]
    return done.stderr


def copied(case, tmp_path):
    return shutil.copytree(_dist_folder(case), tmp_path / "copy")


def test_a_missing_distcp_file_is_named(cases, tmp_path):
    folder = copied(cases["bare_tp2pp2"], tmp_path)
    os.remove(folder / "__3_0.distcp")
    assert "__3_0.distcp is missing" in refused(folder, tmp_path)


def test_chunks_that_do_not_tile_are_refused(cases, tmp_path):
    folder = copied(cases["bare_tp2"], tmp_path)
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    metadata.state_dict_metadata["model.decoder.layers.mlp.linear_fc1.weight"].chunks.pop()
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    assert "leave a gap" in refused(folder, tmp_path)


def test_a_truncated_metadata_is_refused(cases, tmp_path):
    folder = copied(cases["bare_tp2"], tmp_path)
    os.truncate(folder / ".metadata", os.path.getsize(folder / ".metadata") // 2)
    assert "truncated or damaged" in refused(folder, tmp_path)


class Custom:
    """A class of the training code, not importable where streamconv runs."""


class Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_hostile_metadata_runs_nothing(cases, tmp_path):
    folder = copied(cases["bare_tp2"], tmp_path)
    marker = tmp_path / "ran"
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    metadata.planner_data = Hostile(marker)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    assert "posix.system" in refused(folder, tmp_path) and not marker.exists()


def test_a_hostile_common_pt_runs_nothing(cases, tmp_path):
    folder = copied(cases["nemo1_train_tp2pp2_fp32"], tmp_path)
    marker = tmp_path / "ran"
    common = torch.load(folder / "common.pt", weights_only=False)  # (trusted: megatron wrote it)
    common["hyper_parameters"] = {"cfg": Hostile(marker)}
    torch.save(common, folder / "common.pt")
    assert "posix.system" in refused(folder, tmp_path) and not marker.exists()
    common["hyper_parameters"] = {"cfg": {"num_attention_heads": 4}}
    common["loops"] = Hostile(marker)  # elsewhere, never built nor needed: still a tampered file
    torch.save(common, folder / "common.pt")
    assert "reference to posix.system" in refused(folder, tmp_path) and not marker.exists()
    common["loops"] = {"custom": Custom()}  # an unknown harmless class stays an inert placeholder
    torch.save(common, folder / "common.pt")
    streamconv.convert(folder, tmp_path / "fine", vocab_size=VOCAB)


def test_a_dangerous_callable_in_megatron_lm_args_is_refused_though_never_used(cases, tmp_path):
    """`args` holds megatron's enums and torch dtypes (inert placeholders, converted today) and here `os.system`
    as a plain value: never called, never read, yet only an attack pickles it."""
    folder = copied(cases["megatron_lm_tp2"], tmp_path)
    common = torch.load(folder / "common.pt", weights_only=False)  # (trusted: megatron wrote it)
    common["args"].exit_signal_handler = os.system
    torch.save(common, folder / "common.pt")
    message = refused(folder, tmp_path)
    assert "common.pt contains a pickled reference to posix.system" in message and "tampered" in message


def test_a_compressed_zarr_checkpoint_is_refused_by_name(cases, tmp_path):
    folder = zarr_copy(cases["bare_tp2"], tmp_path / "zarr", compressor={"id": "blosc", "cname": "lz4", "clevel": 5,
                                                                         "shuffle": 1, "blocksize": 0})
    assert "blosc" in refused(folder, tmp_path)


@pytest.mark.parametrize("edit, named", [
    ({"position_embedding_type": "rope"}, "LayerNorm, a plain MLP, rotary positions, multi-head attention, biases"),
    ({"normalization": "rmsnorm", "activation": "swiglu"}, "RMSNorm, a gated MLP, learned positions"),
    ({"share_embeddings_and_output_weights": False},  # (the tensors say tied: a contradiction)
     "the cfg says share_embeddings_and_output_weights False, but the checkpoint has no 'model.output_layer.weight'"),
    ({"activation": "squared-relu"}, "the activation squared-relu"),
])
def test_a_model_of_no_known_family_is_refused_naming_its_features(cases, tmp_path, edit, named):
    import yaml

    folder = shutil.copytree(cases["nemo1_folder_tp2pp2"].checkpoint, tmp_path / "nemo")
    cfg = yaml.safe_load((folder / "model_config.yaml").read_text())
    cfg.update(edit)
    (folder / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    assert named in refused(folder, tmp_path)


def test_grouped_query_attention_is_refused_from_the_shapes(cases, tmp_path):
    """A model whose QKV rows are not 3 x hidden, whatever its cfg says."""
    folder = copied(cases["bare_tp1_fp32"], tmp_path)
    sd = whole(folder)
    sd["model.decoder.layers.self_attention.linear_qkv.weight"] = sd[
        "model.decoder.layers.self_attention.linear_qkv.weight"][:, :128].contiguous()  # q + one k, v group
    sd["model.decoder.layers.self_attention.linear_qkv.bias"] = sd[
        "model.decoder.layers.self_attention.linear_qkv.bias"][:, :128].contiguous()
    shutil.rmtree(folder)
    import torch.distributed.checkpoint as dcp

    dcp.save({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, checkpoint_id=str(folder))
    assert "LayerNorm, a plain MLP, learned positions, grouped-query attention" in refused(folder, tmp_path,
                                                                                          "--num-heads", "4")


def test_stacked_layers_without_elements_are_refused_at_once(tmp_path):
    """A .zarray of a few hundred bytes saying three million empty layers: refused before anything is built."""
    from tests.test_zarr import write_array

    folder = tmp_path / "zarr"
    write_array(folder, "model.decoder.layers.mlp.linear_fc2.bias", torch.zeros(3_000_000, 0), (1, 0))
    write_array(folder, "model.embedding.word_embeddings.weight", torch.zeros(VOCAB, 8), (VOCAB, 8))
    (folder / "metadata.json").write_text('{"sharded_backend": "zarr"}')
    assert "stacked layers" in refused(folder, tmp_path, "--num-heads", "2")


def test_a_vector_where_a_matrix_belongs_is_refused(tmp_path):
    from tests.test_zarr import write_array

    folder = tmp_path / "zarr"
    write_array(folder, "model.embedding.word_embeddings.weight", torch.zeros(VOCAB), (VOCAB,))
    (folder / "metadata.json").write_text('{"sharded_backend": "zarr"}')
    assert "not a matrix" in refused(folder, tmp_path, "--num-heads", "2")


def test_a_file_of_model_weights_stored_twice_in_a_nemo_is_refused(cases, tmp_path):
    nemo = tmp_path / "twice.nemo"
    shutil.copy(cases["nemo1_tp2"].checkpoint, nemo)
    with tarfile.open(nemo, "a") as tar:
        tar.add(cases["nemo1_folder_tp2pp2"].checkpoint / "model_weights" / "metadata.json",
                "./model_weights/metadata.json")
    assert "twice" in refused(nemo, tmp_path)
    gz = tmp_path / "twice-gz.nemo"
    with open(nemo, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert "twice" in refused(gz, tmp_path)


def test_a_nemo2_context_linked_from_elsewhere_is_refused(cases, tmp_path):
    folder = shutil.copytree(cases["nemo2_tp2pp2"].checkpoint, tmp_path / "nemo2")
    shutil.move(folder / "context", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", folder / "context")
    assert "symbolic link" in refused(folder, tmp_path)


def test_a_tracker_naming_a_missing_iteration_is_refused(cases, tmp_path):
    folder = shutil.copytree(cases["megatron_lm_tp2"].checkpoint, tmp_path / "mlm")
    (folder / "latest_checkpointed_iteration.txt").write_text("20\n")
    assert "names iteration 20" in refused(folder, tmp_path)
    (folder / "latest_checkpointed_iteration.txt").write_text("../../etc\n")
    assert "not an iteration number" in refused(folder, tmp_path)


# --- memory: optimizer state in the same files is never read -------------------------------------------------------

def test_optimizer_state_in_the_same_files_leaves_the_peak_where_the_weights_put_it(mcore_cases, tmp_path):
    """The bound test_memory.py holds a .ckpt to (a baseline plus a few largest tensors), with fp32 optimizer
    state of 6 x the weights in the same .distcp files; the output equals the legacy container's of the model."""
    made = mcore_cases(MEMORY_CASES)
    files = lambda case: sum(f.stat().st_size for f in [case.checkpoint, *case.checkpoint.rglob("*")]  # noqa: E731
                             if f.is_file())
    assert files(made["dist_opt"]) > 4 * files(made["dist"])  # exp_avg, exp_avg_sq, fp32 masters
    peaks = {name: peak_rss_of([sys.executable, "-m", "streamconv", "--checkpoint-path", str(case.checkpoint),
                                "--save-path", str(tmp_path / name), "--vocab-size", str(case.config["vocab"]),
                                "--num-heads", str(case.config["heads"]), "--quiet"])
             for name, case in made.items() if name != "legacy"}
    print({name: f"{peak / MiB:.0f} MiB" for name, peak in peaks.items()},
          {name: f"{files(case) / MiB:.0f} MiB" for name, case in made.items()})
    largest = 4096 * 1024 * 2
    assert peaks["dist_opt"] < peaks["tiny"] + 4 * largest + 48 * MiB, peaks
    assert peaks["dist_opt"] < 1.1 * peaks["dist"], peaks
    convert(made["legacy"], tmp_path / "legacy")
    assert (tmp_path / "dist_opt" / "model.safetensors").read_bytes() == \
        (tmp_path / "legacy" / "model.safetensors").read_bytes()


def test_the_family_is_read_from_the_tensors_without_a_cfg():
    from streamconv.families import base, choose, megatron

    shapes = {"embedding.word_embeddings.weight": (256, 64),
              "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": (64,),
              "decoder.layers.0.self_attention.linear_qkv.weight": (192, 64),
              "decoder.layers.0.mlp.linear_fc1.weight": (512, 64), "decoder.layers.0.mlp.linear_fc2.weight": (64, 256)}
    no_cfg = lambda key, default=None: default  # noqa: E731
    found = set(base.traits(no_cfg, shapes, megatron.names_of(shapes)))
    assert found == {base.RMS_NORM, base.GATED, base.ROTARY, base.NO_BIASES, base.MULTI_HEAD, base.TIED}
    assert choose(no_cfg, shapes).name == "llama"
    shapes["decoder.layers.0.self_attention.linear_qkv.bias"] = (192,)  # biases: neither family
    with pytest.raises(ConversionError, match="RMSNorm, a gated MLP, rotary positions, multi-head attention, biases"):
        choose(no_cfg, shapes)
