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

import errno
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Mapping
from typing import IO, Any

from streamconv.errors import ConversionError
from streamconv.sources import parallel, safe_pickle, torch_zip
from streamconv.sources.hparams import MAX_CONFIG_BYTES, Config, lightning_cfg, yaml_config
from streamconv.sources.records import Checkpoint, Files, Folder, MappedFile, tensors_of
from streamconv.tokenizer import MAX_BYTES, sentencepiece_available

WEIGHTS = "model_weights.ckpt"
DISTRIBUTED = "model_weights/"  # a distributed checkpoint's folder (megatron-core models, NeMo 1.2x on)
_DISTRIBUTED_MARKS = ("metadata.json", ".metadata")
CONFIG = "model_config.yaml"
_MAX_ARTIFACTS = 4  # top-level .model files kept from a gzip stream, to find the tokenizer among them
_COPY_CHUNK = 16 * 2**20
_TEMP_PREFIX = ".streamconv-nemo-"

Rank = tuple[int, int]
Progress = Callable[[str, int], Any]  # (description, total bytes) -> a bar with update(n) and close()
# (the files of model_weights/, the cfg, where it came from, the tokenizer) -> the checkpoint: sources/mcore.py
OpenDistributed = Callable[[Files, "Config | None", str, "bytes | None"], Checkpoint]


_MAX_TAR_HEADER = 2**20  # a PAX or GNU long-name header (names and a few records: real ones are under 1 kB)


class Members(Files):
    """The files of the archive's `model_weights/` folder, each at its place in a file (the tar itself, read in
    place, or a temporary file extracted from a gzip stream)."""

    def __init__(self, archive: str, places: dict[str, tuple[str, int, int]]) -> None:
        self.label, self.places = f"{archive} ({DISTRIBUTED.rstrip('/')})", places

    def names(self) -> list[str]:
        return sorted(self.places)

    def exists(self, name: str) -> bool:
        return name in self.places

    def locate(self, name: str) -> tuple[str, int, int]:
        if name not in self.places:
            raise ConversionError(f"{self.path(name) if isinstance(name, str) else self.label} is missing; the "
                                  "archive is incomplete, copy or download it again")
        return self.places[name]


def _twice(path: str) -> None:
    raise ConversionError(f"{path} holds a file of {DISTRIBUTED} twice (which one counts differs between readers); "
                          "it is damaged or tampered with, copy or download it again")


def _distributed(names: list[str]) -> list[str]:
    """The members of a distributed checkpoint in `model_weights/`, if the archive holds one."""
    inside = [n for n in names if n.startswith(DISTRIBUTED)]
    return inside if any(n.removeprefix(DISTRIBUTED) in _DISTRIBUTED_MARKS for n in inside) else []


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile's member header, refusing sizes no real archive has: an extended header tarfile would read
    into memory whole (a 30 kB file can say 8 GiB), and a member larger than the archive can hold (a gzip
    stream skips a member by reading it: a size of 10**30, or of -1, would read forever)."""

    max_size = 0  # what the archive can hold: set per archive by `_tar_info`

    def _proc_pax(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:
        self._check_header_size()
        return super()._proc_pax(tarfile)

    def _proc_gnulong(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:
        self._check_header_size()
        return super()._proc_gnulong(tarfile)

    def _proc_member(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:
        self._check_size()
        return super()._proc_member(tarfile)

    def _apply_pax_info(self, pax_headers: dict, encoding: str, errors: str) -> None:
        super()._apply_pax_info(pax_headers, encoding, errors)
        self._check_size()

    def _check_header_size(self) -> None:
        if not 0 <= self.size <= _MAX_TAR_HEADER:
            raise tarfile.HeaderError(f"an extended header of {self.size} bytes")

    def _check_size(self) -> None:
        if not 0 <= self.size <= self.max_size:
            raise tarfile.HeaderError(f"a member of {self.size} bytes in an archive that can hold {self.max_size}")


def _tar_info(path: str, gzipped: bool) -> type[_BoundedTarInfo]:
    """The header class for this archive: no member larger than the file (deflate inflates at most 1032:1)."""
    limit = os.path.getsize(path) * (1032 if gzipped else 1)
    return type("BoundedTarInfo", (_BoundedTarInfo,), {"max_size": limit})


# What tarfile raises on damaged headers, besides its own errors: numbers that do not parse or fit.
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError, OverflowError, UnicodeError)


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


def open_nemo(path: str, scratch: str | None = None, progress: Progress | None = None,
              distributed: OpenDistributed | None = None) -> Checkpoint:
    """Open a `.nemo` archive, an extracted one or a folder of rank `.ckpt` files, reading no weights.

    A gzip archive's weights are extracted first, shown by a `progress(description, total bytes)` bar. A
    distributed checkpoint in `model_weights/` is opened by `distributed`.
    """
    if os.path.isdir(path):
        return _open_folder(path, distributed)
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if gzipped:
        return _open_gzip(path, scratch or os.path.dirname(os.path.abspath(path)), progress, distributed)
    try:
        with tarfile.open(path, "r:", tarinfo=_tar_info(path, gzipped=False)) as tar:
            regular = [m for m in tar.getmembers() if m.isreg() and not m.issparse()]
            members = {_normal(m.name): m for m in regular}
            shards = _distributed(list(members))
            if len(shards) != sum(_normal(m.name).startswith(DISTRIBUTED) for m in regular):
                _twice(path)
            # (a name stored twice is refused)
            weights = {} if shards else _weights_members(path, [_normal(m.name) for m in regular])
            config = _read(path, tar.extractfile(members[CONFIG]), CONFIG) if CONFIG in members else None
            cfg = _parse_config(path, config) if config is not None else None
            tokenizer = _tokenizer_member(cfg, list(members))
            tokenizer = _read(path, tar.extractfile(members[tokenizer]), tokenizer) if tokenizer else None
    except _TAR_ERRORS as exc:
        raise ConversionError(f"{path} is truncated or damaged ({exc}); was the copy interrupted? "
                              "copy or download it again") from None
    size = os.path.getsize(path)
    for name in list(weights.values()) + shards:
        if members[name].offset_data + members[name].size > size:
            raise ConversionError(f"{path} is truncated ({name!r} ends past the end of the file); "
                                  "copy or download it again")
    if shards:
        places = {n.removeprefix(DISTRIBUTED): (path, members[n].offset_data, members[n].size) for n in shards}
        return _open_distributed(distributed, Members(path, places), cfg, tokenizer)
    loaded = {}
    for rank, name in weights.items():
        member = members[name]
        loaded[rank] = (torch_zip.load(path, member.offset_data, member.size, f"{path} ({name})"), path)
    return _assemble(path, loaded, cfg, tokenizer)


def _open_distributed(distributed: OpenDistributed | None, files: Files, cfg: Config | None,
                      tokenizer: bytes | None) -> Checkpoint:
    if distributed is None:
        raise ConversionError(f"{files.label} is a distributed checkpoint; open it with sources.open_checkpoint")
    return distributed(files, cfg, CONFIG, tokenizer)


def _open_folder(path: str, distributed: OpenDistributed | None) -> Checkpoint:
    """An extracted `.nemo`, or a folder holding one Lightning `.ckpt` per rank folder."""
    names = os.listdir(path)
    shards = os.path.join(path, DISTRIBUTED)
    if any(n in names for n in _DISTRIBUTED_MARKS):  # the distributed checkpoint itself, beside the yaml
        shards = path
    if os.path.isdir(shards) and not os.path.islink(shards.rstrip("/")) \
            and any(os.path.lexists(os.path.join(shards, n)) for n in _DISTRIBUTED_MARKS):
        config = _read_file(path, CONFIG, follow=True) if os.path.lexists(os.path.join(path, CONFIG)) else None
        cfg = _parse_config(path, config) if config is not None else None
        name = _tokenizer_member(cfg, names)
        tokenizer = _read_file(path, name, follow=sentencepiece_available()) if name else None
        return _open_distributed(distributed, Folder(shards.rstrip("/")), cfg, tokenizer)
    folders = [n for n in names if parallel.rank_of(n) and os.path.isdir(os.path.join(path, n))]
    if not folders:
        parallel.refuse_expert_ranks(path, names)
    weights = _weights_members(path, folders + ([WEIGHTS] if os.path.isfile(os.path.join(path, WEIGHTS)) else []),
                               folder=True)
    files = {rank: os.path.join(path, WEIGHTS) if name == WEIGHTS else _rank_file(path, name)
             for rank, name in weights.items()}
    config = _read_file(path, CONFIG, follow=True) if os.path.lexists(os.path.join(path, CONFIG)) else None
    cfg = _parse_config(path, config) if config is not None else None
    name = _tokenizer_member(cfg, names)
    # The tokenizer's bytes are copied into the output (which may be published): through a symbolic link only
    # when sentencepiece can check that they are a tokenizer (converter.py copies nothing else).
    tokenizer = _read_file(path, name, follow=sentencepiece_available()) if name else None
    checkpoint = _assemble(path, {rank: (torch_zip.load(file), file) for rank, file in files.items()}, cfg,
                           tokenizer)
    if name and tokenizer is None:
        checkpoint.note = f"{name!r} is a symbolic link: not copied without sentencepiece to check it"
    return checkpoint


def _read_file(path: str, name: str, *, follow: bool) -> bytes | None:
    """A small file of an extracted `.nemo`: a regular file only (a pipe must not block the run), through a
    symbolic link only when `follow` (None for a link that is not followed)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(os.path.join(path, name), flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            return None
        raise ConversionError(f"cannot read {name!r} in {path} ({exc.strerror}); check the folder") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ConversionError(f"{name!r} in {path} is not a regular file (a pipe or a device?); replace it "
                                  "with the file itself")
        return _read(path, f, name)


def _rank_file(path: str, folder: str) -> str:
    """The one weights file of a rank folder: `model_weights.ckpt`, or its only Lightning `.ckpt`."""
    inner = os.path.join(path, folder)
    if os.path.isfile(os.path.join(inner, WEIGHTS)):
        return os.path.join(inner, WEIGHTS)
    ckpts = sorted(n for n in os.listdir(inner) if n.endswith(".ckpt") and os.path.isfile(os.path.join(inner, n)))
    if len(ckpts) != 1:
        found = ", ".join(map(repr, ckpts[:3])) + (", ..." if len(ckpts) > 3 else "") if ckpts else "none"
        raise ConversionError(f"rank folder {inner} should hold one .ckpt file, found {len(ckpts)} ({found}); "
                              "move the other checkpoints of each rank elsewhere")
    return os.path.join(inner, ckpts[0])


def _open_gzip(path: str, scratch: str, progress: Progress | None, distributed: OpenDistributed | None) -> Checkpoint:
    """Decompress each weights member into an unlinked temporary file in `scratch` and open those.

    Extracts left by runs that were killed meanwhile (their process is gone) are removed first.
    """
    import psutil

    for entry in os.listdir(scratch):
        pid = entry.removeprefix(_TEMP_PREFIX).split("-")[0]
        if entry.startswith(_TEMP_PREFIX) and not (pid.isdigit() and psutil.pid_exists(int(pid))):
            os.remove(os.path.join(scratch, entry))
    temps: dict[Rank, str] = {}
    shards: dict[str, str] = {}  # model_weights/ members -> their temporary files
    seen: dict[Rank, str] = {}
    config = None
    artifacts: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r|gz", tarinfo=_tar_info(path, gzipped=True)) as tar:
            for member in tar:
                name = _normal(member.name)
                rank = weights_rank(name)
                if not member.isreg():
                    continue
                if name == CONFIG:
                    config = _read(path, tar.extractfile(member), CONFIG)
                elif _is_artifact(name) and len(artifacts) < _MAX_ARTIFACTS:
                    artifacts[name] = _read(path, tar.extractfile(member), name)
                elif rank is not None:
                    if rank in seen:
                        _weights_members(path, [seen[rank], name])  # refuses the rank held twice
                    seen[rank] = name
                    temps[rank] = _extract(path, tar, member, name, scratch, progress)
                elif name.startswith(DISTRIBUTED):
                    if name in shards:
                        _twice(path)
                    shards[name] = _extract(path, tar, member, name, scratch, progress)
        if _distributed(list(shards)):
            places = {n.removeprefix(DISTRIBUTED): (t, 0, os.path.getsize(t)) for n, t in shards.items()}
            cfg = _parse_config(path, config) if config is not None else None
            tokenizer = _tokenizer_member(cfg, list(artifacts))
            checkpoint = _open_distributed(distributed, Members(path, places), cfg,
                                           artifacts.get(tokenizer) if tokenizer else None)
            checkpoint.note = f"{len(shards)} files of {DISTRIBUTED} were extracted from the gzip archive into " \
                              "temporary files, now removed"
            return checkpoint
        if not temps:
            _weights_members(path, [])  # refuses: no weights
        cfg = _parse_config(path, config) if config is not None else None
        tokenizer = _tokenizer_member(cfg, list(artifacts))
        loaded = {rank: (torch_zip.load(t, label=f"{path} ({seen[rank]})"), t) for rank, t in temps.items()}
        checkpoint = _assemble(path, loaded, cfg, artifacts.get(tokenizer) if tokenizer else None)
        checkpoint.note = f"{len(temps)} weights file(s) were extracted from the gzip archive into temporary " \
                          "files, now removed"
        return checkpoint
    except (*_TAR_ERRORS, zlib.error) as exc:
        raise ConversionError(f"{path} is truncated or damaged ({exc}); was the copy interrupted? "
                              "copy or download it again") from None
    finally:
        for temp in [*temps.values(), *shards.values()]:
            os.remove(temp)


def _extract(path: str, tar: tarfile.TarFile, member: tarfile.TarInfo, name: str, scratch: str,
             progress: Progress | None) -> str:
    """Decompress one member into a new temporary file in `scratch`, shown by a `progress` bar."""
    free = shutil.disk_usage(scratch).free
    if free < member.size:
        raise ConversionError(f"not enough free space in {scratch} to extract {name!r} from the "
                              f"gzip archive {path}: need {member.size} bytes, have {free}")
    fd, temp = tempfile.mkstemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-", suffix=".ckpt", dir=scratch)
    bar = progress(f"extracting {name} (gzip)", member.size) if progress else None
    try:
        with os.fdopen(fd, "wb") as out:
            source = tar.extractfile(member)
            while chunk := source.read(_COPY_CHUNK):
                out.write(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        os.remove(temp)
        raise
    finally:
        if bar is not None:
            bar.close()
    return temp


def _weights_members(path: str, names: list[str], folder: bool = False) -> dict[Rank, str]:
    """Rank -> the member (or rank folder) holding its weights; refuses a rank held twice."""
    weights: dict[Rank, str] = {}
    for name in names:
        rank = parallel.rank_of(name) if folder and name != WEIGHTS else weights_rank(name)
        if rank is None:
            continue
        if rank in weights:
            raise ConversionError(f"{path} holds the weights of one rank twice, in {weights[rank]!r} and {name!r} "
                                  f"({WEIGHTS} is the single rank of a whole model); keep one of them")
        weights[rank] = name
    if not weights:
        parallel.refuse_expert_ranks(path, names)
        raise ConversionError(f"{path} has no {WEIGHTS} and no rank folders (mp_rank_XX, tp_rank_XX_pp_rank_YYY); "
                              "check --checkpoint-path")
    return weights


def _is_artifact(name: str) -> bool:
    """A top-level `.model` file: where NeMo stores a SentencePiece tokenizer (`<hex>_tokenizer.model`)."""
    return name.endswith(".model") and "/" not in name


def _tokenizer_member(cfg: Any, names: list[str]) -> str | None:
    """The SentencePiece model artifact: the one the cfg names (`nemo:<hex>_tokenizer.model`), else the
    only top-level `.model` file."""
    candidates = [name for name in names if _is_artifact(name)]
    if cfg is not None:
        try:
            model = cfg.get("tokenizer.model")
        except ConversionError:  # an interpolation that does not resolve: the tokenizer is looked for by name
            model = None
        if isinstance(model, str) and model.removeprefix("nemo:") in candidates:
            return model.removeprefix("nemo:")
    return candidates[0] if len(candidates) == 1 else None


def _assemble(path: str, loaded: Mapping[Rank, tuple[Any, str]], cfg: Any, tokenizer: bytes | None) -> Checkpoint:
    """One Checkpoint from every rank's unpickled weights (bare state_dict or Lightning dict) and file, with
    the cfg from model_config.yaml (None: rank 0's Lightning hyper_parameters, if any)."""
    state_dicts: dict[Rank, tuple[Mapping, str]] = {}
    config_name = CONFIG
    for rank, (payload, file) in sorted(loaded.items()):
        if not isinstance(payload, Mapping):
            safe_pickle.refuse(path, WEIGHTS, payload)
            raise ConversionError(f"{path}: the weights of rank {rank} hold a {type(payload).__name__}, not a "
                                  "state_dict; is this a NeMo checkpoint?")
        lightning = isinstance(payload.get("state_dict"), Mapping)
        if cfg is None and lightning and rank == (0, 0):
            cfg = lightning_cfg(path, payload)
            config_name = Checkpoint.config_name
        state_dicts[rank] = (payload["state_dict"] if lightning else payload, file)
    files: dict[str, MappedFile] = {}  # the ranks inside one plain tar share its mapping
    try:
        for _, file in state_dicts.values():
            if file not in files:
                files[file] = MappedFile(file)
        ranks = {rank: tensors_of(path, state_dict, files[file]) for rank, (state_dict, file) in state_dicts.items()}
        checkpoint = Checkpoint(path=path, tensors={}, hparams=cfg, files=list(files.values()),
                                config_name=config_name, tokenizer=tokenizer)
        checkpoint.tensors = parallel.merge(path, ranks, checkpoint.hparam, cfg is not None)
        checkpoint.local_slices = 1 + max(t for t, _ in ranks)
    except BaseException:
        for mapped in files.values():
            mapped.close()
        raise
    return checkpoint


def _read(path: str, f: IO[bytes] | None, name: str) -> bytes:
    limit = MAX_CONFIG_BYTES if name == CONFIG else MAX_BYTES
    text = f.read(limit + 1) if f is not None else b""
    if len(text) > limit:
        raise ConversionError(f"{path}: {name} is larger than {limit} bytes; is this a NeMo archive?")
    return text


def _parse_config(path: str, text: bytes) -> Config | None:
    return yaml_config(f"{path} ({CONFIG})", text)


def _normal(name: str) -> str:
    """A member name without leading './' or '/', for comparison only."""
    while name.startswith(("./", "/")):
        name = name[1:] if name.startswith("/") else name[2:]
    return name
