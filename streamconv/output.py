"""The output folder: checked and locked before anything is read, staged beside the target, swapped into place.

The target is replaced in one step (Linux `renameat2(RENAME_EXCHANGE)`); where the filesystem cannot do that,
the old folder is first renamed aside as `.<name>.streamconv-old-<pid>`, and the next run puts it back if it
finds no target, so a kill at any moment leaves a complete model (the old or the new) to find.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import fnmatch
import os
import platform
import re
import shutil
import stat
import sys
from collections.abc import Iterable, Iterator

from streamconv.errors import ConversionError

# What `save_pretrained` of a model and its tokenizer writes (transformers' utils/__init__.py, utils/hub.py,
# tokenization_utils_base.py and the tokenizers' VOCAB_FILES_NAMES), and the model card it pushes as README.md.
MODEL_FILES = frozenset({
    "config.json", "generation_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
    "README.md", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
    "merges.txt", "chat_template.jinja", "chat_template.json",
})
MODEL_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
_MARK = ".streamconv-"  # in the names of streamconv's hidden staging folders, lock files and scratch files
# What streamconv itself leaves: staging and old folders of a save path, its lock, a gzip .nemo's scratch files.
_LEFTOVER_FOLDER = re.compile(r"\..+\.streamconv-(tmp|old)-[0-9]+")
_LEFTOVER_FILE = re.compile(r"\..+\.streamconv-lock|\.streamconv-nemo-[0-9]+-.*\.ckpt")


def check_save_path(save_path: str, overwrite: bool, inputs: Iterable[str | None] = ()) -> str:
    """Refuse a save path that --overwrite could not replace safely, before anything is read; returns its realpath.

    Refused always: the current folder or one of its parents, a path that is, holds or lies inside an input, a
    file. Refused when non-empty: without --overwrite, any folder; with it, one holding anything but a model
    folder's own files and streamconv's leftovers (subfolders count).
    """
    target = os.path.realpath(save_path)
    with contextlib.suppress(OSError):  # (a deleted current folder has no path to protect)
        if _inside(os.getcwd(), target):
            raise ConversionError(f"save path {save_path} is the current folder or one of its parents; "
                                  "choose a new folder for the output")
    for source in filter(None, inputs):
        holds, within = _inside(source, target), _inside(target, source)
        if holds or within:
            how = "is" if holds and within else "holds" if holds else "lies inside"
            raise ConversionError(f"save path {save_path} {how} the input {source}; choose a --save-path "
                                  "outside it")
    if os.path.lexists(target) and not os.path.isdir(target):
        raise ConversionError(f"save path {save_path} exists and is not a folder; choose another --save-path")
    if os.path.ismount(target):
        raise ConversionError(f"save path {save_path} is a mount point, which cannot be replaced in one step; "
                              f"choose a folder inside it, e.g. {os.path.join(save_path, 'model')}")
    try:
        entries = sorted(os.listdir(target)) if os.path.isdir(target) else []
    except OSError as exc:
        raise ConversionError(f"cannot list the save path {save_path} ({exc.strerror}); choose another "
                              "--save-path") from None
    foreign = [entry for entry in entries if not _ours(target, entry)]
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise ConversionError(
            f"save path {save_path} is not empty and holds what is not a model folder's own files "
            f"({', '.join(foreign[:3])}{more}); --overwrite replaces only a model folder: choose another --save-path"
        )
    if entries and not overwrite:
        raise ConversionError(f"save path {save_path} is not empty; pass --overwrite to replace its contents")
    return target


def _inside(inner: str, outer: str) -> bool:
    """`inner` is `outer` or lies inside it: realpaths compared by inode, so symlinks, `..` and bind mounts
    cannot hide it."""
    try:
        outer_stat = os.stat(outer)
    except OSError:
        return False
    path = os.path.realpath(inner)
    while True:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.stat(path), outer_stat):
                return True
        if os.path.dirname(path) == path:
            return False
        path = os.path.dirname(path)


def _ours(folder: str, entry: str) -> bool:
    """A model folder's own file (not a folder), or one of streamconv's hidden leftovers."""
    try:
        is_folder = stat.S_ISDIR(os.lstat(os.path.join(folder, entry)).st_mode)
    except FileNotFoundError:  # gone meanwhile
        return True
    if is_folder:
        return _LEFTOVER_FOLDER.fullmatch(entry) is not None
    return (entry in MODEL_FILES or _LEFTOVER_FILE.fullmatch(entry) is not None
            or any(fnmatch.fnmatchcase(entry, p) for p in MODEL_PATTERNS))


def only_model_files(folder: str) -> bool:
    """Whether `folder` holds nothing but a model folder's own files (what --overwrite may remove)."""
    return all(_ours(folder, entry) for entry in os.listdir(folder))


@contextlib.contextmanager
def claimed(save_path: str, overwrite: bool, inputs: Iterable[str | None] = (),
            lock_required: bool = True) -> Iterator[str]:
    """Check the save path, then hold its lock for the whole run; yields the target's realpath.

    The lock is `fcntl.flock` on `.<name>.streamconv-lock` beside the target, so a second run on the same path
    fails at once instead of replacing the first one's output. Holding it, what killed runs left is recovered
    (an old folder put back where no target is) before the target's contents are checked. Where the filesystem
    has no flock, a run is refused, unless not `lock_required` (a part publishing holds its own claim, and no
    single run can take the lock there).
    """
    target = check_save_path(save_path, overwrite, inputs)
    made = make_folders(os.path.dirname(target))
    lock = sibling(target, "lock")
    done = False
    try:
        fd = _lock(lock, save_path, lock_required)
        try:
            _recover(target)
            check_save_path(save_path, overwrite, inputs)
            yield target
            done = True
        finally:
            with contextlib.suppress(OSError):
                os.unlink(lock)
            os.close(fd)
    finally:
        for folder in made if not done else ():
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def make_folders(path: str) -> list[str]:
    """os.makedirs, returning the folders it made, innermost first (removed again if the run fails)."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    try:
        for folder in reversed(missing):
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder)
    except OSError as exc:
        raise ConversionError(f"cannot create the folder {exc.filename} ({exc.strerror}); "
                              "choose another --save-path") from None
    return missing


def _lock(path: str, save_path: str, required: bool = True) -> int:
    """An fd holding an exclusive flock on `path`, the file that is there now (the holder unlinks it when done);
    where the filesystem has no flock and the lock is not `required`, the fd unlocked."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConversionError(f"cannot write beside {save_path} ({exc.strerror}); "
                                  "choose another --save-path") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConversionError(f"another streamconv is writing {save_path}; wait for it to finish or choose "
                                  "another --save-path") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            if not required:
                return fd
            os.close(fd)
            raise ConversionError(f"the filesystem of {save_path} has no file locks (flock: {exc.strerror}), which "
                                  "a single run takes on its save path; mount it with them (Lustre: -o flock; NFS: "
                                  "with the lock manager running), or convert with --part I/N") from None
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        os.close(fd)  # its holder unlinked it meanwhile: lock the new one


def sibling(target: str, kind: str) -> str:
    """The path of one of streamconv's hidden siblings of the target: `.<name>.streamconv-<kind>`."""
    parent, name = os.path.split(target)
    return os.path.join(parent, f".{name}{_MARK}{kind}")


def _recover(target: str) -> None:
    """Clean up after killed runs (the caller holds the lock, so no run of this target is alive).

    Only the exact names streamconv writes (`-tmp-<pid>`, `-old-<pid>`) are touched, and only plain folders of the
    running user's. A staging folder is never the only copy of a model; an `-old` folder is one when the target is
    missing, and is put back there.
    """
    parent = os.path.dirname(target)
    leftover = re.compile(re.escape(os.path.basename(sibling(target, ""))) + r"(tmp|old)-[0-9]+")
    try:
        for entry in sorted(os.listdir(parent)):
            match = leftover.fullmatch(entry)
            if match is None or not _own_folder(os.path.join(parent, entry)):
                continue
            if match.group(1) == "old" and not os.path.lexists(target):
                os.rename(os.path.join(parent, entry), target)
            else:
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    except OSError as exc:
        raise ConversionError(f"cannot clean up beside {target} ({exc.strerror}: {exc.filename}); check the "
                              "folder's permissions") from None


def _own_folder(path: str) -> bool:
    """A folder, not a link to one, of the running user's."""
    with contextlib.suppress(FileNotFoundError):
        found = os.lstat(path)
        return stat.S_ISDIR(found.st_mode) and found.st_uid == os.geteuid()
    return False


def staging_folder(target: str) -> str:
    """A fresh sibling of the target on the same filesystem, so the final swap is atomic."""
    staging = sibling(target, f"tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.mkdir(staging)
    return staging


def publish(staging: str, target: str, save_path: str, overwrite: bool) -> None:
    """Swap the finished folder into place, then remove the old one (left at the staging name).

    Without --overwrite the kernel itself refuses a target that is no longer empty (rename(2) replaces only an
    empty folder), so nothing another program wrote meanwhile is ever replaced. With it, the target is checked
    again and, once swapped out, checked once more: if another program wrote into it after all, it is swapped
    back and nothing is replaced.
    """
    parent = os.path.dirname(target)
    written = ConversionError(f"save path {save_path} was written by another program during the conversion; "
                              "nothing was replaced: choose another --save-path")
    if not os.path.lexists(target) or not overwrite:
        try:
            if os.path.lexists(target):
                os.rename(staging, target)  # over an empty folder only
            else:
                renameat2(staging, target, RENAME_NOREPLACE)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise
            if not overwrite:
                raise written from None
        else:
            fsync(parent)
            return
    check_save_path(target, overwrite=True)
    try:
        renameat2(staging, target, RENAME_EXCHANGE)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        old = sibling(target, f"old-{os.getpid()}")  # recoverable at every step: see _recover
        os.rename(target, old)
        os.rename(staging, target)
        fsync(parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    if not only_model_files(staging):  # (the old folder, now)
        renameat2(staging, target, RENAME_EXCHANGE)
        raise written
    fsync(parent)
    shutil.rmtree(staging, ignore_errors=True)


RENAME_NOREPLACE = 1  # linux/fs.h
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "riscv64": 276, "ppc64le": 357, "s390x": 347, "i686": 353}


def renameat2(src: str, dst: str, flags: int) -> None:
    """Linux renameat2(2); a filesystem without RENAME_NOREPLACE gets rename(2), which still refuses a
    non-empty folder (FileExistsError either way)."""
    code = _renameat2(src, dst, flags)
    if code and flags == RENAME_NOREPLACE and code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        try:
            os.rename(src, dst)
        except OSError as exc:
            code = exc.errno
        else:
            return
    if code in (errno.EEXIST, errno.ENOTEMPTY):
        raise FileExistsError(code, os.strerror(code), dst)
    if code:
        raise OSError(code, os.strerror(code), src, None, dst)


def _renameat2(src: str, dst: str, flags: int) -> int:
    """renameat2 through libc, or the raw syscall where libc lacks it (glibc < 2.28); its errno, 0 if done."""
    libc = ctypes.CDLL(None, use_errno=True)
    args = (_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags))
    if hasattr(libc, "renameat2"):
        rc = libc.renameat2(*args)
    elif sys.platform == "linux" and platform.machine() in _SYS_RENAMEAT2:
        rc = libc.syscall(ctypes.c_long(_SYS_RENAMEAT2[platform.machine()]), *args)
    else:
        return errno.ENOSYS
    return ctypes.get_errno() if rc else 0


def fsync(path: str) -> None:
    """fsync a file or a folder (its entries), so that what the rename publishes survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
