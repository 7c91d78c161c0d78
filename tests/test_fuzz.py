"""Mutation fuzz: seeded mutants of a small .ckpt and .nemo, each run through the CLI in a capped child process.

Every mutant must either convert (exit 0, and `--verify` then passes) or be refused in one line (exit 2, "streamconv:
error: ...") with nothing written; a traceback, another exit code, a hang, a memory-cap breach, a leftover file or a
changed input fails. All failures of a run are reported together, grouped by kind, each with the seed to replay it:

    STREAMCONV_FUZZ_SEED=1234 pytest tests/test_fuzz.py     # only that mutant (or a comma-separated list of seeds)
    STREAMCONV_FUZZ_N=1500 pytest -s tests/test_fuzz.py     # seeds 0..1499 (default 300, about a minute on 2 cores)
    STREAMCONV_FUZZ_KEEP=/tmp/mutants ...                   # copy each failing mutant there, to run the CLI on it
    STREAMCONV_FUZZ_LOG=/tmp/fuzz.jsonl ...                 # one JSON line per mutant: seed, mutation, outcome

A mutant is a pure function of its seed: the base files are deterministic (torch.save is; the tar is rebuilt with
fixed times). Mutated: the pickle (data.pkl, re-zipped as torch lays it out, CRCs right), the zip central
directory and local headers, the tar headers (checksums recomputed, PAX records edited in place) and the
model_config.yaml text; by bit flips, truncations, inserted or deleted byte runs and field edits (sizes, offsets,
lengths, methods, flags, types set to 0, the maximum, a random or a special value).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import pickletools
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from streamconv.demo import SyntheticModel, make_checkpoint
from tests.writers import make_nemo

MODEL = SyntheticModel(n_embd=16, n_layer=1, n_head=2, vocab_size=60, n_positions=16, make_vocab_size_divisible_by=8)
VOCAB = "60"  # the 64 embedding rows hold 60 tokens and 4 rows of padding
TIMEOUT_S = 30
AS_CAP = 3 << 30  # RLIMIT_AS of the child: generous (threads reserve address space), a backstop for the RSS bound
# A tiny conversion peaks at about 40 MB of RSS, 240 MB when a cast imports torch; the largest tensor is 4 kB.
RSS_BASE = 400 << 20
RSS_PER_INPUT_BYTE = 32
WORKERS = 2
STREAMCONV = (sys.executable, "-m", "streamconv")

# (base, target), uniformly drawn; tar and yaml count twice as the .nemo's own parts.
TARGETS = [(b, t) for b in ("ckpt-adam", "ckpt") for t in ("pickle", "cd", "local")]
TARGETS += [("nemo", t) for t in ("tar", "tar", "yaml", "yaml", "pickle", "cd", "local")]


@dataclass
class Mutant:
    seed: int
    base: str
    target: str
    mutation: str
    data: bytes = field(repr=False)
    suffix: str


@dataclass
class Outcome:
    kind: str  # "converted", "refused" or a failure: "traceback", "exit 1", "timeout", "memory", ...
    detail: str = ""
    rss: int = 0  # the conversion's peak RSS, bytes
    seconds: float = 0.0  # and its wall time

    @property
    def ok(self) -> bool:
        return self.kind in ("converted", "refused")


# --- Byte-level mutations -----------------------------------------------------------------------------------------

RUNS = (1, 2, 3, 8, 64, 512)


def mutate_bytes(rng: random.Random, buf: bytearray, lo: int, hi: int, ops: tuple[str, ...]) -> str:
    """Apply one of `ops` (flip, truncate, insert, delete) at a position in [lo, hi) of `buf`; describe it."""
    op = rng.choice(ops)
    at = rng.randrange(lo, max(lo + 1, hi))
    if op == "flip":
        spots = sorted({rng.randrange(lo, max(lo + 1, hi)) for _ in range(rng.choice((1, 1, 2, 3, 8)))})
        for p in spots:
            buf[p] = buf[p] ^ (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.randrange(256)
        return f"flip bytes at {spots}"
    if op == "truncate":
        del buf[at:]
        return f"truncate at {at}"
    n = rng.choice(RUNS)
    if op == "insert":
        run = rng.randbytes(n) if rng.random() < 0.5 else bytes(buf[at:at + n])  # noise, or a repeat of structure
        buf[at:at] = run
        return f"insert {len(run)} bytes at {at}"
    del buf[at:at + n]
    return f"delete {n} bytes at {at}"


def set_le_field(rng: random.Random, buf: bytearray, pos: int, size: int, special: tuple[int, ...] = ()) -> str:
    """Set the little-endian unsigned field buf[pos:pos+size] to 0, its maximum, +-1, a random or special value."""
    old = int.from_bytes(buf[pos:pos + size], "little")
    top = (1 << 8 * size) - 1
    value = rng.choice((0, top, top >> 1, (old + 1) & top, (old - 1) & top, rng.randrange(top + 1), *special))
    buf[pos:pos + size] = value.to_bytes(size, "little")
    return f"{old} -> {value}"


# --- The pickle ---------------------------------------------------------------------------------------------------

# Opcodes whose argument (a number, or the length of what follows) sits right after the opcode byte.
PICKLE_FIELDS = {"BININT": 4, "BININT1": 1, "BININT2": 2, "LONG1": 1, "BINPUT": 1, "LONG_BINPUT": 4, "BINGET": 1,
                 "LONG_BINGET": 4, "BINUNICODE": 4, "SHORT_BINUNICODE": 1, "BINBYTES": 4, "SHORT_BINBYTES": 1,
                 "FRAME": 8, "PROTO": 1}


def mutate_pickle(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    buf = bytearray(data)
    if rng.random() < 0.4:
        fields = [(op.name, pos) for op, _, pos in pickletools.genops(data) if op.name in PICKLE_FIELDS]
        name, pos = rng.choice(fields)
        what = f"{name} at {pos}: " + set_le_field(rng, buf, pos + 1, PICKLE_FIELDS[name])
    else:
        what = mutate_bytes(rng, buf, 0, len(buf), ("flip", "flip", "truncate", "insert", "delete"))
    return bytes(buf), what


def rezip(files: list[tuple[str, bytes]]) -> bytes:
    """A stored zip of `files` in this order, each member's data 64-byte aligned as torch.save aligns it."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, data in files:
            start = out.tell() + 30 + len(name.encode()) + 4
            pad = -start % 64
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # torch's "FB" padding field
            archive.writestr(info, data)
    return out.getvalue()


def mutate_zip_pickle(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        files = [(i.filename, archive.read(i)) for i in archive.infolist()]
    i = next(k for k, (name, _) in enumerate(files) if name.endswith("/data.pkl"))
    pickle_bytes, what = mutate_pickle(rng, files[i][1])
    files[i] = (files[i][0], pickle_bytes)
    return rezip(files), f"data.pkl {what}"


# --- The zip's central directory and local headers ----------------------------------------------------------------

METHODS, FLAGS, VERSIONS = (8, 12, 14, 93, 99), (1, 8, 0x20, 0x40, 0x2000), (20, 45, 63, 64, 0xFF)
CD_FIELDS = {"version made by": (4, 2, ()), "version needed": (6, 2, VERSIONS), "flags": (8, 2, FLAGS),
             "method": (10, 2, METHODS), "crc": (16, 4, ()), "compressed size": (20, 4, ()),
             "size": (24, 4, ()), "name length": (28, 2, ()), "extra length": (30, 2, ()),
             "comment length": (32, 2, ()), "disk": (34, 2, ()), "external attributes": (38, 4, ()),
             "local header offset": (42, 4, ())}
EOCD_FIELDS = {"disk": (4, 2, ()), "directory disk": (6, 2, ()), "entries on disk": (8, 2, ()),
               "entries": (10, 2, ()), "directory size": (12, 4, ()), "directory offset": (16, 4, ()),
               "comment length": (20, 2, ())}
LOCAL_FIELDS = {"version needed": (4, 2, VERSIONS), "flags": (6, 2, FLAGS), "method": (8, 2, METHODS),
                "crc": (14, 4, ()), "compressed size": (18, 4, ()), "size": (22, 4, ()),
                "name length": (26, 2, ()), "extra length": (28, 2, ())}


@dataclass
class ZipEntry:
    name: str
    cd: int  # offset of its central-directory record
    cd_size: int
    local: int  # offset of its local header
    local_size: int  # local header with name and extra field


def zip_layout(data: bytes) -> tuple[int, list[ZipEntry]]:
    """The end-of-central-directory record's offset and every entry, read from the bytes (no zipfile)."""
    eocd = data.rfind(b"PK\x05\x06")
    count, _, cd = struct.unpack_from("<HII", data, eocd + 10)
    entries = []
    for _ in range(count):
        n, m, k = struct.unpack_from("<HHH", data, cd + 28)
        local = struct.unpack_from("<I", data, cd + 42)[0]
        ln, lm = struct.unpack_from("<HH", data, local + 26)
        entries.append(ZipEntry(data[cd + 46:cd + 46 + n].decode(), cd, 46 + n + m + k, local, 30 + ln + lm))
        cd += 46 + n + m + k
    return eocd, entries


def pick_entry(rng: random.Random, entries: list[ZipEntry]) -> ZipEntry:
    """data.pkl a third of the time, byteorder a sixth, else any entry."""
    r = rng.random()
    suffix = "/data.pkl" if r < 1 / 3 else "/byteorder" if r < 1 / 2 else None
    found = next((e for e in entries if e.name.endswith(suffix)), None) if suffix else None
    return found or rng.choice(entries)


def mutate_zip_headers(rng: random.Random, data: bytes, target: str) -> tuple[bytes, str]:
    eocd, entries = zip_layout(data)
    buf = bytearray(data)
    entry = pick_entry(rng, entries)
    if target == "cd" and rng.random() < 1 / 6:
        where, start, size, fields = "end of central directory", eocd, 22, EOCD_FIELDS
    elif target == "cd":
        where, start, size, fields = f"central record of {entry.name}", entry.cd, entry.cd_size, CD_FIELDS
    else:
        where, start, size, fields = f"local header of {entry.name}", entry.local, entry.local_size, LOCAL_FIELDS
    r = rng.random()
    if r < 0.5:
        field = rng.choice(sorted(fields))
        offset, width, special = fields[field]
        what = f"{where}: {field} " + set_le_field(rng, buf, start + offset, width, special)
    elif r < 0.75:
        what = f"{where}: " + mutate_bytes(rng, buf, start, start + size, ("flip",))
    else:
        lo, hi = (entries[0].cd, len(buf)) if target == "cd" else (start, start + size)
        what = f"{target}: " + mutate_bytes(rng, buf, lo, hi, ("truncate", "insert", "delete"))
    return bytes(buf), what


# --- The tar (.nemo) ------------------------------------------------------------------------------------------------

USTAR_FIELDS = {"name": (0, 100), "mode": (100, 8), "uid": (108, 8), "gid": (116, 8), "size": (124, 12),
                "mtime": (136, 12), "typeflag": (156, 1), "linkname": (157, 100), "magic": (257, 6),
                "version": (263, 2), "uname": (265, 32), "gname": (297, 32), "devmajor": (329, 8),
                "devminor": (337, 8), "prefix": (345, 155)}
NAMES = (b"../escape", b"/etc/passwd", b"./model_weights.ckpt", b"./model_config.yaml", b"", b"a" * 100,
         b"./x/../../y", b"./mp_rank_00/model_weights.ckpt")
TYPES = b"0123456789xgLKSDMV\0A"


def tar_headers(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, typeflag) of every header block, PAX ones included, walked from the ustar size fields."""
    headers, pos = [], 0
    while pos + 512 <= len(data) and data[pos:pos + 512].strip(b"\0"):
        headers.append((pos, data[pos + 156:pos + 157]))
        pos += 512 + -(-int(data[pos + 124:pos + 136].strip(b" \0") or b"0", 8) // 512) * 512
    return headers


def tar_number(rng: random.Random, width: int) -> bytes:
    """A numeric tar field value: octal 0 / max / random, base-256 positive or negative, empty, noise."""
    digits = width - 1
    return rng.choice((
        b"0" * digits + b"\0", b"7" * digits + b"\0", b"%0*o\0" % (digits, rng.randrange(8 ** digits)),
        b"\x80" + rng.randbytes(width - 1), b"\xff" + rng.randbytes(width - 1), b"\0" * width, rng.randbytes(width),
        b" " * width, b"-1".ljust(width, b"\0"), b"%0*o\0" % (digits, rng.randrange(1 << 16)),
    ))


def fix_checksum(buf: bytearray, pos: int) -> None:
    block = buf[pos:pos + 512]
    block[148:156] = b" " * 8
    buf[pos + 148:pos + 156] = b"%06o\0 " % sum(block)


def mutate_pax(rng: random.Random, buf: bytearray, pos: int) -> str:
    """Edit one PAX record of the header at `pos` in place (same length): its length digits, key or value."""
    size = int(buf[pos + 124:pos + 136].strip(b" \0"), 8)
    body = bytes(buf[pos + 512:pos + 512 + size])
    records = [(m.start(), m.group()) for m in re.finditer(rb"\d+ [^\n]*\n", body)]
    start, record = rng.choice(records)
    length, rest = record.split(b" ", 1)
    if rng.random() < 0.3:
        new_length = rng.choice((b"0" * len(length), b"9" * len(length), b"%d" % rng.randrange(10 ** len(length))))
        new = new_length.rjust(len(length), b"0") + b" " + rest
    else:
        key = rng.choice((b"size", b"path", b"mtime", b"linkpath", b"uid", b"GNU.sparse.size", rest.split(b"=")[0]))
        width = len(rest) - len(key) - 2  # "key=value\n"
        value = rng.choice((b"9" * width, b"-" + b"9" * (width - 1), b"0" * width, rng.randbytes(width),
                            (b"../" * width)[:width], b"1e999".rjust(width, b"0"), b"x" * width))
        new = length + b" " + key + b"=" + value[:width].ljust(width, b"0") + b"\n"
    buf[pos + 512 + start:pos + 512 + start + len(record)] = new[:len(record)]
    return f"PAX record {record!r} -> {new[:len(record)]!r}"


def mutate_tar(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    buf = bytearray(data)
    headers = tar_headers(data)
    pos, kind = rng.choice(headers)
    where = f"header at {pos} (type {kind!r})"
    r = rng.random()
    if r < 0.2 and kind == b"x":
        what = mutate_pax(rng, buf, pos)
    elif r < 0.6:
        field = rng.choice(sorted(USTAR_FIELDS))
        offset, width = USTAR_FIELDS[field]
        if field == "typeflag":
            value = bytes([rng.choice(TYPES)])
        elif field in ("name", "linkname", "prefix"):
            value = rng.choice(NAMES)[:width].ljust(width, b"\0")
        elif field in ("magic", "version", "uname", "gname"):
            value = rng.randbytes(width)
        else:
            value = tar_number(rng, width)
        buf[pos + offset:pos + offset + width] = value
        fix_checksum(buf, pos)
        what = f"{field} = {value!r}, checksum fixed"
    elif r < 0.8:
        what = mutate_bytes(rng, buf, pos, pos + 512, ("flip",)) + ", checksum fixed"
        fix_checksum(buf, pos)
    else:
        what = mutate_bytes(rng, buf, pos, pos + 512, ("truncate", "insert", "delete"))
    return bytes(buf), f"{where}: {what}"


def mutate_members(rng: random.Random, members: list[tuple[tarfile.TarInfo, bytes]]) -> str:
    """Drop, duplicate or rename one member of the tar (a .nemo without its yaml, with two weights, ...)."""
    i = rng.randrange(len(members))
    info, data = members[i]
    op = rng.choice(("drop", "duplicate", "rename"))
    if op == "drop":
        del members[i]
        return f"drop member {info.name}"
    if op == "duplicate":
        members.insert(rng.randrange(len(members) + 1), (copy.copy(info), data))
        return f"duplicate member {info.name}"
    old, info.name = info.name, rng.choice(NAMES).decode() or "."
    return f"rename member {old} to {info.name}"


def retar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    """A plain tar of `members` in order, as NeMo's tarfile writes it (PAX format, fractional mtime)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return out.getvalue()


# --- model_config.yaml --------------------------------------------------------------------------------------------

YAML_TOKENS = ("&a ", "*a", "${", "}", "${nonexistent}", "${oc.env:HOME}", "!!python/object/apply:os.system ['true']",
               ": ", "- ", "\t", "[", "{", "null", "~", "1e400", "-1", "0", "'", '"', "\n  ", "\n", "? ", "%YAML 1.1\n",
               "---\n", "<<: ", "\\x00", "\u00ff")
YAML_VALUES = ("0", "-1", "9223372036854775808", "1e400", ".nan", "null", "~", "''", "[]", "{}", "${nonexistent}",
               "${oc.env:HOME}", "${.}", "${..}", "&a x", "*a", "true", "x" * 1000, "[1, 2, 3]", "'64'", "3.5")


def mutate_yaml(rng: random.Random, text: bytes) -> tuple[bytes, str]:
    buf = bytearray(text)
    r = rng.random()
    if r < 0.4:
        lines = text.split(b"\n")
        scalars = [i for i, line in enumerate(lines) if re.match(rb"^\s*[\w.]+: \S", line)]
        i = rng.choice(scalars)
        key = lines[i].split(b": ", 1)[0]
        value = rng.choice(YAML_VALUES).encode() if rng.random() < 0.8 else str(rng.randrange(-9, 1 << 20)).encode()
        lines[i] = key + b": " + value
        return b"\n".join(lines), f"yaml line {i}: {key.strip().decode()}: {value[:40]!r}"
    if r < 0.6:
        at = rng.randrange(len(buf) + 1)
        token = rng.choice(YAML_TOKENS).encode()
        buf[at:at] = token
        return bytes(buf), f"yaml: insert {token!r} at {at}"
    what = mutate_bytes(rng, buf, 0, len(buf), ("flip", "truncate", "delete"))
    return bytes(buf), f"yaml: {what}"


# --- Bases and mutants --------------------------------------------------------------------------------------------


class Bases(dict):
    def __repr__(self) -> str:  # not 100 kB of bytes in a failure report
        return f"Bases({', '.join(f'{k}: {len(v)} bytes' for k, v in self.items())})"


def build_bases(root) -> Bases:
    """The unmutated inputs: a .ckpt with and one without Adam state, a plain .nemo (tar rebuilt with fixed times)."""
    make_checkpoint(root / "base.ckpt", MODEL, optimizer=True)
    make_checkpoint(root / "bare.ckpt", MODEL, optimizer=False)
    make_nemo(root / "base.nemo", MODEL)
    with tarfile.open(root / "base.nemo") as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else b"") for m in tar.getmembers()]
    for info, _ in members:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 1700000000.25, 0, 0, "", ""
        info.pax_headers = {}  # else the old mtime record wins over the new mtime
    return Bases({"ckpt-adam": (root / "base.ckpt").read_bytes(), "ckpt": (root / "bare.ckpt").read_bytes(),
                  "nemo": retar(members)})


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Bases:
    return build_bases(tmp_path_factory.mktemp("fuzz-bases"))


def make_mutant(seed: int, bases: dict[str, bytes]) -> Mutant:
    rng = random.Random(seed)
    base, target = rng.choice(TARGETS)
    data = bases[base]
    if base != "nemo":
        data, what = mutate_zip_pickle(rng, data) if target == "pickle" else mutate_zip_headers(rng, data, target)
        return Mutant(seed, base, target, what, data, ".ckpt")
    if target == "tar" and rng.random() < 0.85:
        data, what = mutate_tar(rng, data)
        return Mutant(seed, base, target, what, data, ".nemo")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else b"") for m in tar.getmembers()]
    if target == "tar":
        what = mutate_members(rng, members)
        return Mutant(seed, base, target, what, retar(members), ".nemo")
    name = "./model_config.yaml" if target == "yaml" else "./model_weights.ckpt"
    i = next(k for k, (m, _) in enumerate(members) if m.name == name)
    if target == "yaml":
        inner, what = mutate_yaml(rng, members[i][1])
    elif target == "pickle":
        inner, what = mutate_zip_pickle(rng, members[i][1])
    else:
        inner, what = mutate_zip_headers(rng, members[i][1], target)
    members[i] = (members[i][0], inner)
    return Mutant(seed, base, target, f"{name}: {what}", retar(members), ".nemo")


# --- Running the CLI ----------------------------------------------------------------------------------------------

# Sets the caps, spawns the command (stdout to /dev/null, stderr inherited), waits for it and prints its exit code
# and ru_maxrss. A small interpreter of its own: a child's ru_maxrss starts at its parent's RSS (pytest's, with
# torch loaded), the hiwater mark surviving exec; this one's is about 10 MB.
_LAUNCHER = """import json, os, resource, sys
limit, cpu = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 30, 1 << 30))
devnull = [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]
pid = os.posix_spawn(sys.argv[3], sys.argv[3:], os.environ, file_actions=devnull)
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"code": os.waitstatus_to_exitcode(status), "maxrss": usage.ru_maxrss * 1024}))
"""


@dataclass
class Run:
    code: int | None  # None: killed at the timeout
    maxrss: int
    stderr: str
    seconds: float = 0.0


def run_capped(command: list[str], timeout: float = TIMEOUT_S) -> Run:
    """Run `command` under the caps; the whole process group is killed at `timeout`."""
    launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(AS_CAP), str(int(timeout) + 5), *command]
    start = time.perf_counter()
    proc = subprocess.Popen(launcher, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return Run(None, 0, err.decode(errors="replace"), timeout)
    stderr, seconds = err.decode(errors="replace"), time.perf_counter() - start
    try:
        record = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return Run(proc.returncode or -1, 0, stderr + f"\n[launcher failed: {out!r}]", seconds)
    return Run(record["code"], record["maxrss"], stderr, seconds)


def check(path: str, save: str, tool: tuple[str, ...] = STREAMCONV, timeout: float = TIMEOUT_S) -> Outcome:
    """Convert `path` to `save` (a new name in the folder that holds only `path`) and judge what happened."""
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).digest()
    args = ["--checkpoint-path", path, "--save-path", save, "--vocab-size", VOCAB]
    run = run_capped([*tool, *args, "--quiet"], timeout)
    outcome = judge(run, path, save, digest, lambda: run_capped([*tool, *args, "--verify"], timeout))
    outcome.rss, outcome.seconds = run.maxrss, run.seconds
    return outcome


def judge(run: Run, path: str, save: str, digest: bytes, verify) -> Outcome:
    """What the conversion `run` of `path` (whose bytes had `digest`) to `save` did; `verify()` runs --verify."""
    folder = os.path.dirname(path)
    bound = RSS_BASE + RSS_PER_INPUT_BYTE * os.path.getsize(path)
    lines = run.stderr.strip().splitlines()
    left = sorted(set(os.listdir(folder)) - {os.path.basename(path), os.path.basename(save)})
    if run.code is None:
        return Outcome("timeout", f"still running after {run.seconds} s")
    if run.maxrss > bound or "MemoryError" in run.stderr:
        return Outcome("memory", f"peak RSS {run.maxrss >> 20} MB (bound {bound >> 20} MB); {run.stderr}")
    if "Traceback" in run.stderr:
        return Outcome("traceback", run.stderr)
    if left:
        return Outcome("leftovers", f"exit {run.code} left {left} beside the save path; {run.stderr[-2000:]}")
    with open(path, "rb") as f:
        if hashlib.sha256(f.read()).digest() != digest:
            return Outcome("input changed", f"exit {run.code} changed the input file")
    if run.code == 2:
        if len(lines) != 1 or not lines[0].startswith("streamconv: error: "):
            return Outcome("not one line", run.stderr)
        if os.path.lexists(save):
            return Outcome("half-written", f"refused ({lines[0]}) but {save} exists")
        return Outcome("refused", lines[0])
    if run.code != 0:
        return Outcome("signal" if run.code < 0 else f"exit {run.code}", run.stderr or "(no stderr)")
    if not os.path.isdir(save):
        return Outcome("output missing", f"exit 0 but no folder at {save}")
    verified = verify()
    if verified.code != 0:
        return Outcome("verify failed", f"--verify exit {verified.code}; {verified.stderr[-2000:]}")
    return Outcome("converted")


def group_key(outcome: Outcome) -> str:
    """Failures of one cause share a key: the kind, the exception type and the innermost frame."""
    frames = re.findall(r'File "([^"]+)", line \d+, in (\S+)', outcome.detail)
    if not frames:
        return outcome.kind
    last = outcome.detail.strip().splitlines()[-1]
    return f"{outcome.kind} {last.split(':')[0]} in {os.path.basename(frames[-1][0])}:{frames[-1][1]}"


def seeds() -> list[int]:
    chosen = os.environ.get("STREAMCONV_FUZZ_SEED")
    if chosen:
        return [int(s) for s in chosen.split(",")]
    return list(range(int(os.environ.get("STREAMCONV_FUZZ_N", "300"))))


def report(seed: int, mutant: Mutant, outcome: Outcome) -> str:
    detail = outcome.detail.strip().splitlines()
    tail = "\n      ".join(detail[-6:])
    return (f"seed {seed}: {outcome.kind}: {mutant.base} {mutant.target}: {mutant.mutation}\n"
            f"      replay: STREAMCONV_FUZZ_SEED={seed} pytest tests/test_fuzz.py\n      {tail}")


# --- Tests --------------------------------------------------------------------------------------------------------


def test_mutants_convert_and_verify_or_are_refused_in_one_line(bases, tmp_path):
    keep = os.environ.get("STREAMCONV_FUZZ_KEEP")

    def one(seed: int) -> tuple[int, Mutant, Outcome]:
        mutant = make_mutant(seed, bases)
        folder = tmp_path / f"m{seed}"
        folder.mkdir()
        path = folder / f"in{mutant.suffix}"
        path.write_bytes(mutant.data)
        outcome = check(str(path), str(folder / "out"))
        if not outcome.ok and keep:
            os.makedirs(keep, exist_ok=True)
            shutil.copy(path, os.path.join(keep, f"{seed}-{mutant.base}-{mutant.target}{mutant.suffix}"))
        shutil.rmtree(folder, ignore_errors=True)
        return seed, mutant, outcome

    start = time.perf_counter()
    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(one, seeds()))
    wall = time.perf_counter() - start
    counts = Counter(o.kind for _, _, o in results)
    failures = [(s, m, o) for s, m, o in results if not o.ok]
    groups: dict[str, list[tuple[int, Mutant, Outcome]]] = {}
    for failure in failures:
        groups.setdefault(group_key(failure[2]), []).append(failure)
    summary = (f"fuzz: {len(results)} mutants in {wall:.1f} s: {counts['converted']} converted and verified, "
               f"{counts['refused']} refused in one line, {len(failures)} failures "
               f"({', '.join(f'{k} {n}' for k, n in sorted(counts.items()) if k not in ('converted', 'refused'))}); "
               f"largest peak RSS {max(o.rss for _, _, o in results) / 2**20:.0f} MB (bound {RSS_BASE >> 20} MB + "
               f"{RSS_PER_INPUT_BYTE} x the input), slowest conversion {max(o.seconds for _, _, o in results):.1f} s "
               f"(timeout {TIMEOUT_S} s)")
    lines = [summary] + [f"  {len(g)} x {key} (e.g. seeds {[s for s, _, _ in g[:5]]})\n    {report(*g[0])}"
                         for key, g in sorted(groups.items(), key=lambda kv: -len(kv[1]))]
    print("\n".join(line.splitlines()[0] for line in lines))  # the details come with the failure
    if os.environ.get("STREAMCONV_FUZZ_LOG"):
        with open(os.environ["STREAMCONV_FUZZ_LOG"], "w") as log:
            for seed, mutant, outcome in results:
                log.write(json.dumps({"seed": seed, "base": mutant.base, "target": mutant.target,
                                      "mutation": mutant.mutation, "kind": outcome.kind, "group": group_key(outcome),
                                      "detail": outcome.detail}) + "\n")
    if failures:
        pytest.fail("\n".join(lines), pytrace=False)


def test_a_mutant_is_a_function_of_its_seed(bases, tmp_path):
    """Replaying a seed rebuilds the same bytes: the bases are rebuilt from scratch and mutated again."""
    again = build_bases(tmp_path)
    assert again == bases
    for seed in range(40):
        first, second = make_mutant(seed, bases), make_mutant(seed, again)
        assert (first.mutation, first.data) == (second.mutation, second.data), seed


def test_the_bases_convert_and_verify(bases, tmp_path):
    """The harness is sound: every unmutated base, and each rebuilt as the mutators rebuild it, converts."""
    rebuilt = {"ckpt-rezipped": rezip_all(bases["ckpt-adam"]), "nemo-retarred": retar_all(bases["nemo"])}
    for name, data in {**bases, **rebuilt}.items():
        folder = tmp_path / name
        folder.mkdir()
        path = folder / ("in.nemo" if "nemo" in name else "in.ckpt")
        path.write_bytes(data)
        outcome = check(str(path), str(folder / "out"))
        assert outcome.kind == "converted", (name, outcome)


def rezip_all(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return rezip([(i.filename, archive.read(i)) for i in archive.infolist()])


def retar_all(data: bytes) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return retar([(m, tar.extractfile(m).read() if m.isfile() else b"") for m in tar.getmembers()])


@pytest.mark.parametrize("program,kind", [
    ("raise ValueError('boom')", "traceback"),
    ("import sys; print('streamconv: error: a\\nb', file=sys.stderr); sys.exit(2)", "not one line"),
    ("import sys; sys.exit(3)", "exit 3"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "signal"),
    ("import time; time.sleep(60)", "timeout"),
    ("b = b'x' * (600 << 20)", "memory"),
    ("import sys; open(sys.argv[4] + '-staging', 'w'); print('streamconv: error: x', file=sys.stderr); sys.exit(2)",
     "leftovers"),
    ("import os, sys; os.mkdir(sys.argv[4]); print('streamconv: error: x', file=sys.stderr); sys.exit(2)",
     "half-written"),
    ("import sys; open(sys.argv[2], 'ab').write(b'x'); print('streamconv: error: x', file=sys.stderr); sys.exit(2)",
     "input changed"),
    ("import os, sys; '--verify' in sys.argv and sys.exit(1); os.mkdir(sys.argv[4])", "verify failed"),
    ("import sys; print('streamconv: error: x', file=sys.stderr); sys.exit(2)", "refused"),
])
def test_the_judge_catches_each_failure(tmp_path, program, kind):
    """Each failure the fuzz test promises to catch is caught (a stand-in program plays the CLI). Only the hang
    gets a short timeout (3 s against its 60 s sleep): the others have the fuzz run's own, so that a loaded machine
    cannot turn a slow 600 MiB allocation into a timeout."""
    path = tmp_path / "in.ckpt"
    path.write_bytes(b"x")
    timeout = 3 if kind == "timeout" else TIMEOUT_S
    outcome = check(str(path), str(tmp_path / "out"), tool=(sys.executable, "-c", program), timeout=timeout)
    assert outcome.kind == kind, outcome
