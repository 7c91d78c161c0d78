"""The Python API words its errors for Python: keyword arguments, not the command line's flags."""

import pytest

import streamconv
from streamconv.errors import _keywords
from tests.conftest import run_cli


def test_python_errors_name_keyword_arguments(bf16_ckpt, tmp_path):
    with pytest.raises(streamconv.ConversionError) as raised:
        streamconv.convert(bf16_ckpt.path, tmp_path / "out")  # vocabulary 64000 > the 1024 embedding rows
    assert "vocab_size=1024" in str(raised.value) and "--" not in str(raised.value), raised.value
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(streamconv.ConversionError, match="overwrite=True") as raised:
        streamconv.convert(bf16_ckpt.path, tmp_path / "full", vocab_size=1000)
    streamconv.convert(bf16_ckpt.path, tmp_path / "out", vocab_size=1000)
    with pytest.raises(streamconv.ConversionError) as raised:
        streamconv.verify(bf16_ckpt.path, tmp_path / "out", tokenizer_path=tmp_path / "missing.model")
    assert "check tokenizer_path" in str(raised.value) and "--" not in str(raised.value), raised.value


def test_the_command_line_names_flags(bf16_ckpt, tmp_path):
    proc = run_cli("--checkpoint-path", bf16_ckpt.path, "--save-path", tmp_path / "out")
    assert proc.returncode == 2 and "--vocab-size 1024" in proc.stderr, proc.stderr


@pytest.mark.parametrize("flags, keywords", [
    ("pass --vocab-size 256 or less", "pass vocab_size=256 or less"),
    ("pass --num-heads N to convert it", "pass num_heads=N to convert it"),
    ("check --tokenizer", "check tokenizer_path"),
    ("pass --overwrite to replace", "pass overwrite=True to replace"),
    ("try --demo", "try --demo"),  # no keyword for it: left as it is
])
def test_flags_become_keywords(flags, keywords):
    assert _keywords(flags) == keywords
