"""The kernel cache's folder and the files in it: which are trusted, and writing them so that readers see
a whole file or none. The rules (who may have written a folder or a library we load) are stated in
``cache.py``; here they are checked."""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import stat
import tempfile
import threading
import warnings
from typing import Optional, Set

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = ["KernelCacheWarning", "warn_once", "cache_dir", "untrusted_reason", "file_problem", "read_checked",
           "fsync_dir", "write_atomic", "remove_if_ours", "open_entry", "KeyLock", "reset"]

_LOCK = threading.RLock()
_WARNED: Set[str] = set()
_PRIVATE: Optional[str] = None


class KernelCacheWarning(UserWarning):
    """Something in the kernel cache was not trusted or not usable; the cache worked around it."""


def warn_once(tag: str, message: str) -> None:
    if tag not in _WARNED:
        _WARNED.add(tag)
        warnings.warn(message, KernelCacheWarning, stacklevel=3)


def reset() -> None:
    """Forget the warnings already given and the private folder (not deleted: libraries may still be
    mapped from it) (tests)."""
    global _PRIVATE
    with _LOCK:
        _WARNED.clear()
        _PRIVATE = None


# --------------------------------------------------------------------------------------------- folder
def _default_dir() -> str:
    explicit = os.environ.get("HF_WIN_CACHE_DIR")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    xdg = os.environ.get("XDG_CACHE_HOME")
    if not xdg or not os.path.isabs(xdg):  # the XDG spec says to ignore a relative value
        xdg = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(xdg), "hf_win", "kernels")


def _make_dirs(path: str) -> None:
    """Create ``path`` and any missing parent, each new one with mode 0700 (chmod'ed: umask aside)."""
    missing = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:  # another process got there first: the trust check decides
            continue
        os.chmod(d, 0o700)


def untrusted_reason(path: str, parents: bool = True) -> Optional[str]:
    """Why ``path`` may not hold libraries we load, or None when only this user can change it
    (``parents=False``: the folder itself only)."""
    uid = os.geteuid()
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"it cannot be inspected ({e.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if st.st_uid != uid:
        return f"it is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"it is writable by {_who(st.st_mode)} (mode {stat.S_IMODE(st.st_mode):04o})"
    parent = os.path.dirname(os.path.realpath(path)) if parents else ""
    while parent and parent != os.path.dirname(parent):  # up to, not including, "/"
        try:
            pst = os.stat(parent)
        except OSError as e:
            return f"its parent {parent} cannot be inspected ({e.strerror})"
        if pst.st_uid not in (uid, 0):
            return f"its parent {parent} is owned by uid {pst.st_uid} (neither this user nor root)"
        if pst.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not pst.st_mode & stat.S_ISVTX:
            return (f"its parent {parent} is writable by {_who(pst.st_mode)} without the sticky bit "
                    f"(mode {stat.S_IMODE(pst.st_mode):04o}), so others could replace it")
        parent = os.path.dirname(parent)
    return None


def _who(mode: int) -> str:
    return " and ".join(w for w, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if mode & bit)


def _private_dir() -> str:
    global _PRIVATE
    # The folder itself is checked each time (a tmp cleaner may have removed it); not its parents: a
    # $TMPDIR that fails that check would otherwise get a new folder on every call.
    if _PRIVATE is None or untrusted_reason(_PRIVATE, parents=False) is not None:
        _PRIVATE = tempfile.mkdtemp(prefix="hf_win_kernels_")  # 0700, ours, unpredictable name
        atexit.register(shutil.rmtree, _PRIVATE, True)
    return _PRIVATE


def cache_dir() -> str:
    """The folder kernels are cached in, checked to be trustworthy (see the module docstring).

    ``$HF_WIN_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/hf_win/kernels`` or ``~/.cache/hf_win/kernels``,
    created with mode 0700 if missing. If it cannot be created or is not trusted, one warning per folder
    and process says which and why, and a private folder of this process is returned instead."""
    path = _default_dir()
    with _LOCK:
        try:
            _make_dirs(path)
            reason = untrusted_reason(path)
        except OSError as e:
            reason = f"it cannot be created ({e.strerror or e})"
        if reason is None:
            return path
        private = _private_dir()
        warn_once(f"dir:{path}", f"hf_win kernels: not using the cache folder {path}: {reason}. Libraries "
                                  f"from a folder others can change could run their code in this process. "
                                  f"Building in the private folder {private} for this process instead "
                                  f"(set HF_WIN_CACHE_DIR to a folder only you can write to keep the cache).")
        return private



# --------------------------------------------------------------------------------------------- files
def file_problem(st: os.stat_result) -> Optional[str]:
    uid = os.geteuid()
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file" + (" (a symbolic link)" if stat.S_ISLNK(st.st_mode) else "")
    if st.st_uid != uid:
        return f"it is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"it is writable by {_who(st.st_mode)} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def read_checked(path: str, limit: Optional[int] = None) -> bytes:
    """The bytes of ``path`` if it passes :func:`file_problem` (checked on the open descriptor too);
    raises ``FileNotFoundError`` if absent, ``ValueError(reason)`` if refused."""
    st = os.lstat(path)
    problem = file_problem(st)
    if problem:
        raise ValueError(problem)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            raise ValueError("it changed while being checked")
        problem = file_problem(fst)
        if problem:
            raise ValueError(problem)
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if limit is not None and total > limit:
                raise ValueError(f"it is larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot
        pass
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> None:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=folder)  # 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def remove_if_ours(path: str) -> None:
    try:
        if os.lstat(path).st_uid == os.geteuid():
            os.unlink(path)
    except OSError:
        pass


def open_entry(path: str, entry: str) -> ctypes.CDLL:
    """``dlopen`` a verified file; raises ``ValueError(reason)`` if it does not load or lacks ``entry``."""
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        raise ValueError(f"it does not load ({e})") from e
    if not hasattr(lib, entry):
        raise ValueError(f"it does not export the entry point {entry!r}")
    return lib


class KeyLock:
    """An exclusive ``flock`` on the key's lock file, so that processes sharing the cache build a key
    once; best effort (no lock where ``flock`` is missing or fails: the atomic renames still hold)."""

    def __init__(self, path: str):
        self.fd = None
        if fcntl is None:
            return
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                              | getattr(os, "O_CLOEXEC", 0), 0o600)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError:
            if self.fd is not None:
                os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
