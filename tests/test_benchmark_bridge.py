"""The benchmark's `bridge` contender (Megatron-Bridge's own export): the tensor-by-tensor comparison of two outputs
sharded differently, the skip path and its message, the contender's command line, the tracked targets, the
Hugging Face reference and the environment's setup script. Fast, without Megatron-Bridge. With
STREAMCONV_BRIDGE_PYTHON set to a Bridge environment's Python (benchmarks/setup_bridge.sh), the real export of the
committed Bridge fixture and of a tiny synthetic run folder is checked against streamconv's conversion."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from benchmarks import harness
from benchmarks.__main__ import bridge_checks, bridge_exporter, bridge_report, parse_args
from benchmarks.llama import LlamaModel, ensure_hf_reference, ensure_llama

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "benchmarks" / "setup_bridge.sh"
BRIDGE_PYTHON = os.environ.get(harness.BRIDGE_PYTHON_ENV)
needs_bridge = pytest.mark.skipif(not BRIDGE_PYTHON, reason=f"runs Megatron-Bridge's real export: set "
                                  f"{harness.BRIDGE_PYTHON_ENV} to a Bridge environment's Python "
                                  "(bash benchmarks/setup_bridge.sh DIR; DIR/bin/python)")
TINY = dict(hidden=64, heads=4, groups=2, ffn=160, vocab_size=256, n_layer=2, positions=4096)  # bridge062's sizes


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"model.embed_tokens.weight": torch.randn(8, 4, generator=g).to(torch.bfloat16),
            "model.norm.weight": torch.randn(4, generator=g).to(torch.bfloat16),
            "lm_head.weight": torch.randn(8, 4, generator=g).to(torch.bfloat16)}


def write(folder: Path, shards: list[list[str]], model: dict[str, torch.Tensor]) -> Path:
    """`model` saved as the safetensors shards that `shards` name the tensors of, plus a config.json."""
    folder.mkdir(parents=True)
    for i, names in enumerate(shards):
        save_file({n: model[n] for n in names}, folder / f"model-{i:05d}.safetensors")
    (folder / "config.json").write_text(json.dumps({"shards": len(shards)}))
    return folder


def test_outputs_sharded_differently_hold_the_same_tensors(tmp_path):
    model = tensors()
    one = write(tmp_path / "one", [list(model)], model)
    two = write(tmp_path / "two", [["lm_head.weight"], ["model.norm.weight", "model.embed_tokens.weight"]], model)
    a, b = harness.tensor_digests(one), harness.tensor_digests(two)
    assert a == b and a["model.norm.weight"][:2] == ["BF16", [4]]
    assert harness.tensor_differences(a, b, "streamconv", "bridge") == []


@pytest.mark.parametrize("change, why", [
    ("byte", "lm_head.weight: same dtype and shape, different bytes"),
    ("missing", "lm_head.weight only in streamconv's output"),
    ("extra", "extra.weight only in bridge's output"),
    ("dtype", "model.norm.weight: dtype BF16 in streamconv's output, F16 in bridge's"),
    ("shape", "lm_head.weight: shape [8, 4] in streamconv's output, [4, 8] in bridge's"),
])
def test_a_tensor_that_differs_is_named_with_how(tmp_path, change, why):
    model = tensors()
    other = dict(model)
    if change == "byte":
        raw = other["lm_head.weight"].clone()
        raw.view(torch.uint8).view(-1)[5] ^= 1  # one bit of one byte
        other["lm_head.weight"] = raw
    elif change == "missing":
        del other["lm_head.weight"]
    elif change == "extra":
        other["extra.weight"] = torch.zeros(2, dtype=torch.bfloat16)
    elif change == "dtype":  # the same bytes read as another dtype
        other["model.norm.weight"] = other["model.norm.weight"].view(torch.float16)
    else:
        other["lm_head.weight"] = other["lm_head.weight"].reshape(4, 8)
    mine = harness.tensor_digests(write(tmp_path / "mine", [list(model)], model))
    theirs = harness.tensor_digests(write(tmp_path / "theirs", [[n] for n in other], other))
    assert harness.tensor_differences(mine, theirs, "streamconv", "bridge") == [why]


def test_a_tensor_in_two_files_is_an_error(tmp_path):
    model = tensors()
    folder = write(tmp_path / "twice", [list(model), ["lm_head.weight"]], model)
    with pytest.raises(ValueError, match="'lm_head.weight' is in two files"):
        harness.tensor_digests(folder)


def test_rounds_are_compared_one_by_one_and_a_failed_round_is_named():
    same = {"t": ["BF16", [2], "aa"]}
    runs = {"streamconv": [{"tensors": same}, {"tensors": same}, {"tensors": same}],
            "bridge": [{"tensors": same}, {"tensors": {"t": ["BF16", [2], "bb"]}}, {"status": "failed (exit 1)"}]}
    assert harness.round_tensor_differences(runs, "streamconv", "bridge") == [
        "round 2: t: same dtype and shape, different bytes", "round 3: no tensors of bridge's output"]


def test_the_record_keeps_the_verdict_and_a_fingerprint_not_every_digest():
    same = {"t": ["BF16", [2], "aa"]}
    runs = {"streamconv": [{"tensors": same, "other_files": ["config.json"]}],
            "bridge": [{"tensors": same, "other_files": ["config.json", "tokenizer.json"]}]}
    meta = {"bridge": {"python": "/env/bin/python", "hf_reference": "/ref", "versions": {
        "python": "3.12.1", "megatron-bridge": "0.6.2", "megatron-core": "0.19.2", "torch": "2.13.0",
        "transformers": "5.12.1"}}}
    assert bridge_checks(meta, runs) == []
    assert meta["bridge"]["identical"] and meta["bridge"]["tensors"] == 1
    assert "tensors" not in runs["bridge"][0] and runs["bridge"][0]["tensors_sha256"] == runs["streamconv"][0][
        "tensors_sha256"]
    lines = bridge_report(meta)
    assert "Megatron-Bridge 0.6.2 (megatron-core 0.19.2" in lines[0]
    assert lines[1].startswith("streamconv's and bridge's outputs: the same 1 tensors") and "tokenizer.json" in lines[1]

    runs = {"streamconv": [{"tensors": same}], "bridge": [{"tensors": {}}]}  # (the first check took the digests)
    assert bridge_checks(meta, runs) == ["streamconv and bridge: round 1: t only in streamconv's output"]
    assert not meta["bridge"]["identical"] and "DIFFER" in bridge_report(meta)[1]


def test_the_contender_runs_bridge_export_with_the_environments_python():
    contender = harness.bridge_contender("/env/bin/python", Path("/cache/bridge8b-L2.hf-reference"))
    assert contender.name == "bridge" and harness.BRIDGE_EXPORT.is_file()
    assert contender.argv(Path("/cache/bridge8b-L2-tp2.run"), Path("/scratch/bridge")) == [
        "/env/bin/python", str(harness.BRIDGE_EXPORT), "/cache/bridge8b-L2-tp2.run", "/scratch/bridge",
        "--hf-reference", "/cache/bridge8b-L2.hf-reference"]


def test_without_an_environment_the_contender_is_skipped_saying_how_to_build_one(tmp_path, capsys):
    fails = tmp_path / "python"  # an interpreter whose import of Megatron-Bridge fails
    fails.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'megatron'\" >&2\nexit 1\n")
    fails.chmod(0o755)
    for python, why in ((None, "no Megatron-Bridge environment given"),
                        (str(tmp_path / "absent"), "cannot run bridge_export.py --check"),
                        (str(fails), "does not import Megatron-Bridge (ModuleNotFoundError: No module named "
                                     "'megatron')")):
        versions, reason = harness.bridge_check(python)
        assert versions is None and why in reason
        assert "bash benchmarks/setup_bridge.sh DIR" in reason and "--bridge-python DIR/bin/python" in reason
        assert harness.BRIDGE_PYTHON_ENV in reason

    skipped = {}
    args = argparse.Namespace(profile="bridge8b", bridge_python=None)
    assert bridge_exporter(args, tmp_path, LlamaModel(**TINY), skipped) is None
    assert "setup_bridge.sh" in skipped["bridge"] and "bridge skipped: no Megatron-Bridge" in capsys.readouterr().out
    args = argparse.Namespace(profile="llama8b", bridge_python=str(fails))
    assert bridge_exporter(args, tmp_path, LlamaModel(**TINY), skipped) is None
    assert skipped["bridge"] == "Megatron-Bridge's export runs on --profile bridge8b or qwen3moe, not llama8b"


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the check of a Python older than Megatron-Bridge needs")
def test_this_python_is_refused_before_it_imports_anything():
    versions, reason = harness.bridge_check(sys.executable)
    assert versions is None and "Megatron-Bridge needs Python >= 3.12" in reason


def test_the_environment_comes_from_the_option_or_the_variable(monkeypatch):
    monkeypatch.setenv(harness.BRIDGE_PYTHON_ENV, "/from/env/python")
    assert parse_args(["--profile", "bridge8b"]).bridge_python == "/from/env/python"
    assert parse_args(["--profile", "bridge8b", "--bridge-python", "/opt/b/bin/python"]).bridge_python == \
        "/opt/b/bin/python"


def test_streamconv_is_tracked_at_an_eighth_of_bridges_time_and_a_twentieth_of_its_memory():
    def run(wall, rss):
        return {"wall": wall, "throughput": 1 / wall, "peak_rss": rss, "peak_anon": rss, "timeline": []}

    meta = {"started": "x", "profile": "bridge8b", "layers": 2, "git": {}}
    fast = harness.make_record(meta, {"streamconv": [run(2.9, 79e6)] * 3, "bridge": [run(37.8, 6.1e9)] * 3})
    assert [(t["ratio"], t["figure"], t["ceiling"], t["met"]) for t in fast["targets"]] == [
        ("streamconv/bridge", "wall", 0.125, True), ("streamconv/bridge", "peak_rss", 0.05, True)]
    slow = harness.make_record(meta, {"streamconv": [run(5.0, 79e6)] * 3, "bridge": [run(37.8, 1.2e9)] * 3})
    assert [t["met"] for t in slow["targets"]] == [False, False]
    assert "| streamconv/bridge | wall | 0.132 | 0.125 | NO |" in harness.table(slow)


def test_the_hugging_face_reference_is_the_fixtures_with_the_models_sizes(tmp_path):
    model = LlamaModel(hidden=4096, heads=32, groups=8, ffn=14336, vocab_size=128256, n_layer=2, positions=8192)
    folder = ensure_hf_reference(tmp_path / "bridge8b-L2.hf-reference", model)
    config = json.loads((folder / "config.json").read_text())
    assert (config["architectures"], config["hidden_size"], config["num_key_value_heads"], config["head_dim"],
            config["intermediate_size"], config["vocab_size"], config["num_hidden_layers"]) == \
        (["LlamaForCausalLM"], 4096, 8, 128, 14336, 128256, 2)
    fixture = REPO / "tests/fixtures/bridge062/hf"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).read_bytes() == (fixture / name).read_bytes()


def test_the_setup_script_parses_and_says_how_to_get_a_python_312(tmp_path):
    assert subprocess.run(["bash", "-n", str(SETUP)]).returncode == 0
    empty = tmp_path / "empty"  # no python3.12 on PATH, no ~/.pyenv
    empty.mkdir()
    proc = subprocess.run(["/bin/bash", str(SETUP), str(tmp_path / "env")], capture_output=True, text=True,
                          env={"PATH": str(empty), "HOME": str(empty)})
    assert proc.returncode == 1 and not (tmp_path / "env").exists()
    assert proc.stderr.startswith("setup_bridge.sh: no Python 3.12 found") and "pyenv install 3.12" in proc.stderr
    assert "PYTHON312=" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    usage = subprocess.run(["/bin/bash", str(SETUP)], capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: bash benchmarks/setup_bridge.sh DIR")


# ---- with a Megatron-Bridge environment ----------------------------------------------------------------------

@needs_bridge
def test_bridges_export_of_the_fixture_is_streamconvs_conversion_tensor_for_tensor(tmp_path):
    """Megatron-Bridge 0.6.2's own export (bridge_export.py) of the run folder it wrote, its Hugging Face source as
    the reference, holds the tensors streamconv writes from the same folder."""
    import streamconv

    fixture = REPO / "tests/fixtures/bridge062"
    proc = subprocess.run([BRIDGE_PYTHON, str(harness.BRIDGE_EXPORT), str(fixture / "tp1"), str(tmp_path / "bridge"),
                           "--hf-reference", str(fixture / "hf")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    streamconv.convert(fixture / "tp1", tmp_path / "streamconv")
    bridge, mine = harness.tensor_digests(tmp_path / "bridge"), harness.tensor_digests(tmp_path / "streamconv")
    assert len(mine) == 21 and harness.tensor_differences(mine, bridge, "streamconv", "bridge") == []


@needs_bridge
def test_the_bridge_contender_on_a_tiny_synthetic_run_folder_matches_streamconv(tmp_path):
    """The harness's own path on the benchmark writer's Bridge run folder at the fixture's sizes: Bridge's loader
    reads it, both contenders run measured, and their tensors are compared round by round."""
    model = LlamaModel(**TINY)
    src = ensure_llama(tmp_path / "cache", model, 2, bridge=True)
    versions, why = harness.bridge_check(BRIDGE_PYTHON)
    assert why is None and versions["megatron-bridge"] == "0.6.2"
    reference = ensure_hf_reference(tmp_path / "cache" / "bridge8b-L2.hf-reference", model)
    jobs = [(c.name, c, src, model.weight_bytes()) for c in
            harness.contenders(None, ["cpu"], ["streamconv"]) + [harness.bridge_contender(BRIDGE_PYTHON, reference)]]
    runs = harness.run_rounds(jobs, tmp_path / "scratch", 1, False, tensors=("streamconv", "bridge"))
    assert harness.round_tensor_differences(runs, "streamconv", "bridge") == []
    assert len(runs["bridge"][0]["tensors"]) == 21 and "tokenizer.json" in runs["bridge"][0]["other_files"]
    assert runs["bridge"][0]["peak_rss"] > runs["streamconv"][0]["peak_rss"]
