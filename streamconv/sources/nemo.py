"""NeMo `.nemo` archives, their extracted folders, and folders of per-rank Lightning `.ckpt` files.

A `.nemo` is a tar (plain since NeMo 1.7, gzip before) of `./model_config.yaml`, the weights (a bare
state_dict saved by torch.save) as `./model_weights.ckpt`, or one per rank as `./mp_rank_XX/...` (TP) or
`./tp_rank_XX_pp_rank_YYY/...` (TP x PP), and artifacts such as the SentencePiece tokenizer, stored as
`<hex>_<name>` and referenced from the yaml as `nemo:<hex>_<name>`; or the same, extracted into a folder.
In a plain tar every weights member is stored contiguously, so it is read in place (`torch_zip.load` at
its offset): nothing is extracted and the memory bound holds as for a `.ckpt`. A gzip tar cannot be
mapped: each weights member is decompressed, streaming, into a temporary file in `scratch` (the output's
parent), which is mapped and then unlinked at once, so it disappears whatever happens next.

Member names are untrusted: they are only matched against the expected names, never used as paths.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Mapping
from typing import IO, Any

from streamconv.errors import ConversionError
from streamconv.sources import parallel, torch_zip
from streamconv.sources.lightning import Checkpoint, MappedFile, mapped_file, refuse, tensors_of

WEIGHTS = "model_weights.ckpt"
CONFIG = "model_config.yaml"
_MAX_CONFIG = 16 * 2**20
_MAX_TOKENIZER = 256 * 2**20
_COPY_CHUNK = 16 * 2**20
_TEMP_PREFIX = ".streamconv-nemo-"

Rank = tuple[int, int]


def is_nemo(path: str) -> bool:
    """A tar (plain or gzip), or a folder with NeMo's member or rank folder names; else left to the .ckpt reader."""
    if os.path.isdir(path):
        return any(name in (WEIGHTS, CONFIG) or parallel.rank_of(name) for name in os.listdir(path))
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    return head.startswith(b"\x1f\x8b") or head[257:262] == b"ustar"


def weights_rank(name: str) -> Rank | None:
    """The rank a member holds weights for: (0, 0) for `model_weights.ckpt`, None if not weights."""
    if name == WEIGHTS:
        return (0, 0)
    folder, _, file = name.partition("/")
    return parallel.rank_of(folder) if file == WEIGHTS else None


def open_nemo(path: str, scratch: str | None = None, say: Callable[[str], None] | None = None) -> Checkpoint:
    """Open a `.nemo` archive, an extracted one or a folder of rank `.ckpt` files, reading no weights.

    A gzip archive's weights are extracted first (said through `say`).
    """
    if os.path.isdir(path):
        return _open_folder(path)
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if gzipped:
        return _open_gzip(path, scratch or os.path.dirname(os.path.abspath(path)), say)
    try:
        with tarfile.open(path, "r:") as tar:
            members = {_normal(m.name): m for m in tar.getmembers() if m.isreg() and not m.issparse()}
            weights = _weights_members(path, members)
            config = _read(path, tar.extractfile(members[CONFIG]), CONFIG) if CONFIG in members else None
            tokenizer = _tokenizer_member(path, config, members)
            tokenizer = _read(path, tar.extractfile(members[tokenizer]), tokenizer) if tokenizer else None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ConversionError(f"{path} is truncated or damaged ({exc}); was the copy interrupted? "
                              "copy or download it again") from None
    size = os.path.getsize(path)
    loaded = {}
    for rank, member in weights.items():
        if member.offset_data + member.size > size:
            raise ConversionError(f"{path} is truncated ({member.name} ends past the end of the file); "
                                  "copy or download it again")
        loaded[rank] = (torch_zip.load(path, member.offset_data, member.size), path)
    return _assemble(path, loaded, config, tokenizer)


def _open_folder(path: str) -> Checkpoint:
    """An extracted `.nemo`, or a folder holding one Lightning `.ckpt` per rank folder."""
    names = os.listdir(path)
    files = {parallel.rank_of(n): _rank_file(path, n) for n in names
             if parallel.rank_of(n) and os.path.isdir(os.path.join(path, n))}
    if os.path.isfile(os.path.join(path, WEIGHTS)):
        if files:
            raise ConversionError(f"{path} holds both {WEIGHTS} and rank folders; keep one or the other")
        files[(0, 0)] = os.path.join(path, WEIGHTS)
    if not files:
        raise ConversionError(f"{path} is a folder without {WEIGHTS} or rank folders (mp_rank_XX, "
                              "tp_rank_XX_pp_rank_YYY); check --checkpoint-path")
    config = None
    if os.path.isfile(os.path.join(path, CONFIG)):
        with open(os.path.join(path, CONFIG), "rb") as f:
            config = _read(path, f, CONFIG)
    tokenizer = _tokenizer_member(path, config, {n: None for n in names if os.path.isfile(os.path.join(path, n))})
    if tokenizer:
        with open(os.path.join(path, tokenizer), "rb") as f:
            tokenizer = _read(path, f, tokenizer)
    return _assemble(path, {rank: (torch_zip.load(file), file) for rank, file in files.items()}, config, tokenizer)


def _rank_file(path: str, folder: str) -> str:
    """The one weights file of a rank folder: `model_weights.ckpt`, or its only Lightning `.ckpt`."""
    inner = os.path.join(path, folder)
    if os.path.isfile(os.path.join(inner, WEIGHTS)):
        return os.path.join(inner, WEIGHTS)
    ckpts = sorted(n for n in os.listdir(inner) if n.endswith(".ckpt") and os.path.isfile(os.path.join(inner, n)))
    if len(ckpts) != 1:
        found = ", ".join(ckpts[:3]) + (", ..." if len(ckpts) > 3 else "") if ckpts else "none"
        raise ConversionError(f"rank folder {inner} should hold one .ckpt file, found {len(ckpts)} ({found}); "
                              "move the other checkpoints of each rank elsewhere")
    return os.path.join(inner, ckpts[0])


def _open_gzip(path: str, scratch: str, say: Callable[[str], None] | None) -> Checkpoint:
    """Decompress each weights member into an unlinked temporary file in `scratch` and open those.

    Extracts left by runs that were killed meanwhile (their process is gone) are removed first.
    """
    import psutil

    for entry in os.listdir(scratch):
        pid = entry.removeprefix(_TEMP_PREFIX).split("-")[0]
        if entry.startswith(_TEMP_PREFIX) and not (pid.isdigit() and psutil.pid_exists(int(pid))):
            os.remove(os.path.join(scratch, entry))
    temps: dict[Rank, str] = {}
    config = None
    artifacts: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r|gz") as tar:
            for member in tar:
                name = _normal(member.name)
                rank = weights_rank(name)
                if not member.isreg():
                    continue
                if name == CONFIG:
                    config = _read(path, tar.extractfile(member), CONFIG)
                elif name.endswith(".model") and "/" not in name:
                    artifacts[name] = _read(path, tar.extractfile(member), name)
                elif rank is not None and rank not in temps:
                    free = shutil.disk_usage(scratch).free
                    if free < member.size:
                        raise ConversionError(f"not enough free space in {scratch} to extract {name} from the "
                                              f"gzip archive {path}: need {member.size} bytes, have {free}")
                    if say is not None:
                        say(f"{path} is gzip-compressed: extracting {name} ({member.size / 1e9:.3f} GB) "
                            f"into a temporary file in {scratch}")
                    fd, temps[rank] = tempfile.mkstemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-", suffix=".ckpt",
                                                       dir=scratch)
                    with os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(tar.extractfile(member), out, _COPY_CHUNK)
                        out.flush()
                        os.fsync(out.fileno())
        if not temps:
            raise ConversionError(f"{path} is a .nemo archive without {WEIGHTS} files; check --checkpoint-path")
        tokenizer = _tokenizer_member(path, config, artifacts)
        checkpoint = _assemble(path, {rank: (torch_zip.load(t), t) for rank, t in temps.items()}, config,
                               artifacts.get(tokenizer) if tokenizer else None)
        for mapped in checkpoint.files:
            mapped.descriptor()  # opened before the unlink below
        checkpoint.note = f"{len(temps)} weights file(s) were extracted from the gzip archive into temporary " \
                          "files, now removed"
        return checkpoint
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ConversionError(f"{path} is truncated or damaged ({exc}); was the copy interrupted? "
                              "copy or download it again") from None
    finally:
        for temp in temps.values():
            os.remove(temp)


def _weights_members(path: str, members: Mapping[str, Any]) -> dict[Rank, Any]:
    weights = {rank: m for name, m in members.items() if (rank := weights_rank(name)) is not None}
    if not weights:
        raise ConversionError(f"{path} is a .nemo archive without {WEIGHTS} files; check --checkpoint-path")
    if WEIGHTS in members and len(weights) > 1:
        raise ConversionError(f"{path} holds both {WEIGHTS} and per-rank weights; re-save the archive with NeMo")
    return weights


def _tokenizer_member(path: str, config: bytes | None, members: Mapping[str, Any]) -> str | None:
    """The SentencePiece model artifact: the one the cfg names (`nemo:<hex>_tokenizer.model`), else the
    only `.model` member."""
    named = None
    if config is not None:
        tokenizer = _parse_config(path, config).get("tokenizer") or {}
        model = tokenizer.get("model") if hasattr(tokenizer, "get") else None
        if isinstance(model, str) and model.startswith("nemo:"):
            named = model.removeprefix("nemo:")
    if named in members:
        return named
    candidates = [name for name in members if name.endswith(".model") and "/" not in name]
    return candidates[0] if len(candidates) == 1 else None


def _assemble(path: str, loaded: Mapping[Rank, tuple[Any, str]], config: bytes | None,
              tokenizer: bytes | None) -> Checkpoint:
    """One Checkpoint from every rank's unpickled weights (bare state_dict or Lightning dict) and file."""
    ranks: dict[Rank, dict] = {}
    files: list[MappedFile] = []
    cfg = _parse_config(path, config) if config is not None else None
    config_name = CONFIG
    for rank, (payload, file) in sorted(loaded.items()):
        if not isinstance(payload, Mapping):
            refuse(path, WEIGHTS, payload)
            raise ConversionError(f"{file} holds a {type(payload).__name__}, not a state_dict")
        lightning = isinstance(payload.get("state_dict"), Mapping)
        if cfg is None and lightning and rank == (0, 0):
            hparams = payload.get("hyper_parameters")
            refuse(path, "hyper_parameters", hparams)
            cfg = hparams.get("cfg") if hasattr(hparams, "get") else None
            config_name = Checkpoint.config_name
        ranks[rank] = tensors_of(path, payload["state_dict"] if lightning else payload)
        files.append(mapped_file(file, ranks[rank]))
    checkpoint = Checkpoint(path=path, tensors={}, hparams=cfg, files=files, config_name=config_name,
                            tokenizer=tokenizer)
    checkpoint.tensors = parallel.merge(path, ranks, checkpoint.hparam)
    return checkpoint


def _read(path: str, f: IO[bytes] | None, name: str) -> bytes:
    limit = _MAX_CONFIG if name == CONFIG else _MAX_TOKENIZER
    text = f.read(limit + 1) if f is not None else b""
    if len(text) > limit:
        raise ConversionError(f"{path}: {name} is larger than {limit} bytes; is this a NeMo archive?")
    return text


def _parse_config(path: str, text: bytes) -> Any:
    """yaml.safe_load (no objects built), then OmegaConf so `${...}` interpolations resolve key by key."""
    import yaml
    from omegaconf import OmegaConf

    try:
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError("not a mapping")
        return OmegaConf.create(data)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"{path}: {CONFIG} cannot be read ({reason}); fix or remove it and pass "
                              "--num-heads") from None


def _normal(name: str) -> str:
    """A member name without leading './' or '/', for comparison only."""
    while name.startswith(("./", "/")):
        name = name[1:] if name.startswith("/") else name[2:]
    return name
