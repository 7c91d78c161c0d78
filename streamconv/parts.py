"""One conversion split over the tasks of a job array (`--part I/N`), with no coordinator.

The plan is a pure function of the checkpoint's metadata and the flags, so every part computes the same one and
takes its own share of it: a run of consecutive tensors, cut by bytes (`boundaries`). Parts agree without talking
on a staging folder beside the save path, `.<name>.streamconv-parts-<fingerprint>/`, the fingerprint hashing what
decides the output (the flags, the source's identity, N, the plan, streamconv's version). Each part writes its
tensors into the shard files under `model/` at the plan's offsets (a shard cut between two parts is written by
both, each its own bytes), fsyncs them, then records `done-I` (written aside, fsynced, renamed: the part's
commit). A part that is rerun before its marker exists writes its whole share again, so nothing a killed part
left is trusted. The part that finds every marker claims publishing with an `O_EXCL` file, which is atomic on
NFS (v3 and later), Lustre, GPFS and local filesystems alike, where what `flock` means across nodes depends on
the mount (on Lustre: off, node-local or cluster-wide); it then writes the index, config and tokenizer and
publishes `model/` with the single run's lock and atomic swap, and records `published`, which makes a rerun of
any part a no-op. A claim left by a killed publisher is taken over by a rerun on the same host (its pid is gone);
one from another host is named in the message, to be removed by hand.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import psutil

from streamconv._version import version
from streamconv.errors import ConversionError
from streamconv.output import RENAME_NOREPLACE, fsync, renameat2, sibling
from streamconv.plan import Plan, Shard

SLURM = "slurm"
_FIELDS = "parts.json"
_CLAIM = "publishing"
_PUBLISHED = "published"
_SWAPPING = "swapping"
_MAX_FIELDS_BYTES = 2**16
_MARKER_BYTES = 4096  # a marker or claim is a line of JSON or inode numbers
MAX_PARTS = 65536  # far beyond any cluster's parts, and few enough for every part to look up every marker


def parse_part(part: str | tuple[int, int], environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(I, N) from 'I/N', a pair, or 'slurm' (a job array task: I = SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN,
    N = SLURM_ARRAY_TASK_COUNT)."""
    if part == SLURM:
        names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT")
        missing = [name for name in names if name not in environ]
        if missing:
            raise ConversionError(f"--part slurm needs {', '.join(missing)}, which Slurm sets in the tasks of a job "
                                  "array (sbatch --array=0-N); outside one, give --part I/N")
        try:
            task, first, count = (int(environ[name]) for name in names)
        except ValueError:
            raise ConversionError(f"--part slurm: {', '.join(f'{n}={environ[n]!r}' for n in names)} are not whole "
                                  "numbers; run it in a Slurm job array task, or give --part I/N") from None
        index = task - first
    elif isinstance(part, tuple):
        index, count = part
    else:
        match = re.fullmatch(r"\s*(-?[0-9]+)\s*/\s*(-?[0-9]+)\s*", str(part))
        if match is None:
            raise ConversionError(f"cannot read --part {part!r}; give I/N (part I of N, counted from 0, e.g. 0/3), or "
                                  "slurm in a job array")
        index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise ConversionError(f"--part {index}/{count}: N must be at least 1; give I/N with 0 <= I < N, e.g. 0/3")
    if count > MAX_PARTS:
        raise ConversionError(f"--part {index}/{count}: N must be at most {MAX_PARTS} (each part looks up the "
                              "markers of all N); give fewer parts")
    if not 0 <= index < count:
        raise ConversionError(f"--part {index}/{count}: I must be 0 to {count - 1} (parts count from 0); give I/N "
                              f"with 0 <= I < N, e.g. 0/{count}")
    return index, count


def boundaries(sizes: list[int], count: int) -> list[int]:
    """Where `count` runs of consecutive items cut a list of byte sizes: item indices, first 0, last len(sizes)."""
    return [cut(sizes, k, count) for k in range(count + 1)]


def cut(sizes: list[int], k: int, count: int) -> int:
    """The item index where run k of `count` starts (len(sizes) for k = count): computed alone, so that a part
    computes only its own two cuts, whatever N.

    Each cut goes to the item boundary nearest its ideal byte offset (k * total / count), so a run differs from
    total / count by less than the largest item; a run may be empty when there are fewer items than runs.
    """
    if k == count:
        return len(sizes)
    ideal = sum(sizes) * k / count
    offset, item = 0, 0
    while item < len(sizes) and abs(offset + sizes[item] - ideal) < abs(offset - ideal):
        offset += sizes[item]
        item += 1
    return item


def share(plan: Plan, index: int, count: int) -> Plan:
    """Part `index` of `count`: a plan holding only its run of the tensors, under their shards' names and headers."""
    tensors = plan.tensors
    sizes = [t.nbytes for t in tensors]
    mine = {id(t) for t in tensors[cut(sizes, index, count) : cut(sizes, index + 1, count)]}
    shards = []
    for shard in plan.shards:
        run = [t for t in shard.tensors if id(t) in mine]
        if run:
            shards.append(Shard(shard.filename, run, shard.header))
    return Plan(shards, sum(t.nbytes for s in shards for t in s.tensors))


def written_bytes(share: Plan) -> int:
    """The disk a part's share takes: its tensors' bytes and, at most, the header of each shard it writes into."""
    return share.total_size + sum(len(shard.header) for shard in share.shards)


def identity(fields: Mapping[str, object], plan: Plan, config: dict, tokenizer_bytes: list[bytes],
             sources: list[str]) -> dict[str, str]:
    """What every part of one conversion must share, in the order a difference is named: N and the flags
    (`fields`), the sources (realpath, and the size and mtime of every file in them), the plan, config and
    tokenizer (digests) and streamconv's version."""
    def digest(*chunks: bytes) -> str:
        h = hashlib.sha256()
        for chunk in chunks:
            h.update(len(chunk).to_bytes(8, "little"))
            h.update(chunk)
        return h.hexdigest()[:16]

    found = {key: str(value) for key, value in fields.items()}
    for k, source in enumerate(sources):
        label = "checkpoint" if k == 0 else "tokenizer file"
        found[label] = os.path.realpath(source)
        found[f"{label}'s size and modification time"] = digest(*_stat_lines(source))
    found["plan (tensor names, shapes, dtypes, shards)"] = digest(*(s.filename.encode() + s.header
                                                                    for s in plan.shards))
    found["config"] = digest(json.dumps(config, sort_keys=True).encode())
    found["tokenizer"] = digest(*tokenizer_bytes)
    found["streamconv version"] = version()
    return found


def _stat_lines(source: str) -> Iterator[bytes]:
    """Size and mtime of a file, or of every file under a folder (by relative path, links not followed)."""
    if not os.path.isdir(source):
        st = os.stat(source)
        yield f"{st.st_size} {st.st_mtime_ns}".encode()
        return
    found = []
    for folder, subfolders, files in os.walk(source):
        subfolders.sort()
        for name in files:
            path = os.path.join(folder, name)
            with contextlib.suppress(OSError):
                st = os.stat(path)
                found.append(f"{os.path.relpath(path, source)} {st.st_size} {st.st_mtime_ns}".encode())
    yield from sorted(found)


@dataclass
class Staged:
    """The staging folder all parts of one conversion share; `model` becomes the save path."""

    folder: str
    index: int
    count: int
    identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the folder this part joined
    fd: int | None = None  # that folder, open: see `root`

    @property
    def root(self) -> str:
        """The path every file of the folder this part joined is reached by: through its descriptor (Linux's
        /proc/self/fd, openat-style), so that a folder renamed away and a link put in its place mid-run sends
        nothing elsewhere. `folder` is the name, for messages and for noticing that."""
        return f"/proc/self/fd/{self.fd}" if self.fd is not None else self.folder

    @property
    def model(self) -> str:
        return os.path.join(self.root, "model")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @property
    def label(self) -> str:
        return f"part {self.index}/{self.count}"

    def done(self, index: int) -> bool:
        return _present(os.path.join(self.root, f"done-{index}"))

    def missing(self) -> list[int]:
        """The parts not done yet (each marker looked up by name: a network filesystem may cache listings)."""
        return [i for i in range(self.count) if not self.done(i)]

    @property
    def published(self) -> bool:
        return _present(os.path.join(self.root, _PUBLISHED))

    def still_published(self, target: str) -> bool:
        """Whether `target` is still the folder this conversion published, not removed or replaced since: told by
        the inodes of the folder and of its config.json (a folder made again may get the freed inode)."""
        return _published_inodes(target) == (_read(os.path.join(self.root, _PUBLISHED), _MARKER_BYTES) or "").strip()

    def mark_done(self) -> None:
        """This part's commit: its shard files are durable (written with fsync) and so are their names."""
        fsync(self.model)
        self._mark(f"done-{self.index}", _owner())

    def check_shards(self, plan: Plan) -> None:
        """Refuse to publish unless every shard is a regular file of this user's, of the size the plan gives."""
        for shard in plan.shards:
            path = os.path.join(self.model, shard.filename)
            size = os.lstat(path).st_size if _present(path) else None
            if size != shard.file_size:
                raise ConversionError(f"the staged {shard.filename} has {size} bytes, the plan {shard.file_size}; "
                                      f"remove {self.folder} and run every part again")

    def mark_published(self, target: str) -> None:
        """Record the published folder, once `target` is the folder staged (see `swapping`): a publish never ends
        well unless the save path holds the model it built."""
        recorded = (_read(os.path.join(self.root, _SWAPPING), _MARKER_BYTES) or "").split()
        if not recorded or _inode(target) != recorded[0]:
            raise ConversionError(f"{target} is not the folder staged in {self.folder}, though it was published; "
                                  f"check {target}, then remove {self.folder} and run every part again")
        self._mark(_PUBLISHED, _published_inodes(target))

    def mark_swapping(self, target: str) -> None:
        """Record which folders `model/` and `target` are before they are swapped (see `swapped`)."""
        self._mark(_SWAPPING, f"{_inode(self.model)} {_inode(target) or '-'}")

    def swapped(self, target: str) -> bool:
        """Whether the staged model was swapped into `target` by a publisher that was killed before recording it.

        Decided by the inodes recorded before the swap, which are the same on every client of a network
        filesystem (st_dev is not): True when `target` is the staged folder and `model/` is gone or is the old
        target (swapped out); False when no swap began or `model/` is still the staged folder; refused when
        neither is (a marker that does not describe these folders).
        """
        recorded = _read(os.path.join(self.root, _SWAPPING), _MARKER_BYTES)
        if recorded is None:
            return False
        staged, _, old = recorded.strip().partition(" ")
        model = _inode(self.model)
        if _inode(target) == staged and model in (None, old):
            return True
        if model == staged:
            return False
        raise ConversionError(f"cannot tell whether the model staged in {self.folder} was published to {target}; "
                              f"check {target}, then remove {self.folder} and run every part again")

    def check_joined(self) -> None:
        """Refuse to go on if the staging folder is no longer the one this part joined."""
        if self.identity is not None and self.identity != _identity(self.folder):
            raise ConversionError(f"the staging folder {self.folder} was removed or replaced while {self.label} "
                                  "ran; run this part again")

    def _mark(self, name: str, text: str) -> None:
        """A marker file, made durable before it appears under its name, in the folder this part joined (one
        removed or replaced meanwhile is refused: this part's bytes are not in it)."""
        self.check_joined()
        aside = os.path.join(self.root, f".{name}.tmp-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside)
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, f"{text}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(aside, os.path.join(self.root, name))
        fsync(self.root)

    @property
    def claim(self) -> str:
        return os.path.join(self.folder, _CLAIM)

    @contextlib.contextmanager
    def publishing(self) -> Iterator[str | None]:
        """Claim publishing (O_EXCL); yields None, or who holds the claim when another part does. Released at
        the end."""
        claim = os.path.join(self.root, _CLAIM)
        mine = _owner()
        holder = _claim(claim, mine)
        if holder is not None:
            yield holder
            return
        try:
            yield None
        finally:
            if _read(claim, _MARKER_BYTES) == mine:
                os.unlink(claim)


def _claim(claim: str, mine: str) -> str | None:
    """Create the claim file; None once it is ours, else its holder. A claim whose process is gone (a killed
    publisher on this host) is renamed aside by exactly one of the parts that find it, then claimed anew."""
    for _ in range(3):
        try:
            fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            holder = _read(claim, _MARKER_BYTES)
            if holder is None:  # released meanwhile
                continue
            if not _gone(holder):
                return _describe(holder)
            aside = f"{claim}.stale-{os.getpid()}"
            try:
                os.rename(claim, aside)
            except FileNotFoundError:
                continue
            if _read(aside, _MARKER_BYTES) != holder:  # a live claim made in between: put it back
                with contextlib.suppress(FileExistsError):
                    renameat2(aside, claim, RENAME_NOREPLACE)
                return "another part"
            os.unlink(aside)
            continue
        try:
            os.write(fd, mine.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return None
    return "another part"


def _owner() -> str:
    """Who holds a claim: pid, host and the process's start time (a reused pid is not taken for the claimant)."""
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": psutil.Process().create_time()})


def _describe(holder: str) -> str:
    try:
        owner = json.loads(holder)
        return f"pid {int(owner['pid'])} on {str(owner['host']):.100}"
    except (ValueError, KeyError, TypeError):
        return "another part"


def _gone(holder: str) -> bool:
    """A claim whose process is known to be dead: on this host, and no process of that pid and start time."""
    try:
        owner = json.loads(holder)
        pid, host, started = int(owner["pid"]), str(owner["host"]), float(owner["started"])
    except (ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname():
        return False
    try:
        return psutil.Process(pid).create_time() != started
    except psutil.NoSuchProcess:
        return True


def _identity(path: str) -> tuple[int, int] | None:
    """Which folder `path` is now (a link is not followed), for this process (st_dev is per client on a network
    filesystem)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _inode(path: str) -> str | None:
    """The inode number of `path`, the same on every client of a network filesystem."""
    found = _identity(path)
    return None if found is None else str(found[1])


def _published_inodes(target: str) -> str:
    return f"{_inode(target)} {_inode(os.path.join(target, 'config.json'))}"


def _read(path: str, limit: int) -> str | None:
    """A marker's text, None if there is none; refused if it is not a regular file of the running user's (a link
    or a pipe is never followed or waited on)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        _present(path)  # names what is there instead
        raise
    try:
        _check_file(path, os.fstat(fd))
        return os.read(fd, limit).decode("utf-8", "replace")
    finally:
        os.close(fd)


def _present(path: str) -> bool:
    """Whether a marker exists; refused if it is not a regular file of the running user's."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return False
    _check_file(path, found)
    return True


def _check_file(path: str, found: os.stat_result) -> None:
    if not stat.S_ISREG(found.st_mode) or found.st_uid != os.geteuid():
        folder = os.path.realpath(os.path.dirname(path))  # its name, when reached through /proc/self/fd
        raise ConversionError(f"{os.path.join(folder, os.path.basename(path))} is not a file this user wrote "
                              f"({_kind(found)}): the staging folder was tampered with; remove {folder} and run "
                              "every part again")


def check_folder(path: str) -> None:
    """Refuse a staging folder (or its `model/`) that is not a plain folder of the running user's which only they
    can write: what others can plant in it is never trusted."""
    with contextlib.suppress(FileNotFoundError):
        _check_folder(path, os.lstat(path))


def _check_folder(path: str, found: os.stat_result) -> None:
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.geteuid() or found.st_mode & 0o022:
        what = _kind(found) if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.geteuid() else \
            "writable by others"
        raise ConversionError(f"the staging folder {path} is not a folder only this user can write ({what}); "
                              "remove it and run every part again")


def _open_folder(path: str) -> int:
    """A descriptor of the staging folder at `path`, refused (see check_folder) unless it is one to trust."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        check_folder(path)  # names what is there instead
        raise
    try:
        _check_folder(path, os.fstat(fd))
        with contextlib.suppress(FileNotFoundError):  # (gone once published)
            _check_folder(os.path.join(path, "model"), os.stat("model", dir_fd=fd, follow_symlinks=False))
    except ConversionError:
        os.close(fd)
        raise
    return fd


def _kind(found: os.stat_result) -> str:
    """What a path that should be this user's plain file or folder is instead, in a few words."""
    if stat.S_ISLNK(found.st_mode):
        return "a symbolic link"
    if found.st_uid != os.geteuid():
        return f"owned by uid {found.st_uid}"
    return "a regular file" if stat.S_ISREG(found.st_mode) else "a folder" if stat.S_ISDIR(found.st_mode) else \
        "a pipe, socket or device"


def staged_folders(target: str) -> dict[str, str]:
    """Staging folders of split conversions beside the target (an absolute path), by fingerprint."""
    prefix = os.path.basename(sibling(target, "parts-"))
    pattern = re.compile(re.escape(prefix) + r"([0-9a-f]{16})")
    parent = os.path.dirname(target)
    found = {}
    for entry in os.listdir(parent):
        match = pattern.fullmatch(entry)
        if match:
            found[match.group(1)] = os.path.join(parent, entry)
    return found


def _difference(theirs: dict | None, ours: dict[str, str]) -> str:
    """The first field in which staged parts differ from this one, worded for a message."""
    if not isinstance(theirs, dict):
        return "it holds parts of another conversion"
    for key, value in ours.items():
        other = f"{theirs.get(key)!s:.100}"
        if other == value:
            continue
        if key == "parts":
            return f"they are parts of {other}, this one of {value}"
        if key.startswith("--"):
            return f"they were run with {key} {other}, this part with {key} {value:.100}"
        if key.endswith(" size and modification time"):
            return f"the {key.split(' size')[0]} files changed (size or modification time) since they were staged"
        if key in ("checkpoint", "tokenizer file", "streamconv version"):
            return f"their {key} is {other}, this part's {value:.100}"
        return f"their {key} differs from this part's"
    return "they were run differently"


def _fields_of(folder: str) -> dict | None:
    text = _read(os.path.join(folder, _FIELDS), _MAX_FIELDS_BYTES)
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


def _staging_folder(target: str, fields: dict[str, str]) -> tuple[str, str]:
    """(fingerprint, staging folder) of the conversion that `fields` describe."""
    fingerprint = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return fingerprint, sibling(target, f"parts-{fingerprint}")


def staged(target: str, index: int, count: int, fields: dict[str, str]) -> Staged | None:
    """This conversion's staging folder if a part made it already; None (and nothing made) if not."""
    folder = _staging_folder(target, fields)[1]
    check_folder(folder)
    return Staged(folder, index, count) if _fields_of(folder) == fields else None


def join(target: str, index: int, count: int, fields: dict[str, str]) -> Staged:
    """The staging folder of this conversion, made by the first part to come; refused (nothing staged touched)
    when parts of another conversion of the same save path are staged and not published."""
    fingerprint, folder = _staging_folder(target, fields)
    label = f"part {index}/{count}"

    def refuse_others() -> None:
        for other, path in sorted(staged_folders(target).items()):
            if other != fingerprint and not os.path.exists(os.path.join(path, _PUBLISHED)):
                raise ConversionError(f"{label} does not match the parts staged in {path}: "
                                      f"{_difference(_fields_of(path), fields)}; run every part with the same flags "
                                      f"and source, or remove {path} to start over")

    refuse_others()
    made = False
    if not os.path.isdir(folder):
        fresh = f"{folder}-new-{secrets.token_hex(8)}"  # unique on every host: never another part's
        os.mkdir(fresh, 0o755)  # only this user writes into it, whatever the umask lets the group do
        os.mkdir(os.path.join(fresh, "model"), 0o755)
        with open(os.path.join(fresh, _FIELDS), "w") as f:
            json.dump(fields, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            renameat2(fresh, folder, RENAME_NOREPLACE)
            made = True
        except FileExistsError:  # another part made it first
            shutil.rmtree(fresh, ignore_errors=True)
        fsync(os.path.dirname(folder))
    staged = Staged(folder, index, count, fd=_open_folder(folder))
    try:
        found = os.fstat(staged.fd)
        staged.identity = found.st_dev, found.st_ino
        if _fields_of(staged.root) != fields:
            raise ConversionError(f"{label} does not match the parts staged in {folder}: "
                                  f"{_difference(_fields_of(staged.root), fields)}; remove {folder} to start over")
        try:
            refuse_others()  # parts of two conversions started at once: both refused
        except ConversionError:
            if made:  # (a part that joined it meanwhile is refused when it marks itself done)
                shutil.rmtree(folder, ignore_errors=True)
            raise
    except BaseException:
        staged.close()
        raise
    return staged
