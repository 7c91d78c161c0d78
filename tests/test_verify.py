"""`--verify`: the settings read from the output, every file checked, malformed output as problem lines,
memory bounded by a chunk rather than by the largest tensor."""

import json
import os
import shutil
import struct
import sys
from pathlib import Path

import pytest

import streamconv
from benchmarks.launcher import peak_rss_of
from benchmarks.parallel import make_parallel
from streamconv import reads
from streamconv.demo import SyntheticModel, make_checkpoint
from streamconv.pipeline import CHUNK_BYTES
from tests.conftest import run_cli
from tests.test_cli import assert_one_line_error
from tests.writers import make_sentencepiece_model

# vocabulary 1000 padded to 1024 embedding rows: a wrong vocabulary shows in wte's shape
MODEL = SyntheticModel(n_embd=64, n_layer=2, n_head=8, vocab_size=1000, n_positions=64)
MiB = 2**20


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    return make_sentencepiece_model(tmp_path_factory.mktemp("spm") / "tokenizer.model", MODEL.vocab_size)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("verify") / "model.ckpt", MODEL, optimizer=False).path


@pytest.fixture(scope="module")
def converted(ckpt, spm, tmp_path_factory):
    """Conversions made once: with the tokenizer (one shard, and in shards of 100 kB) and with --dtype fp32."""
    root = tmp_path_factory.mktemp("converted")
    streamconv.convert(ckpt, root / "tok", tokenizer_path=spm)
    streamconv.convert(ckpt, root / "sharded", tokenizer_path=spm, shard_size="100KB")
    streamconv.convert(ckpt, root / "fp32", dtype="fp32", vocab_size=MODEL.vocab_size)
    return root


@pytest.fixture
def out(converted, tmp_path):
    """A writable copy of a conversion: out("tok"), out("sharded"), out("fp32")."""
    def copy(name):
        shutil.copytree(converted / name, tmp_path / name)
        return tmp_path / name
    return copy


def verify_cli(ckpt, folder, *flags):
    """Run --verify; assert it answered with lines of its own (no traceback) and return (exit code, lines)."""
    proc = run_cli("--verify", "--checkpoint-path", ckpt, "--save-path", folder, *flags)
    assert proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert lines and all(line.startswith("verify: ") for line in lines), proc.stdout
    return proc.returncode, lines


def test_tokenizer_conversion_verifies_without_repeating_the_flags(ckpt, converted):
    """Converted with a 1,000-piece --tokenizer: the vocabulary (1000) comes from the output, not GPT-SW3's
    64000, which does not fit the 1024 embedding rows."""
    code, lines = verify_cli(ckpt, converted / "tok")
    assert code == 0 and lines == [f"verify: OK: {converted / 'tok'} is exactly the conversion of {ckpt}"]
    code, lines = verify_cli(ckpt, converted / "sharded")
    assert code == 0, lines


def test_cast_conversion_verifies_without_repeating_the_dtype(ckpt, converted, out):
    assert streamconv.verify(ckpt, converted / "fp32") == []
    assert streamconv.verify(ckpt, converted / "fp32", dtype="bf16") != []  # an explicit flag still wins
    # the bytes are still those of the cast: a flipped byte is found
    folder = out("fp32")
    shard = folder / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x40  # in transformer.ln_f.bias
    shard.write_bytes(bytes(data))
    code, lines = verify_cli(ckpt, folder)
    assert code == 1 and any(line.startswith("verify: transformer.ln_f.bias: bytes differ") for line in lines)


def test_readme_python_api_example(ckpt, spm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(ckpt, "model.ckpt")
    shutil.copy(spm, "tokenizer.model")
    result = streamconv.convert("model.ckpt", "out", shard_size="2GB", device="cpu", dtype=None, vocab_size=None,
                                tokenizer_path="tokenizer.model")
    assert result.config["vocab_size"] == 1000
    assert streamconv.verify("model.ckpt", "out") == []


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_a_tampered_config_is_still_a_problem(ckpt, out):
    folder = out("tok")
    edit_config(folder, vocab_size=900)  # fits the embedding, but the stored wte has 1000 rows
    assert streamconv.verify(ckpt, folder) == ["transformer.wte.weight: BF16 [1000, 64] on disk, expected BF16 "
                                               "[900, 64]"]
    edit_config(folder, vocab_size=5000)  # more than the 1024 rows: said, then checked with the tokenizer's 1000
    code, lines = verify_cli(ckpt, folder)
    assert code == 1 and lines[0].startswith("verify: config.json: its vocab_size 5000 and n_head 8 do not fit")
    assert "verify: config.json: vocab_size is 5000, expected 1000" in lines
    edit_config(folder, vocab_size=1000, dtype="float32")  # the tensors are bf16: not a cast to fp32
    assert streamconv.verify(ckpt, folder) == ["config.json: dtype is 'float32', expected 'bfloat16'"]
    edit_config(folder, dtype="bfloat16", n_layer=3, extra=1)
    assert streamconv.verify(ckpt, folder) == ["config.json: n_layer is 3, expected 2",
                                               "config.json: extra is not written by a conversion"]


def test_tokenizer_files_are_checked(ckpt, spm, out, tmp_path):
    folder = out("tok")
    (folder / "spiece.model").unlink()
    assert streamconv.verify(ckpt, folder) == ["spiece.model: missing (tokenizer_config.json is there: a conversion "
                                               "writes both)"]
    assert streamconv.verify(ckpt, folder, tokenizer_path=spm) == ["spiece.model: missing (a conversion ships the "
                                                                   "tokenizer)"]
    (folder / "spiece.model").write_bytes(b"not a model")
    assert streamconv.verify(ckpt, folder) == ["spiece.model: not a SentencePiece model that sentencepiece can load"]
    other = make_sentencepiece_model(tmp_path / "other.model", 900)
    shutil.copy(other, folder / "spiece.model")
    assert "spiece.model: differs from the checkpoint's tokenizer (or --tokenizer's)" in \
        streamconv.verify(ckpt, folder, tokenizer_path=spm)

    shutil.copy(spm, folder / "spiece.model")
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": 7}))
    assert streamconv.verify(ckpt, folder)[0].startswith("tokenizer_config.json: is {")
    (folder / "tokenizer_config.json").unlink()
    assert streamconv.verify(ckpt, folder) == ["tokenizer_config.json: missing (a conversion writes it with the "
                                               "tokenizer)"]


def test_the_tokenizer_a_nemo_ships_is_expected(spm, tmp_path):
    nemo = make_parallel(tmp_path / "in.nemo", MODEL, tp=1, tokenizer=spm, optimizer=False).path
    folder = tmp_path / "out"
    streamconv.convert(nemo, folder)
    assert (folder / "spiece.model").read_bytes() == Path(spm).read_bytes()
    assert streamconv.verify(nemo, folder) == []
    (folder / "spiece.model").unlink()
    (folder / "tokenizer_config.json").unlink()
    assert streamconv.verify(nemo, folder) == ["spiece.model: missing (a conversion ships the tokenizer)",
                                               "tokenizer_config.json: missing (a conversion writes it with the "
                                               "tokenizer)"]


def test_every_file_a_conversion_would_not_write_is_a_problem(ckpt, out):
    folder = out("sharded")
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 16)
    (folder / "extra.txt").write_text("notes")
    (folder / "sub").mkdir()
    (folder / "model-00009-of-00009.safetensors").write_bytes(b"")
    os.symlink("/etc/passwd", folder / "link")
    code, lines = verify_cli(ckpt, folder)
    assert code == 1
    assert lines[:-1] == [
        "verify: extra.txt: not written by a conversion",
        "verify: link: not written by a conversion",
        "verify: model-00009-of-00009.safetensors: not named in model.safetensors.index.json",
        "verify: pytorch_model.bin: not written by a conversion",
        "verify: sub/: not written by a conversion",
    ]
    assert lines[-1].startswith("verify: 5 problem(s)")


def test_a_pipe_or_link_under_a_conversion_file_name_is_not_opened(ckpt, out):
    folder = out("tok")
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")  # reading it would wait forever
    (folder / "spiece.model").unlink()
    os.symlink("/etc/passwd", folder / "spiece.model")
    assert streamconv.verify(ckpt, folder, vocab_size=1000) == [
        "config.json: a link or special file, not a regular file",
        "spiece.model: a link or special file, not a regular file",
    ]


def rewrite_header(shard, change):
    """Rewrite a safetensors file's header with `change(header)`, its data kept (offsets are relative to it)."""
    data = shard.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    body = json.dumps(change(json.loads(data[8 : 8 + length]))).encode()
    body += b" " * (-len(body) % 8)
    shard.write_bytes(struct.pack("<Q", len(body)) + body + data[8 + length :])


def first_entry(change):
    def edit(header):
        name = next(k for k in header if k != "__metadata__")
        header[name] = change(header[name])
        return header
    return edit


FIRST = "model-00001-of-00004.safetensors"
INDEX = "model.safetensors.index.json"
MALFORMED = {  # name: (file, how it is damaged, what the problem line says)
    "config-not-json": ("config.json", lambda p: p.write_text("{"), "config.json: not JSON (Expecting property"),
    "config-a-list": ("config.json", lambda p: p.write_text("[1, 2]"), "config.json: a list, not a JSON object"),
    "config-not-utf8": ("config.json", lambda p: p.write_bytes(b"\xff\xfe{"), "config.json: not JSON ("),
    "index-not-json": (INDEX, lambda p: p.write_text("{'a'"), f"{INDEX}: not JSON ("),
    "index-a-list": (INDEX, lambda p: p.write_text("[]"), f"{INDEX}: a list, not a JSON object"),
    "weight-map-a-list": (INDEX, lambda p: p.write_text('{"weight_map": []}'),
                          f"{INDEX}: weight_map is not an object of file names"),
    "header-a-list": (FIRST, lambda p: rewrite_header(p, lambda h: [1, 2]),
                      f"{FIRST}: header is a list, not a JSON object"),
    "header-not-json": (FIRST, lambda p: p.write_bytes(p.read_bytes()[:8] + b"!" + p.read_bytes()[9:]),
                        f"{FIRST}: header: not JSON ("),
    "header-too-long": (FIRST, lambda p: p.write_bytes(struct.pack("<Q", 2**40) + p.read_bytes()[8:]),
                        f"{FIRST}: header length 1099511627776 runs past the end of the file"),
    "entry-a-list": (FIRST, lambda p: rewrite_header(p, first_entry(lambda e: [e])),
                     f"{FIRST}: tensor transformer.wte.weight: a list, not a JSON object"),
    "entry-lacks-offsets": (FIRST, lambda p: rewrite_header(p, first_entry(lambda e: {"dtype": e["dtype"],
                                                                                       "shape": e["shape"]})),
                            f"{FIRST}: tensor transformer.wte.weight: lacks data_offsets"),
    "entry-dtype-a-number": (FIRST, lambda p: rewrite_header(p, first_entry(lambda e: {**e, "dtype": 5})),
                             f"{FIRST}: tensor transformer.wte.weight: dtype is a number, not a string"),
    "entry-shape-a-string": (FIRST, lambda p: rewrite_header(p, first_entry(lambda e: {**e, "shape": "1000x64"})),
                             f"{FIRST}: tensor transformer.wte.weight: shape is not a list of sizes"),
    "offsets-not-ints": (FIRST, lambda p: rewrite_header(p, first_entry(
        lambda e: {**e, "data_offsets": [float(o) for o in e["data_offsets"]]})),
        f"{FIRST}: tensor transformer.wte.weight: data_offsets are not two increasing integers"),
    "truncated-shard": (FIRST, lambda p: p.write_bytes(p.read_bytes()[:-1000]), f"{FIRST}: file is "),
    "shard-shorter-than-a-header": (FIRST, lambda p: p.write_bytes(b"\1\2"),
                                    f"{FIRST}: shorter than a safetensors header"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_output_is_a_problem_line(ckpt, out, case):
    folder = out("sharded")
    assert json.loads((folder / INDEX).read_text())["weight_map"]["transformer.wte.weight"] == FIRST
    file, damage, said = MALFORMED[case]
    damage(folder / file)
    code, lines = verify_cli(ckpt, folder, "--vocab-size", "1000")
    assert code == 1, lines
    assert any(line.startswith(f"verify: {said}") for line in lines), lines


def test_problem_lines_are_bounded(ckpt, out):
    folder = out("tok")
    many = {f"bogus.{i}\nname": 5 for i in range(3000)}
    rewrite_header(folder / "model.safetensors", lambda h: {**h, **many})
    problems = streamconv.verify(ckpt, folder)
    assert len(problems) == 1001 and problems[-1] == "... and 2000 more problems"
    assert "\n" not in "".join(problems)  # one line each, whatever the names hold
    assert problems[0] == "model.safetensors: tensor 'bogus.0\\nname': a number, not a JSON object"


def test_a_save_path_that_is_not_a_folder_is_a_one_line_error(ckpt, tmp_path):
    proc = run_cli("--verify", "--checkpoint-path", ckpt, "--save-path", tmp_path / "absent")
    assert_one_line_error(proc, "is not a folder", "--save-path")


def test_verify_peak_rss_is_bounded_by_a_chunk_not_the_largest_tensor(tmp_path):
    """The largest tensor (wte, 410 MB) passes through unchanged: verify compares it a read chunk at a time,
    handing back the output's pages."""
    wide = SyntheticModel(n_embd=1024, n_head=16, vocab_size=200000, n_positions=64, n_layer=1)
    tiny = SyntheticModel(n_embd=64, n_head=4, vocab_size=2048, n_positions=64, n_layer=1)
    largest = wide.vocab_size * wide.n_embd * 2
    peaks = {}
    for name, model in (("tiny", tiny), ("wide", wide)):
        source = make_checkpoint(tmp_path / f"{name}.ckpt", model, optimizer=False, keep_hf=False).path
        folder = tmp_path / name
        command = [sys.executable, "-m", "streamconv", "--checkpoint-path", source, "--save-path", folder]
        peaks[name, "convert"] = peak_rss_of([*command, "--quiet", "--vocab-size", model.vocab_size])
        peaks[name, "verify"] = peak_rss_of([*command, "--verify"])  # the vocabulary read from config.json
    print({k: f"{v / MiB:.0f} MiB" for k, v in peaks.items()})
    # generous: verify holds its read buffers and 1 MiB of the output
    bound = peaks["tiny", "verify"] + reads.BUFFERS * CHUNK_BYTES + 48 * MiB
    assert bound < largest / 2
    assert peaks["wide", "verify"] < bound
    assert peaks["wide", "verify"] < 1.5 * peaks["wide", "convert"]
