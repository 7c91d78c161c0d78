"""The Hugging Face tokenizer a NeMo 2.0 checkpoint ships (context/nemo_tokenizer/) is data: a key that names a
file, a module or code is refused before anything is copied or loaded, so are counts no real tokenizer has; the
load check runs in a child process that a timeout or SIGTERM ends, and whatever the load raises is one note."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import streamconv
from streamconv import tokenizer
from streamconv.errors import ConversionError
from tests.conftest import run_cli
from tests.test_mcore import refused
from tests.test_mcore_writer import _have_megatron_core

NEMO2 = dict(groups=2, layout="nemo2", tp=2, pp=2)  # (test_llama's gqa_nemo2_tp2pp2: written once a session)
needs_megatron_core = pytest.mark.skipif(not _have_megatron_core(), reason="megatron-core is not installed")


@pytest.fixture(scope="module")
def nemo2(mcore_cases):
    return mcore_cases({"nemo2": NEMO2})["nemo2"].checkpoint


def shipping(nemo2, tmp_path, name: str, edit) -> str:
    """A copy of the NeMo 2.0 checkpoint whose tokenizer file `name` is `edit(its JSON)`; returns its path."""
    folder = shutil.copytree(nemo2, tmp_path / "nemo2", symlinks=True)
    path = folder / "context" / "nemo_tokenizer" / name
    content = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(edit(content)))
    return folder


def updated(**keys):
    return lambda content: {**content, **keys}


@needs_megatron_core
@pytest.mark.parametrize("name, key, value", [
    ("tokenizer_config.json", "gguf_file", "{secret}"),
    ("tokenizer_config.json", "fast_tokenizer_files", ["{secret}"]),
    ("tokenizer_config.json", "auto_map", {"AutoTokenizer": [None, "evil.Tokenizer"]}),
    ("tokenizer_config.json", "tokenizer_file", "{secret}"),
    ("tokenizer_config.json", "vocab_file", "{secret}"),
    ("tokenizer_config.json", "init_inputs", ["{secret}"]),
    ("tokenizer_config.json", "trust_remote_code", True),
    ("special_tokens_map.json", "merges_file", "{secret}"),
    ("tokenizer_config.json", "sudachi_kwargs", {"sudachi_dict_type": "{secret}"}),
])
def test_a_key_naming_a_file_or_code_is_refused(nemo2, tmp_path, name, key, value):
    secret = tmp_path / "secret.json"
    value = json.loads(json.dumps(value).replace("{secret}", str(secret)))
    message = refused(shipping(nemo2, tmp_path, name, updated(**{key: value})), tmp_path)
    assert f"nemo_tokenizer/{name}: the key {key!r} names a file, a module, code or a loader option" in message
    assert "fix or remove that file in the checkpoint" in message


@needs_megatron_core
@pytest.mark.parametrize("key, value, said", [
    ("some_new_setting", 1, "is not one streamconv knows to be plain data"),
    ("sp_model_kwargs", {"model_file": "/etc/passwd"}, "holds {'model_file': '/etc/passwd'}"),
    ("tokenizer_class", "../../evil", "holds '../../evil'"),
    ("tokenizer_class", "LlamaForCausalLM", "holds 'LlamaForCausalLM'"),  # (AutoTokenizer would build the model)
    ("pad_token", {"content": "<pad>", "vocab_file": "x"}, "the key 'pad_token' holds"),
    ("extra_special_tokens", {"encode": "<e>"}, "the key 'extra_special_tokens' holds {'encode': '<e>'}"),
])
def test_a_key_or_value_not_known_to_be_data_is_refused(nemo2, tmp_path, key, value, said):
    message = refused(shipping(nemo2, tmp_path, "tokenizer_config.json", updated(**{key: value})), tmp_path)
    assert f"{key!r}" in message and said in message


@needs_megatron_core
def test_200k_extra_special_tokens_are_refused_at_once(nemo2, tmp_path):
    folder = shipping(nemo2, tmp_path, "tokenizer_config.json",
                      updated(extra_special_tokens=[f"<x{i}>" for i in range(200_000)]))
    started = time.monotonic()
    message = refused(folder, tmp_path)
    assert time.monotonic() - started < 60  # (loading them took minutes: they are counted, never loaded)
    assert f"'extra_special_tokens' holds 200000 tokens, more than {tokenizer.MAX_SPECIAL}" in message


@pytest.mark.parametrize("limit, edit, said", [
    ("MAX_VOCAB", lambda t: {**t, "model": {**t["model"], "vocab": {f"w{i}": i for i in range(11)}}},
     "11 vocabulary entries, more than 10"),
    ("MAX_MERGES", lambda t: {**t, "model": {**t["model"], "merges": ["a b"] * 11}}, "11 merges, more than 10"),
    ("MAX_ADDED", lambda t: {**t, "added_tokens": [{"id": 0, "content": "a"}] * 11}, "11 added tokens, more than 10"),
])
def test_tokenizer_json_counts_are_bounded(tmp_path, monkeypatch, limit, edit, said):
    saved = real_tokenizer(tmp_path)
    files = {"tokenizer.json": json.dumps(edit(json.loads(saved["tokenizer.json"]))).encode()}
    monkeypatch.setattr(tokenizer, limit, 11)
    tokenizer.check_hf_files(files, "nemo_tokenizer")  # (as many as the limit: copied)
    monkeypatch.setattr(tokenizer, limit, 10)
    with pytest.raises(ConversionError, match=said):
        tokenizer.check_hf_files(files, "nemo_tokenizer")


def real_tokenizer(tmp_path) -> dict[str, bytes]:
    """The files transformers' save_pretrained writes for a tokenizer with added and special tokens and a chat
    template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<tool>"], "pad_token": "<pad>"})
    fast.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    fast.save_pretrained(tmp_path / "saved")
    return {name: (tmp_path / "saved" / name).read_bytes() for name in tokenizer.HF_TOKENIZER_FILES
            if (tmp_path / "saved" / name).exists()}


def test_what_save_pretrained_writes_passes(tmp_path):
    files = real_tokenizer(tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(files)
    tokenizer.check_hf_files(files, "nemo_tokenizer")  # raises if refused
    llama3 = {"added_tokens_decoder": {"128000": {"content": "<|begin_of_text|>", "lstrip": False, "normalized": False,
                                                  "rstrip": False, "single_word": False, "special": True}},
              "bos_token": "<|begin_of_text|>", "chat_template": "{{ bos_token }}",
              "clean_up_tokenization_spaces": True, "eos_token": "<|end_of_text|>",
              "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    llama2 = {"add_bos_token": True, "add_eos_token": False, "legacy": False, "pad_token": None, "padding_side": "left",
              "sp_model_kwargs": {}, "use_default_system_prompt": False, "tokenizer_class": "LlamaTokenizer"}
    for config in (llama3, llama2):  # (their tokenizer_config.json's keys, as on the Hub)
        tokenizer.check_hf_files({"tokenizer_config.json": json.dumps(config).encode()}, "nemo_tokenizer")


@needs_megatron_core
def test_a_tokenizer_that_panics_the_library_is_one_note(nemo2, tmp_path):
    precompiled = {"type": "Precompiled", "precompiled_charsmap": "AAAA"}
    folder = shipping(nemo2, tmp_path, "tokenizer.json", lambda t: {**t, "normalizer": precompiled})
    done = run_cli("--checkpoint-path", folder, "--save-path", tmp_path / "out", "--quiet")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.count("\n") == 1 and "tokenizer files copied but they do not load (Precompiled" in done.stdout


@needs_megatron_core
def test_a_load_check_past_its_time_is_said_not_waited_for(nemo2, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer, "_CHILD", "import time; time.sleep(300)")
    monkeypatch.setattr(tokenizer, "LOAD_SECONDS", 1)
    started = time.monotonic()
    result = streamconv.convert(nemo2, tmp_path / "out")
    assert time.monotonic() - started < 120  # (the child sleeps 300 s: it was not waited for)
    assert "tokenizer files copied but not checked: loading them took over 1 s" in result.note
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == \
        (nemo2 / "context" / "nemo_tokenizer" / "tokenizer.json").read_bytes()


@needs_megatron_core
def test_sigterm_during_the_load_check_ends_the_run_and_the_check(nemo2, tmp_path):
    started, out = tmp_path / "check-started", tmp_path / "out"
    check = f"import os, time; open({str(started)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
    argv = ["streamconv", "--checkpoint-path", str(nemo2), "--save-path", str(out), "--quiet"]
    script = "\n".join(["import sys", "from streamconv import cli, tokenizer", f"tokenizer._CHILD = {check!r}",
                         f"sys.argv = {argv!r}", "cli.run()"])
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (started.exists() and started.read_text()) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        child = int(started.read_text())
        run.send_signal(signal.SIGTERM)
        stdout, stderr = run.communicate(timeout=30)  # (the check's child sleeps 300 s)
    finally:
        run.kill()
    assert run.returncode == 143 and stderr == "streamconv: terminated; nothing was written\n", stderr
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".out")]
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(child, 0)


@needs_megatron_core
def test_the_free_space_check_counts_the_tokenizer(nemo2, tmp_path, monkeypatch):
    folder = shipping(nemo2, tmp_path, "tokenizer.json", lambda t: {**t, "padding": None, "note": "x" * 40_000_000})
    plan = streamconv.convert(folder, None, dry_run=True).plan
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=plan.file_bytes + 2**20))
    with pytest.raises(ConversionError, match=r"not enough free space in .*: need 4\d\.\d MB"):
        streamconv.convert(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
