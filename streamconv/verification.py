"""`streamconv --verify`: re-read a checkpoint and a converted folder and compare them bit for bit.

The settings a conversion was given are read from what the output records (config.json's vocab_size,
n_head and dtype, the shipped spiece.model) unless given again; the expected folder is then derived from
the checkpoint with them, and every output tensor is recomputed from the source with the conversion's
own code and compared with the bytes on disk. So a setting read from the output cannot hide a wrong
tensor: the bytes must still be those of the conversion with that setting.

Every file is checked: config, index, headers, tokenizer files, and anything a conversion would not have
written. The output folder is read as untrusted: bounded JSON, no links followed, and a malformed file is
a problem line, never a traceback. Memory stays bounded as in conversion: a tensor that passes through
unchanged is compared chunk by chunk straight from the source mapping; one that is rearranged or cast is
arranged into one buffer (the largest such tensor) and compared in chunks; the pages of both sides are
handed back after each chunk.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from streamconv import families, tokenizer
from streamconv.arrange import Arranger
from streamconv.errors import ConversionError, describe
from streamconv.formats import safetensors
from streamconv.formats.safetensors import DTYPE_NAMES, is_int, json_kind
from streamconv.hf_folder import CONFIG_NAME, INDEX_NAME, read_tokenizer
from streamconv.options import resolve_dtype
from streamconv.pipeline import (
    CHUNK_BYTES,
    Fetch,
    arrange_into,
    buffered,
    in_order_chunks,
    read_buffer_bytes,
    read_chunks,
    source_of,
)
from streamconv.plan import Plan, TensorSpec
from streamconv.planning import build_plan
from streamconv.reads import ReadAhead
from streamconv.sources import Checkpoint, open_checkpoint
from streamconv.sources.mcore import INTEGRITY
from streamconv.sources.records import Files

if TYPE_CHECKING:
    import torch

JSON_LIMIT = 16 * 2**20  # config, index, a shard header: a conversion writes kilobytes (GPT-SW3 40B: 75 kB)
MAX_PROBLEMS = 1000  # lines kept; a damaged folder can hold millions
_MAX_INTEGRITY = 2**24  # integrity.json: a name and a digest per file of the checkpoint folder
_HASH_CHUNK = 8 * 2**20
COMPARE_BYTES = 2**20  # compared at once (numpy's comparison allocates a bool per byte)
SINGLE = "model.safetensors"


def verify(
    checkpoint_path: str | os.PathLike[str],
    save_path: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    vocab_size: int | None = None,
    num_heads: int | None = None,
    family: str | None = None,
    tokenizer_path: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Every difference between `save_path` and the conversion of `checkpoint_path`; empty if none.

    Settings not given are those the output records; the model family is found as a conversion finds it
    (`family` forces one, as --family did for the conversion). Raises ConversionError only for input that cannot
    be read at all (no such folder, a checkpoint that does not open).
    """
    save_path = os.fspath(save_path)
    if not os.path.isdir(save_path):
        raise ConversionError(f"{save_path} is not a folder; --save-path names the converted model's folder")
    out_dtype = resolve_dtype(dtype)
    model = read_tokenizer(os.fspath(tokenizer_path)) if tokenizer_path is not None else None
    parent = os.path.dirname(os.path.abspath(save_path))
    problems = _Problems()
    with open_checkpoint(checkpoint_path, parent if os.path.isdir(parent) else None) as checkpoint:
        if model is not None:  # it may set the vocabulary size, as in conversion
            checkpoint.tokenizer = model
        _verify(checkpoint, _Folder(save_path, problems), out_dtype, vocab_size, num_heads, family)
    return problems.lines()


class _Problems:
    """One line per problem, the first MAX_PROBLEMS kept, then how many more there were."""

    def __init__(self) -> None:
        self.kept: list[str] = []
        self.more = 0

    def add(self, line: str) -> None:
        if len(self.kept) < MAX_PROBLEMS:
            self.kept.append(line)
        else:
            self.more += 1

    def lines(self) -> list[str]:
        return self.kept + ([f"... and {self.more} more problems"] if self.more else [])


def _shown(text: str) -> str:
    """A name from the output, as one short line."""
    return text if text.isprintable() and len(text) <= 200 else describe(text)


class _Folder:
    """The output folder's entries, read without following links (nor waiting on a pipe); problems go to
    `problems`."""

    def __init__(self, path: str, problems: _Problems) -> None:
        self.path, self.problems = path, problems
        self.said: set[str] = set()
        try:
            with os.scandir(path) as entries:  # name -> 'file', 'folder' or 'link or special file'
                self.entries = {e.name: "file" if e.is_file(follow_symlinks=False) else
                                "folder" if e.is_dir(follow_symlinks=False) else "link or special file"
                                for e in entries}
        except OSError as exc:
            raise ConversionError(f"cannot read the folder {path} ({exc.strerror}); check --save-path") from None

    def readable(self, name: str) -> bool:
        """Whether `name` is a regular file here; if it is something else, that is said (once)."""
        kind = self.entries.get(name)
        if kind not in (None, "file") and name not in self.said:
            self.said.add(name)
            self.problems.add(f"{_shown(name)}: a {kind}, not a regular file")
        return kind == "file"

    def join(self, name: str) -> str:
        return os.path.join(self.path, name)

    def read(self, name: str, limit: int) -> bytes | None:
        """The file's bytes, or None (a problem said) if it is absent, not a file, too large or unreadable."""
        if not self.readable(name):
            return None
        try:
            with open(self.join(name), "rb") as f:
                data = f.read(limit + 1)
        except OSError as exc:
            self.problems.add(f"{_shown(name)}: cannot be read ({exc.strerror})")
            return None
        if len(data) > limit:
            self.problems.add(f"{_shown(name)}: larger than {limit} bytes, far more than a conversion writes")
            return None
        return data

    def json_object(self, name: str) -> dict | None:
        """A JSON object file, or None: absent (said if `name` is config.json), or not one (said)."""
        if name not in self.entries:
            if name == CONFIG_NAME:
                self.problems.add(f"{CONFIG_NAME}: missing")
            return None
        data = self.read(name, JSON_LIMIT)
        value = _parse_json(data, name, self.problems) if data is not None else NOT_JSON
        if value is NOT_JSON:
            return None
        if not isinstance(value, dict):
            self.problems.add(f"{name}: {json_kind(value)}, not a JSON object")
            return None
        return value


NOT_JSON = object()


def _parse_json(data: bytes, where: str, problems: _Problems) -> Any:
    """The JSON value, or NOT_JSON (said)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # (a UnicodeDecodeError is a ValueError)
        problems.add(f"{where}: not JSON ({str(exc)[:200]})")
        return NOT_JSON


@dataclass(frozen=True)
class _Stored:
    """A tensor as a shard header describes it; `begin` and `end` are positions in the file."""

    file: str
    dtype: str
    shape: list[int]
    begin: int
    end: int


def _verify(checkpoint: Checkpoint, folder: _Folder, dtype: str | None, vocab_size: int | None,
            num_heads: int | None, family: str | None) -> None:
    problems = folder.problems
    written = folder.json_object(CONFIG_NAME)
    recorded = written or {}
    given = checkpoint.tokenizer  # --tokenizer, else the one the source ships
    shipped = folder.read(tokenizer.MODEL_FILE, tokenizer.MAX_BYTES)
    if given is None:  # converted with --tokenizer: the output is its record
        checkpoint.tokenizer = shipped
    settings = _settings(checkpoint, recorded, vocab_size, num_heads, family, problems)
    if settings is None:  # config.json's settings do not fit, and the tensors cannot be checked without: said
        return
    vocab_size, num_heads = settings
    plan, config = build_plan(checkpoint, 2**62, dtype, vocab_size, num_heads, family)

    index = folder.json_object(INDEX_NAME)
    shards = _shard_files(folder, index)
    found, total, complete = _read_headers(folder, shards, {t.name for t in plan.tensors})  # (names: any dtype)
    cast = _recorded_cast(recorded, {s.dtype for s in found.values()}) if dtype is None else None
    if cast is not None:  # converted with --dtype: config.json records it, and every tensor has it
        plan, config = build_plan(checkpoint, 2**62, cast, vocab_size, num_heads, family)

    if written is not None:
        _check_config(written, config, problems)
    sharded = INDEX_NAME in folder.entries
    expected_files = {CONFIG_NAME, INDEX_NAME, *shards, *_check_tokenizer(folder, given, shipped, config, plan,
                                                                         checkpoint.tokenizer_files)}
    for name, kind in sorted(folder.entries.items()):
        if name not in expected_files:
            what = f"not named in {INDEX_NAME}" if name.endswith(".safetensors") and sharded else \
                "not written by a conversion"
            problems.add(f"{_shown(name)}{'/' if kind == 'folder' else ''}: {what}")
    if index is not None:
        _check_index(index, found, total, problems)
    compared = _check_tensors(plan, found, complete, problems)
    _compare_bytes(checkpoint, folder, compared, found)
    if checkpoint.integrity is not None:
        _check_integrity(checkpoint.integrity, problems)


def _check_integrity(files: Files, problems: _Problems) -> None:
    """The source files megatron-core's integrity.json names against the SHA-256 it recorded: each is read whole
    (the optimizer state too), so this costs a read of the checkpoint's folder."""
    where = files.path(INTEGRITY)
    try:
        manifest = json.loads(files.read(INTEGRITY, _MAX_INTEGRITY))
    except (ValueError, RecursionError, ConversionError) as exc:
        problems.add(f"{where}: cannot be read ({str(exc)[:200]})")
        return
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict) or manifest.get("algorithm", "sha256") != "sha256":
        problems.add(f"{where}: not megatron-core's integrity manifest ({{\"algorithm\": \"sha256\", \"files\": "
                     "{name: digest}})")
        return
    hashed: set[tuple[int, int, int]] = set()
    for name, digest in sorted(listed.items()):
        try:
            if "/" in name:  # (megatron-core lists the folder's own files: a path elsewhere is no entry of its)
                raise ConversionError("not a file of the checkpoint folder itself")
            file, offset, size = files.locate(name)
            found = os.stat(file)
            if (found.st_dev, found.st_ino, offset) in hashed:  # (links to one file: read once, said once)
                raise ConversionError("the same bytes as another entry")
            hashed.add((found.st_dev, found.st_ino, offset))
            actual = _sha256(file, offset, size)
        except (ConversionError, OSError) as exc:
            problems.add(f"{where}: names {describe(name)}, which cannot be read ({str(exc)[:200]})")
            continue
        if actual != digest:
            problems.add(f"{_shown(files.path(name))}: its SHA-256 is not the one {INTEGRITY} recorded: the checkpoint "
                         "changed after it was saved")


def _sha256(file: str, offset: int, size: int) -> str:
    """The digest of `size` bytes at `offset`, their pages handed back as they are read (the whole checkpoint passes
    through here, optimizer state included)."""
    digest, fd = hashlib.sha256(), os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        for start in range(offset, offset + size, _HASH_CHUNK):
            length = min(_HASH_CHUNK, offset + size - start)
            digest.update(os.pread(fd, length, start))
            os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _positive(value: Any) -> int | None:
    return value if is_int(value) and value > 0 else None


def _settings(checkpoint: Checkpoint, recorded: dict, vocab_size: int | None, num_heads: int | None,
              family: str | None, problems: _Problems) -> tuple[int | None, int | None] | None:
    """vocab_size and num_heads as given, else as config.json records them if the checkpoint takes them
    (else that is a problem, and the defaults are tried: None if they do not fit either)."""
    read = (vocab_size if vocab_size is not None else _positive(recorded.get("vocab_size")),
            num_heads if num_heads is not None else _positive(recorded.get(_heads_key(recorded))))
    if read == (vocab_size, num_heads):
        return read
    try:
        build_plan(checkpoint, 2**62, None, *read, family)
        return read
    except ConversionError as exc:
        problems.add(f"{CONFIG_NAME}: its vocab_size {read[0]} and {_heads_key(recorded)} {read[1]} do not fit the "
                     f"checkpoint ({exc})")
    try:
        build_plan(checkpoint, 2**62, None, vocab_size, num_heads, family)
        return vocab_size, num_heads
    except ConversionError:
        return None


def _heads_key(recorded: dict) -> str:
    """config.json's key for the head count: its model family's (GPT-2's n_head when it names none)."""
    family = families.by_model_type(recorded.get("model_type"))
    return (family or families.FAMILIES["gpt-sw3"]).heads_key


def _recorded_cast(recorded: dict, stored: set[str]) -> str | None:
    """The --dtype a conversion was given, if config.json names one and every stored tensor has it."""
    name = recorded.get("dtype", recorded.get("torch_dtype"))
    full = f"torch.{name}" if isinstance(name, str) else None
    return full if full in DTYPE_NAMES.values() and stored == {safetensors.DTYPES[full].code} else None


def _check_config(written: dict, config: dict, problems: _Problems) -> None:
    for key, value in config.items():
        if type(written.get(key)) is not type(value) or written.get(key) != value:
            problems.add(f"{CONFIG_NAME}: {key} is {describe(written.get(key))}, expected {value!r}")
    for key in written:
        if key not in config and key != "transformers_version":
            problems.add(f"{CONFIG_NAME}: {_shown(key)} is not written by a conversion")
    if not isinstance(written.get("transformers_version", ""), str):
        problems.add(f"{CONFIG_NAME}: transformers_version is not a string")


def _shard_files(folder: _Folder, index: dict | None) -> list[str]:
    """The shard files to read: model.safetensors alone, or those the index names (all present ones if it
    cannot be read)."""
    problems = folder.problems
    if INDEX_NAME not in folder.entries:
        if SINGLE not in folder.entries:
            problems.add(f"{SINGLE}: missing (and no {INDEX_NAME})")
            return []
        return [SINGLE]
    weight_map = index.get("weight_map") if index is not None else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        if index is not None:
            problems.add(f"{INDEX_NAME}: weight_map is not an object of file names")
        return sorted(f for f in folder.entries if f.endswith(".safetensors"))
    listed = sorted(set(weight_map.values()))
    names = [f"model-{i:05d}-of-{len(listed):05d}.safetensors" for i in range(1, len(listed) + 1)]
    if listed != names or len(listed) < 2:
        problems.add(f"{INDEX_NAME}: names {describe(listed)}; a conversion writes an index only for two or "
                     "more shards model-0000i-of-0000N.safetensors")
    for file in listed:
        if file not in folder.entries:
            problems.add(f"{INDEX_NAME}: names {_shown(file)}, which is missing")
    return [f for f in listed if f in folder.entries]


def _read_headers(folder: _Folder, files: list[str], names: set[str]) -> tuple[dict[str, _Stored], int, bool]:
    """The stored tensors a conversion writes (`names`), by name, the bytes all tensors hold and whether every
    header could be read; every other tensor, a tensor stored twice and a malformed header is a problem."""
    found: dict[str, _Stored] = {}
    total, complete = 0, True
    for file in files:
        entries = _read_header(folder, file)
        complete = complete and entries is not None
        for name, stored in entries or []:
            total += stored.end - stored.begin
            if name not in names:
                folder.problems.add(f"{_shown(file)}: unexpected tensor {_shown(name)}")
            elif name in found:
                folder.problems.add(f"{name}: stored twice ({_shown(found[name].file)} and {_shown(file)})")
            else:
                found[name] = stored
    return found, total, complete


def _read_header(folder: _Folder, file: str) -> list[tuple[str, _Stored]] | None:
    """The well-formed entries of a safetensors header (None if it cannot be read); what is wrong with the
    file goes to the problems."""
    problems, label = folder.problems, _shown(file)
    if not folder.readable(file):
        return None
    try:
        with open(folder.join(file), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            length = safetensors.header_length(f.read(safetensors.LENGTH.size), size, JSON_LIMIT)
            if isinstance(length, str):
                problems.add(f"{label}: {length}")
                return None
            data = f.read(length)
    except OSError as exc:
        problems.add(f"{label}: cannot be read ({exc.strerror})")
        return None
    header = _parse_json(data, f"{label}: header", problems)
    if header is NOT_JSON:
        return None
    if not isinstance(header, dict):
        problems.add(f"{label}: header is {json_kind(header)}, not a JSON object")
        return None
    if header.pop("__metadata__", None) != safetensors.METADATA:
        problems.add(f'{label}: metadata is not {{"format": "pt"}}')
    start = safetensors.LENGTH.size + length
    stored = []
    for name, entry in header.items():
        parsed = safetensors.parse_entry(entry, start)
        if isinstance(parsed, str):
            problems.add(f"{label}: tensor {_shown(name)}: {parsed}")
            continue
        stored.append((name, _Stored(file, *parsed)))
    for wrong in safetensors.layout_problems((s for _, s in stored), start, size):
        problems.add(f"{label}: {wrong}")
    return stored


def _check_index(index: dict, found: dict[str, _Stored], total: int, problems: _Problems) -> None:
    if index.get("metadata") != {"total_size": total}:
        problems.add(f"{INDEX_NAME}: metadata is {describe(index.get('metadata'))}, expected "
                     f"{{'total_size': {total}}} (the bytes the shards hold)")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        return  # said by _shard_files
    for name, file in weight_map.items():
        if name not in found:
            problems.add(f"{INDEX_NAME}: maps {_shown(name)}, which no shard holds as written by a conversion")
        elif found[name].file != file:
            problems.add(f"{INDEX_NAME}: maps {name} to {describe(file)}, but it is in {_shown(found[name].file)}")
    for name in found:
        if name not in weight_map:
            problems.add(f"{INDEX_NAME}: does not map {name}")


def _check_tokenizer(folder: _Folder, given: bytes | None, shipped: bytes | None, config: dict, plan: Plan,
                     checkpoint_files: dict[str, bytes]) -> set[str]:
    """Check the tokenizer files a conversion writes and return their names (none without a tokenizer)."""
    problems = folder.problems
    model = given if given is not None else shipped
    if not plan.family.sentencepiece:  # a Hugging Face tokenizer's files, copied as they are, or none
        for name, data in checkpoint_files.items():
            if name not in folder.entries:
                problems.add(f"{name}: missing (a conversion copies the checkpoint's tokenizer)")
            elif folder.read(name, tokenizer.MAX_BYTES) != data:
                problems.add(f"{name}: differs from the checkpoint's")
        return set(checkpoint_files)
    if model is None:
        if tokenizer.CONFIG_FILE not in folder.entries and tokenizer.MODEL_FILE not in folder.entries:
            return set()
        if tokenizer.MODEL_FILE not in folder.entries:  # (else it could not be read: said)
            problems.add(f"{tokenizer.MODEL_FILE}: missing ({tokenizer.CONFIG_FILE} is there: a conversion "
                         "writes both)")
    elif tokenizer.sentencepiece_available() and tokenizer.vocab_size(model) is None:
        if given is not None:
            return set()  # a conversion copies no tokenizer that sentencepiece cannot read
        problems.add(f"{tokenizer.MODEL_FILE}: not a SentencePiece model that sentencepiece can load")
    elif tokenizer.MODEL_FILE not in folder.entries:
        problems.add(f"{tokenizer.MODEL_FILE}: missing (a conversion ships the tokenizer)")
    elif shipped is not None and shipped != model:
        problems.add(f"{tokenizer.MODEL_FILE}: differs from the checkpoint's tokenizer (or --tokenizer's)")
    settings = folder.json_object(tokenizer.CONFIG_FILE)
    if tokenizer.CONFIG_FILE not in folder.entries:
        problems.add(f"{tokenizer.CONFIG_FILE}: missing (a conversion writes it with the tokenizer)")
    elif settings is not None and settings != (expected := plan.family.tokenizer_settings(config)):
        problems.add(f"{tokenizer.CONFIG_FILE}: is {describe(settings)}, expected {expected}")
    return {tokenizer.MODEL_FILE, tokenizer.CONFIG_FILE}


def _check_tensors(plan: Plan, found: dict[str, _Stored], complete: bool, problems: _Problems) -> list[TensorSpec]:
    """The output tensors whose dtype, shape and size on disk are right; each other one is a problem (those
    missing in one line if a header could not be read: they may be behind it)."""
    right = []
    missing = [spec.name for spec in plan.tensors if spec.name not in found]
    if missing and not complete:
        problems.add(f"{len(missing)} of {len(plan.tensors)} tensors are not in the shards whose header could be "
                     f"read ({missing[0]}, ...)")
    for spec in plan.tensors:
        stored = found.get(spec.name)
        expected = (safetensors.DTYPES[spec.dtype].code, list(spec.recipe.shape))
        if stored is None:
            if complete:
                problems.add(f"{spec.name}: missing from the output")
        elif (stored.dtype, stored.shape) != expected:
            problems.add(f"{spec.name}: {_shown(stored.dtype)} {describe(stored.shape)} on disk, expected "
                         f"{expected[0]} {expected[1]}")
        elif stored.end - stored.begin != spec.nbytes:
            problems.add(f"{spec.name}: {stored.end - stored.begin} bytes on disk, expected {spec.nbytes}")
        else:
            right.append(spec)
    return right


def _compare_bytes(checkpoint: Checkpoint, folder: _Folder, specs: list[TensorSpec], found: dict[str, _Stored]) -> None:
    """Compare each tensor's bytes on disk with the converted source's, a chunk at a time."""
    maps: dict[str, mmap.mmap | None] = {}  # each shard mapped once, for the whole comparison
    for stored in found.values():
        if stored.file not in maps:
            maps[stored.file] = _map(folder, stored.file)
    readable = [s for s in specs if (m := maps[found[s.name].file]) is not None and found[s.name].end <= len(m)]
    pieces = [(spec, piece) for spec in readable for piece in spec.pieces()]  # (as the conversion moves them)
    sources = [source_of(piece, checkpoint) for _, piece in pieces]  # (unreadable, or truncated: said)
    arranged = [piece.nbytes for (_, piece), source in zip(pieces, sources, strict=True)
                if buffered(piece, source, "cpu")]
    buffer = np.empty(max([*arranged, CHUNK_BYTES]), dtype=np.uint8)  # touched only as far as it is used
    arranger = Arranger()
    reads = ReadAhead(checkpoint, read_chunks(readable, checkpoint, "cpu"), read_buffer_bytes(readable))
    differ: set[str] = set()
    try:
        for (spec, piece), source in zip(pieces, sources, strict=True):
            stored = found[spec.name]
            first = _first_difference(_converted(piece, source, buffer, arranger, reads.get), maps[stored.file],
                                      stored.begin + piece.begin - spec.begin)
            if first is not None and spec.name not in differ:
                differ.add(spec.name)
                folder.problems.add(f"{spec.name}: bytes differ from the converted source (first at byte "
                                    f"{first - stored.begin} of the tensor, file offset {first} in "
                                    f"{_shown(stored.file)})")
    finally:
        reads.close()
        arranger.close()


def _map(folder: _Folder, file: str) -> mmap.mmap | None:
    try:
        with open(folder.join(file), "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:  # (an empty file cannot be mapped: said with its header)
        if isinstance(exc, OSError):
            folder.problems.add(f"{_shown(file)}: cannot be read ({exc.strerror})")
        return None


def _converted(spec: TensorSpec, source: Any, buffer: np.ndarray, arranger: Arranger, fetch: Fetch
               ) -> Iterator[tuple[np.ndarray, Callable[[], None]]]:
    """The bytes a conversion writes for `spec`, at most CHUNK_BYTES at a time, each with the call that hands
    them back once compared: a tensor that passes through or is only cast as the conversion moves it (a cast
    into `buffer`), any other arranged into `buffer` as the conversion arranges it."""
    if not buffered(spec, source, "cpu"):
        chunks = in_order_chunks(spec, source, "cpu", arranger, fetch, lambda _written: (buffer, lambda: None))
        yield from ((data, done) for data, done, _ in chunks)
        return
    arrange_into(buffer, spec, source, "cpu", arranger, fetch)
    for start in range(0, spec.nbytes, CHUNK_BYTES):
        yield buffer[start : min(start + CHUNK_BYTES, spec.nbytes)], lambda: None


def _first_difference(chunks: Iterator[tuple[np.ndarray, Callable[[], None]]], mapping: mmap.mmap,
                      begin: int) -> int | None:
    """The file position of the first byte where the output differs from `chunks`, which it holds from
    `begin` on; None if none. COMPARE_BYTES are compared at a time, and the output's pages handed back after
    each (whole pages: a neighbour's edge page faults back in from the page cache). Every chunk is taken, the
    ones after a difference unread, so that the reads ahead stay in step."""
    on_disk = np.frombuffer(mapping, dtype=np.uint8)
    at, first = begin, None
    for chunk, done in chunks:
        for start in range(0, chunk.nbytes if first is None else 0, COMPARE_BYTES):
            expected = chunk[start : start + COMPARE_BYTES]
            actual = on_disk[at : at + expected.nbytes]
            if not np.array_equal(expected, actual):
                first = at + int(np.flatnonzero(expected != actual)[0])
            page = at - at % mmap.PAGESIZE
            mapping.madvise(mmap.MADV_DONTNEED, page, at + expected.nbytes - page)
            if first is not None:
                break
            at += expected.nbytes
        done()
    return first
