"""Round trips through transformers and bit-equality with an independent reference conversion."""

import itertools
import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

import streamconv
from streamconv import pipeline
from tests.oracle import reference_convert


def read_output(folder) -> dict[str, torch.Tensor]:
    """Every tensor in a converted folder, via safetensors' own reader."""
    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                assert f.metadata() == {"format": "pt"}
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    assert key not in tensors, f"{key} written twice"
                    tensors[key] = f.get_tensor(key)
    return tensors


def logits_pair(source, folder):
    """Logits of the source GPT-2 weights and of the converted folder, both computed in fp32."""
    reference = GPT2LMHeadModel(source.gpt2_config())
    missing, unexpected = reference.load_state_dict(source.hf_state_dict, strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # tied to wte
    reference.float().eval()
    converted, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() or info["missing_keys"] == []
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    converted.eval()
    assert converted.lm_head.weight.data_ptr() == converted.transformer.wte.weight.data_ptr()
    tokens = torch.randint(0, source.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return reference(tokens).logits, converted(tokens).logits


@pytest.mark.parametrize("ckpt_name", ["bf16_ckpt", "fp32_ckpt"])
@pytest.mark.parametrize("shard_size", ["5GB", "100KB"])
def test_round_trip_logits_equal(request, tmp_path, ckpt_name, shard_size):
    source = request.getfixturevalue(ckpt_name)
    out = tmp_path / "hf"
    result = streamconv.convert(source.path, out, shard_size=shard_size, vocab_size=source.model.vocab_size)
    assert (result.shards == 1) == (shard_size == "5GB")
    assert os.path.exists(out / "model.safetensors.index.json") == (result.shards > 1)
    expected, actual = logits_pair(source, out)
    assert torch.equal(expected, actual), (expected - actual).abs().max()


@pytest.mark.parametrize("ckpt_name", ["bf16_ckpt", "fp32_ckpt"])
def test_every_tensor_bit_equal_to_reference(request, tmp_path, ckpt_name):
    source = request.getfixturevalue(ckpt_name)
    out = tmp_path / "hf"
    streamconv.convert(source.path, out, shard_size="64KB", vocab_size=source.model.vocab_size)
    expected = reference_convert(source.path, vocab_size=source.model.vocab_size)
    actual = read_output(out)
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def test_small_read_chunks_give_the_same_bytes(bf16_ckpt, tmp_path, monkeypatch):
    """Tensors are read in chunks of CHUNK_BYTES; force many chunks per tensor, including QKV head groups."""
    monkeypatch.setattr(pipeline, "CHUNK_BYTES", 3000)
    out = tmp_path / "hf"
    streamconv.convert(bf16_ckpt.path, out, vocab_size=1000)
    expected = reference_convert(bf16_ckpt.path, vocab_size=1000)
    actual = read_output(out)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


@pytest.mark.parametrize("ckpt_name,dtype,torch_dtype", [
    ("bf16_ckpt", "fp32", torch.float32), ("bf16_ckpt", "fp16", torch.float16),
    ("fp32_ckpt", "bf16", torch.bfloat16), ("fp32_ckpt", "fp16", torch.float16)])
def test_dtype_cast(ckpt_name, request, tmp_path, dtype, torch_dtype):
    """Cast on the bits (streamconv.casts), equal to torch's .to() of the reference conversion."""
    ckpt = request.getfixturevalue(ckpt_name)
    out = tmp_path / "hf"
    streamconv.convert(ckpt.path, out, dtype=dtype, vocab_size=1000)
    expected = reference_convert(ckpt.path, vocab_size=1000)
    actual = read_output(out)
    for name, tensor in expected.items():
        assert actual[name].dtype == torch_dtype
        assert torch.equal(actual[name], tensor.to(torch_dtype)), name
    assert json.loads((out / "config.json").read_text())["dtype"] == str(torch_dtype).removeprefix("torch.")


def test_config_matches_reference_copy_config(bf16_ckpt, tmp_path):
    out = tmp_path / "hf"
    streamconv.convert(bf16_ckpt.path, out, vocab_size=1000)
    config = json.loads((out / "config.json").read_text())
    m = bf16_ckpt.model
    expected = {
        "vocab_size": 1000, "n_positions": m.n_positions, "n_embd": m.n_embd, "n_layer": m.n_layer,
        "n_head": m.n_head, "n_inner": 4 * m.n_embd, "activation_function": "gelu", "resid_pdrop": 0.1,
        "embd_pdrop": 0.1, "attn_pdrop": 0.1, "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "apply_query_key_layer_scaling": True, "normalize_attention_scores": True, "use_cache": True,
        "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0, "architectures": ["GPT2LMHeadModel"],
        "tokenizer_class": "GPTSw3Tokenizer", "model_type": "gpt2", "tie_word_embeddings": True,
        "dtype": "bfloat16",
    }
    assert {k: config.get(k) for k in expected} == expected
    assert "lm_head.weight" not in read_output(out)


def test_config_loads_as_the_one_gpt2config_writes(bf16_ckpt, tmp_path):
    """config.json is written without transformers: it must load exactly as GPT2Config's own file does."""
    from transformers import GPT2Config

    result = streamconv.convert(bf16_ckpt.path, tmp_path / "hf", vocab_size=1000)
    (tmp_path / "ref").mkdir()
    GPT2Config(**result.config).to_json_file(tmp_path / "ref" / "config.json")
    written = GPT2Config.from_pretrained(tmp_path / "hf").to_dict()
    assert written == GPT2Config.from_pretrained(tmp_path / "ref").to_dict()
    assert written["model_type"] == "gpt2" and written["dtype"] == "bfloat16"


def test_6_7b_hidden_size_uses_its_tokenizer_ids():
    from streamconv.families import FAMILIES
    from streamconv.families.base import Dims

    hf_config = FAMILIES["gpt-sw3"].hf_config

    def no_hparams(key, default=None, **null):
        return default

    ids = lambda h: {k: hf_config(no_hparams, Dims(h, 32, 32, 32, h // 32, 4 * h, 2048, 64000), "bfloat16")[k]  # noqa: E731
                     for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    assert ids(4096) == {"bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0}
    assert ids(6144) == {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}


def test_default_vocab_is_gpt_sw3s(checkpoints, tmp_path):
    from streamconv.demo import SyntheticModel

    source = checkpoints("v64k", SyntheticModel(n_embd=32, n_layer=1, n_head=2, vocab_size=64000), optimizer=False)
    out = tmp_path / "hf"
    streamconv.convert(source.path, out)
    assert read_output(out)["transformer.wte.weight"].shape == (64000, 32)
    expected, actual = logits_pair(source, out)
    assert torch.equal(expected, actual)


@pytest.mark.parametrize("error,raised", [
    (OSError(28, "No space left on device"), streamconv.ConversionError),
    (OSError(5, "Input/output error"), OSError),
    (KeyboardInterrupt(), KeyboardInterrupt),
])
def test_failure_mid_stream_leaves_nothing(bf16_ckpt, tmp_path, monkeypatch, error, raised):
    from streamconv.formats.safetensors_writer import ShardWriter

    calls = []
    real_append = ShardWriter.append

    def failing_append(self, data):
        calls.append(1)
        if len(calls) == 10:
            raise error
        real_append(self, data)

    monkeypatch.setattr(ShardWriter, "append", failing_append)
    out = tmp_path / "hf"
    with pytest.raises(raised) as info:
        streamconv.convert(bf16_ckpt.path, out, shard_size="100KB", vocab_size=1000)
    if raised is streamconv.ConversionError:
        assert "No space left on device; the output needs 440.2 kB" in str(info.value)
    assert len(calls) == 10
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_the_old_folder(bf16_ckpt, tmp_path, monkeypatch):
    from streamconv.formats.safetensors_writer import ShardWriter

    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("previous model")  # a model folder's file: --overwrite may replace it

    def failing_append(self, data):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ShardWriter, "append", failing_append)
    with pytest.raises(OSError):
        streamconv.convert(bf16_ckpt.path, out, vocab_size=1000, overwrite=True)
    assert os.listdir(tmp_path) == ["hf"] and os.listdir(out) == ["config.json"]
    assert (out / "config.json").read_text() == "previous model"


def test_failure_while_arranging_stops_the_writer(bf16_ckpt, tmp_path, monkeypatch):
    import threading

    from streamconv.arrange import Arranger

    real_arrange = Arranger.arrange
    calls = []

    def failing_arrange(self, out, part, arrangement, start, dtypes=None):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("arranging failed")
        real_arrange(self, out, part, arrangement, start, dtypes)

    monkeypatch.setattr(Arranger, "arrange", failing_arrange)
    with pytest.raises(RuntimeError, match="arranging failed"):
        streamconv.convert(bf16_ckpt.path, tmp_path / "hf", vocab_size=1000)
    assert os.listdir(tmp_path) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("streamconv")]


def _direct_io(monkeypatch, refuse_open: bool = False, refuse_io: bool = False) -> dict[str, list]:
    """Record the O_DIRECT descriptors streamconv opens and the bytes read and written through them; with
    `refuse_open` the filesystem refuses O_DIRECT at open (as tmpfs does), with `refuse_io` at the first read or
    write (as some network filesystems do)."""
    import errno

    seen: dict[str, list] = {"opened": [], "read": [], "written": []}
    direct: set[int] = set()
    real_open, real_preadv, real_pwritev = os.open, os.preadv, os.pwritev

    def opening(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT and refuse_open:
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_DIRECT:
            direct.add(fd)
            seen["opened"].append(os.path.realpath(f"/proc/self/fd/{fd}"))
        return fd

    def through(real, kind):
        def call(fd, buffers, offset, *args):
            if fd in direct:
                if refuse_io:
                    raise OSError(errno.EINVAL, "Invalid argument")
                n = real(fd, buffers, offset, *args)
                seen[kind].append(n)
                return n
            return real(fd, buffers, offset, *args)
        return call

    monkeypatch.setattr(os, "open", opening)
    monkeypatch.setattr(os, "preadv", through(real_preadv, "read"))
    monkeypatch.setattr(os, "pwritev", through(real_pwritev, "written"))
    return seen


def _converted_as_reference(ckpt, out, **kwargs) -> None:
    streamconv.convert(ckpt.path, out, vocab_size=1000, **kwargs)
    expected = reference_convert(ckpt.path, vocab_size=1000)
    actual = read_output(out)
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def test_reads_and_writes_are_direct(bf16_ckpt, tmp_path, monkeypatch):
    """Every source byte is read with O_DIRECT (aligned spans around each chunk), and the output written with
    it in whole staging buffers, the unaligned tail through the ordinary descriptor."""
    from streamconv.formats import safetensors_writer

    monkeypatch.setattr(safetensors_writer, "STAGING_BYTES", 64 * 1024)
    seen = _direct_io(monkeypatch)
    out = tmp_path / "hf"
    _converted_as_reference(bf16_ckpt, out)
    assert os.path.realpath(bf16_ckpt.path) in seen["opened"]
    assert sum(seen["read"]) >= streamconv.convert(bf16_ckpt.path, "unused", vocab_size=1000, dry_run=True).bytes
    size = (out / "model.safetensors").stat().st_size
    assert sum(seen["written"]) == size - size % (64 * 1024) > 0
    assert all(n == 64 * 1024 for n in seen["written"])


def _writes_of(monkeypatch) -> list[tuple[int, int, int]]:
    """Record (memory address, bytes, file offset) of every pwritev through an O_DIRECT descriptor."""
    import ctypes

    seen, real_open, real_pwritev = [], os.open, os.pwritev
    direct: set[int] = set()

    def opening(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_DIRECT:
            direct.add(fd)
        return fd

    def writing(fd, buffers, offset):
        if fd in direct:
            (view,) = buffers
            seen.append((ctypes.addressof(ctypes.c_char.from_buffer(view)), view.nbytes, offset))
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "open", opening)
    monkeypatch.setattr(os, "pwritev", writing)
    return seen


@pytest.mark.parametrize("dtype", [None, "fp16"])
def test_arranged_and_cast_bytes_go_to_the_disk_from_where_they_lie(bf16_ckpt, tmp_path, monkeypatch, dtype):
    """Tensors arranged (and chunks cast) in memory lie there at their file offset's alignment: the writer writes
    their whole blocks straight from them, with O_DIRECT, staging only the partial blocks at their ends. Every
    direct write is aligned in memory, length and offset, and they cover the file in order."""
    from streamconv.formats import safetensors_writer

    monkeypatch.setattr(safetensors_writer, "STAGING_BYTES", 64 * 1024)
    monkeypatch.setattr(safetensors_writer, "UNSTAGED_BYTES", 8 * 1024)
    writes = _writes_of(monkeypatch)
    out = tmp_path / "hf"
    streamconv.convert(bf16_ckpt.path, out, vocab_size=1000, dtype=dtype)
    expected = reference_convert(bf16_ckpt.path, vocab_size=1000)
    actual = read_output(out)
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor if dtype is None else tensor.to(torch.float16)), name
    assert all(at % 4096 == n % 4096 == offset % 4096 == 0 for at, n, offset in writes)
    assert [offset for _, _, offset in writes] == list(itertools.accumulate([0] + [n for _, n, _ in writes[:-1]]))
    size = (out / "model.safetensors").stat().st_size
    assert size - 64 * 1024 <= sum(n for _, n, _ in writes) <= size
    assert any(n % (64 * 1024) for _, n, _ in writes[:-1]), "no tensor went to the disk without the staging copy"


def test_a_direct_write_refused_midway_gets_the_rest_through_the_ordinary_descriptor(bf16_ckpt, tmp_path,
                                                                                      monkeypatch):
    """A filesystem that refuses an unstaged direct write (after accepting the first ones) gets that write and
    everything after through the ordinary descriptor: the same file."""
    import errno

    from streamconv.formats import safetensors_writer

    monkeypatch.setattr(safetensors_writer, "STAGING_BYTES", 64 * 1024)
    monkeypatch.setattr(safetensors_writer, "UNSTAGED_BYTES", 8 * 1024)
    real, calls = os.pwritev, []

    def refusing(fd, buffers, offset):
        calls.append(buffers[0].nbytes)
        if len(calls) > 1 and buffers[0].nbytes % (64 * 1024):  # an unstaged write, not the first write
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", refusing)
    _converted_as_reference(bf16_ckpt, tmp_path / "hf")
    assert any(n % (64 * 1024) for n in calls[1:])


@pytest.mark.parametrize("refused", ["at open", "at the first read or write"])
def test_a_filesystem_without_direct_io_gets_buffered_reads_and_writes(bf16_ckpt, tmp_path, monkeypatch, refused):
    from streamconv.formats import safetensors_writer

    monkeypatch.setattr(safetensors_writer, "STAGING_BYTES", 64 * 1024)
    seen = _direct_io(monkeypatch, refuse_open=refused == "at open", refuse_io=refused != "at open")
    _converted_as_reference(bf16_ckpt, tmp_path / "hf", shard_size="100KB")
    assert seen["read"] == seen["written"] == []


def test_strided_tensors_in_the_checkpoint(bf16_ckpt, tmp_path, monkeypatch):
    """torch.save keeps views as they are: strided sources convert like contiguous ones, and a strided
    pass-through tensor (copied into memory) is written before the next one is copied."""
    payload = torch.load(bf16_ckpt.path, weights_only=False)
    sd = payload["state_dict"]
    for key in ("model.language_model.embedding.position_embeddings.weight",
                "model.language_model.embedding.word_embeddings.weight",
                "model.language_model.encoder.layers.0.mlp.dense_h_to_4h.weight"):
        sd[key] = sd[key].t().contiguous().t()
        assert not sd[key].is_contiguous()
    path = tmp_path / "strided.ckpt"
    torch.save(payload, path)
    drains = []
    real = pipeline._WriteBehind.drain
    monkeypatch.setattr(pipeline._WriteBehind, "drain", lambda self: drains.append(1) or real(self))
    streamconv.convert(path, tmp_path / "hf", vocab_size=1000)
    expected = reference_convert(bf16_ckpt.path, vocab_size=1000)
    actual = read_output(tmp_path / "hf")
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
    assert len(drains) == 2  # wte and wpe
