"""NeMo `.nemo` archives of a consolidated model (tensor and pipeline parallel size 1).

A `.nemo` is a tar (plain since NeMo 1.7, gzip before) of `./model_config.yaml`, `./model_weights.ckpt`
(a bare state_dict saved by torch.save) and tokenizer artifacts; or the same, already extracted into a
folder. In a plain tar the weights member is stored contiguously, so it is read in place
(`torch_zip.load` at its offset): nothing is extracted and the memory bound holds as for a `.ckpt`. A gzip
tar cannot be mapped: its weights are decompressed, streaming, into a temporary file in `scratch` (the
output's parent), which is mapped and then unlinked at once, so it disappears whatever happens next.

Member names are untrusted: they are only compared with the two names needed, never used as paths.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Mapping
from typing import IO, Any

from streamconv.errors import ConversionError
from streamconv.sources import torch_zip
from streamconv.sources.lightning import Checkpoint, checkpoint_from_state_dict, refuse

WEIGHTS = "model_weights.ckpt"
CONFIG = "model_config.yaml"
_RANK = re.compile(r"^(mp_rank_\d+|tp_rank_\d+_pp_rank_\d+)(/|$)")
_MAX_CONFIG = 16 * 2**20
_COPY_CHUNK = 16 * 2**20
_TEMP_PREFIX = ".streamconv-nemo-"


def is_nemo(path: str) -> bool:
    """A tar (plain or gzip) or a folder with NeMo's member names; anything else is left to the .ckpt reader."""
    if os.path.isdir(path):
        return any(name in (WEIGHTS, CONFIG) or _RANK.match(name) for name in os.listdir(path))
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    return head.startswith(b"\x1f\x8b") or head[257:262] == b"ustar"


def open_nemo(path: str, scratch: str | None = None, say: Callable[[str], None] | None = None) -> Checkpoint:
    """Open a `.nemo` archive or extracted folder without reading any weights (a gzip one is extracted)."""
    if os.path.isdir(path):
        names = os.listdir(path)
        _refuse_ranks(path, names)
        weights = os.path.join(path, WEIGHTS)
        if not os.path.isfile(weights):
            raise ConversionError(f"{path} is a .nemo folder without {WEIGHTS}; check --checkpoint-path")
        config = None
        if os.path.isfile(os.path.join(path, CONFIG)):
            with open(os.path.join(path, CONFIG), "rb") as f:
                config = _read_config(path, f)
        return _checkpoint(path, weights, torch_zip.load(weights), config)
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if gzipped:
        return _open_gzip(path, scratch or os.path.dirname(os.path.abspath(path)), say)
    try:
        with tarfile.open(path, "r:") as tar:
            members = {_normal(m.name): m for m in tar.getmembers()}
            _refuse_ranks(path, list(members))
            weights = members.get(WEIGHTS)
            if weights is None or not weights.isreg() or weights.issparse():
                raise ConversionError(f"{path} is a .nemo archive without a {WEIGHTS} file; check --checkpoint-path")
            config = members.get(CONFIG)
            text = _read_config(path, tar.extractfile(config)) if config is not None and config.isreg() else None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ConversionError(f"{path} is truncated or damaged ({exc}); was the copy interrupted? "
                              "copy or download it again") from None
    if weights.offset_data + weights.size > os.path.getsize(path):
        raise ConversionError(f"{path} is truncated ({WEIGHTS} ends past the end of the file); "
                              "copy or download it again")
    return _checkpoint(path, path, torch_zip.load(path, weights.offset_data, weights.size), text)


def _open_gzip(path: str, scratch: str, say: Callable[[str], None] | None) -> Checkpoint:
    """Decompress the weights member into an unlinked temporary file in `scratch` and open that.

    Extracts left by runs that were killed meanwhile (their process is gone) are removed first.
    """
    import psutil

    for entry in os.listdir(scratch):
        pid = entry.removeprefix(_TEMP_PREFIX).split("-")[0]
        if entry.startswith(_TEMP_PREFIX) and not (pid.isdigit() and psutil.pid_exists(int(pid))):
            os.remove(os.path.join(scratch, entry))
    fd, temp = tempfile.mkstemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-", suffix=".ckpt", dir=scratch)
    try:
        found, text = False, None
        with os.fdopen(fd, "wb") as out, tarfile.open(path, "r|gz") as tar:
            for member in tar:
                name = _normal(member.name)
                _refuse_ranks(path, [name])
                if name == CONFIG and member.isreg():
                    text = _read_config(path, tar.extractfile(member))
                elif name == WEIGHTS and member.isreg() and not found:
                    free = shutil.disk_usage(scratch).free
                    if free < member.size:
                        raise ConversionError(f"not enough free space in {scratch} to extract {WEIGHTS} from "
                                              f"the gzip archive {path}: need {member.size} bytes, have {free}")
                    if say is not None:
                        say(f"{path} is gzip-compressed: extracting {WEIGHTS} ({member.size / 1e9:.3f} GB) "
                            f"into a temporary file in {scratch}")
                    shutil.copyfileobj(tar.extractfile(member), out, _COPY_CHUNK)
                    found = True
            out.flush()
            os.fsync(out.fileno())
        if not found:
            raise ConversionError(f"{path} is a .nemo archive without a {WEIGHTS} file; check --checkpoint-path")
        checkpoint = _checkpoint(path, temp, torch_zip.load(temp), text)
        checkpoint.__dict__["fd"] = os.open(temp, os.O_RDONLY)  # opened before the unlink below
        checkpoint.note = f"{WEIGHTS} was extracted from the gzip archive into a temporary file, now removed"
        return checkpoint
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ConversionError(f"{path} is truncated or damaged ({exc}); was the copy interrupted? "
                              "copy or download it again") from None
    finally:
        os.remove(temp)


def _checkpoint(path: str, file: str, payload: Any, config: bytes | None) -> Checkpoint:
    """The state_dict (bare, or inside a Lightning dict) with the cfg from model_config.yaml."""
    if not isinstance(payload, Mapping):
        refuse(path, WEIGHTS, payload)
        raise ConversionError(f"{path}: {WEIGHTS} holds a {type(payload).__name__}, not a state_dict")
    state_dict = payload["state_dict"] if isinstance(payload.get("state_dict"), Mapping) else payload
    cfg = _parse_config(path, config) if config is not None else None
    checkpoint = checkpoint_from_state_dict(path, state_dict, cfg, file=file, config_name=CONFIG)
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        if checkpoint.hparam(key) not in (None, 1):
            raise ConversionError(f"{path} has {key} = {checkpoint.hparam(key)}: tensor/pipeline-parallel "
                                  "archives are not supported yet; merge the ranks with NeMo first")
    return checkpoint


def _read_config(path: str, f: IO[bytes] | None) -> bytes:
    text = f.read(_MAX_CONFIG + 1) if f is not None else b""
    if len(text) > _MAX_CONFIG:
        raise ConversionError(f"{path}: {CONFIG} is larger than {_MAX_CONFIG} bytes; is this a NeMo archive?")
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


def _refuse_ranks(path: str, names: list[str]) -> None:
    ranks = sorted({m.group(1) for m in map(_RANK.match, names) if m})
    if ranks:
        raise ConversionError(f"{path} holds tensor/pipeline-parallel ranks ({', '.join(ranks[:3])}"
                              f"{', ...' if len(ranks) > 3 else ''}): TP/PP archives are not supported yet; "
                              "merge the ranks with NeMo first")
