"""A cache of compiled C kernels that trusts nothing it did not build and verify itself.

The fused CPU step compiles generated C source into a shared library and loads it with ``ctypes``.
Loading a library runs its code in this process, so the cache is an attack surface, and a damaged file
in it (a full disk, a killed process) must never take the process down. The rules:

**What is trusted, and why.**

- *The cache folder*, only if this user alone can change what is in it: a real directory (not a
  symlink) owned by the effective user, not writable by group or others, and every folder above it
  (up to, not including, ``/``) owned by this user or root and either not writable by group/others or
  sticky (like ``/tmp``, where others cannot rename or delete our entries). Anyone else who can write
  into the folder, or swap it out from above, could plant a library we would then run. A folder that
  fails this is never read from or written to: one warning names it and the reason, and the kernels
  go to a private folder made for this process with ``tempfile.mkdtemp`` (mode 0700) instead.
  The default folder (``$XDG_CACHE_HOME/hf_win/kernels`` or ``~/.cache/hf_win/kernels``) is created
  with mode 0700. POSIX ACLs are not inspected.
- *A cached library*, only if it is a regular file (checked with ``lstat`` and again on the open file
  descriptor: no symlinks, FIFOs or devices), owned by this user, not writable by group/others, and its
  SHA-256 equals the one recorded in its sidecar file at install time. The hash is not a signature (we
  wrote both files, into a folder only we can write); it is what catches a truncated or damaged file
  *before* ``dlopen`` -- mapping a truncated library is what killed processes with SIGBUS.
  Then it must load and export its entry point.
- *The compiler*: ``$CC`` (split like a shell would, so ``CC="ccache gcc"`` works), else ``cc``,
  ``gcc`` or ``clang`` found on ``PATH``. ``PATH`` and ``$CC`` are the user's own choice and are
  trusted as such.

**What happens to a bad file.** A cached library that fails any check (missing or malformed sidecar,
hash mismatch, wrong owner or mode, ``dlopen`` error, missing entry point) is reported once with the
reason, deleted if this user owns it (left alone otherwise) and rebuilt once. A freshly built library is
loaded and checked *before* it is installed in the cache, so a build that does not load or lacks its
entry point never lands there; it raises :class:`KernelUnavailable` and the caller falls back to
another path. Nothing here is allowed to crash the process on a bad cache file.

**Writing.** The compiler writes into a fresh private temporary folder inside the cache folder (same
filesystem); the library is fsynced, verified, then ``os.replace``'d to ``hf_win_<key>.so``; the sidecar
``hf_win_<key>.sha256`` is written to a temporary file, fsynced and renamed after it; then the folder is
fsynced. Readers therefore see a whole file or none. Processes building the same key (e.g. the ranks of
a distributed job) also serialize on a per-key ``flock`` (where available), so one compiles and the
others load its result; without the lock the renames alone keep it correct.

**The key** is a SHA-256 of the source, the compiler's identity (argv, resolved paths and their size and
mtime, the first lines of ``--version``), the flags, the caller's ``extra_key`` (CPU identity), the
platform and a format version: a compiler upgrade or a different ``-march`` never reuses a library.

Known limits: a library already mapped in this process under a path is returned again by ``dlopen`` for
the same path (glibc matches names), which is why freshly built libraries are loaded from their unique
temporary path and loaded libraries are kept per key for the life of the process. Stale temporary
folders of killed builds (``.build_*``) are not cleaned up.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from typing import Dict, List, Optional, Set, Tuple

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = ["KernelUnavailable", "KernelCacheWarning", "compiler", "cache_dir", "load_or_build", "counters",
           "reset_counters"]

#: Bumped whenever what goes into a key, or how a library is built or installed, changes.
_FORMAT = "hf_win-kernel-cache-2"
_COMPILE_TIMEOUT_S = 600
_VERSION_TIMEOUT_S = 60

_LOCK = threading.RLock()
_LOADED: Dict[str, ctypes.CDLL] = {}  # key -> verified, loaded library
_IDENTITY: Dict[Tuple[str, str], Tuple[List[str], str]] = {}  # ($CC, $PATH) -> compiler()
_WARNED: Set[str] = set()
_PRIVATE: Optional[str] = None
_COUNTS = {"builds": 0, "loads": 0, "rejected": 0}


class KernelUnavailable(Exception):
    """A kernel cannot be built or loaded here; ``str(e)`` is the reason in words (logged by the caller)."""


class KernelCacheWarning(UserWarning):
    """Something in the kernel cache was not trusted or not usable; the cache worked around it."""


def counters() -> Dict[str, int]:
    """``{'builds': n, 'loads': n, 'rejected': n}``: libraries compiled, loaded from the cache after
    verification, and cached files refused."""
    return dict(_COUNTS)


def reset_counters() -> None:
    _COUNTS.update(builds=0, loads=0, rejected=0)


def _reset_for_tests() -> None:
    """Forget this process's state: loaded libraries, compiler identities, warnings already given, the
    private folder (not deleted: libraries may still be mapped from it) and the counters."""
    global _PRIVATE
    with _LOCK:
        _LOADED.clear()
        _IDENTITY.clear()
        _WARNED.clear()
        _PRIVATE = None
        reset_counters()


def _warn_once(tag: str, message: str) -> None:
    if tag not in _WARNED:
        _WARNED.add(tag)
        warnings.warn(message, KernelCacheWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------- compiler
def compiler() -> Tuple[List[str], str]:
    """``(argv prefix, identity)`` of the C compiler.

    ``$CC`` is split with :func:`shlex.split` (so ``CC="ccache gcc"`` or ``CC="gcc -m64"`` work) and its
    program looked up on ``PATH``; if it is unset or not found, ``cc``, ``gcc`` then ``clang``. The argv
    prefix has the program's resolved path first. ``identity`` names the resolved program(s) (path,
    real path, size, mtime) and the first lines of ``<argv> --version``; it is cached per process (per
    ``$CC`` and ``$PATH``). Raises :class:`KernelUnavailable` when there is no usable compiler."""
    cc_env = os.environ.get("CC", "")
    memo_key = (cc_env, os.environ.get("PATH", ""))
    with _LOCK:
        hit = _IDENTITY.get(memo_key)
        if hit is not None:
            return list(hit[0]), hit[1]
        argv = _find_compiler(cc_env)
        identity = _identity(argv)
        _IDENTITY[memo_key] = (argv, identity)
        return list(argv), identity


def _find_compiler(cc_env: str) -> List[str]:
    if cc_env.strip():
        try:
            argv = shlex.split(cc_env)
        except ValueError as e:
            argv = []
            _warn_once(f"cc-parse:{cc_env}", f"hf_win kernels: cannot parse CC={cc_env!r} ({e}); "
                                             "trying cc, gcc, clang instead")
        if argv:
            found = shutil.which(argv[0])
            if found:
                return [found, *argv[1:]]
            _warn_once(f"cc-missing:{cc_env}", f"hf_win kernels: CC={cc_env!r}: program {argv[0]!r} not found; "
                                               "trying cc, gcc, clang instead")
    for cand in ("cc", "gcc", "clang"):
        found = shutil.which(cand)
        if found:
            return [found]
    where = f" (CC={cc_env!r} was not found either)" if cc_env.strip() else ""
    raise KernelUnavailable(f"no C compiler found: none of cc, gcc, clang is on PATH{where}; "
                            "install one or set CC")


def _identity(argv: List[str]) -> str:
    parts = [f"argv={json.dumps(argv)}"]
    for tok in argv:  # every program named (e.g. both ccache and gcc in "ccache gcc")
        if tok.startswith("-") or "=" in tok:
            continue
        path = shutil.which(tok)
        if not path:
            continue
        real = os.path.realpath(path)
        try:
            st = os.stat(real)
            parts.append(f"prog={path} -> {real} size={st.st_size} mtime_ns={st.st_mtime_ns}")
        except OSError:
            parts.append(f"prog={path} -> {real}")
    try:
        proc = subprocess.run([*argv, "--version"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              errors="replace", timeout=_VERSION_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"the C compiler {' '.join(argv)!r} cannot be run: {e}") from e
    lines = [ln.strip() for ln in (proc.stdout or proc.stderr).splitlines() if ln.strip()][:2]
    parts.append(f"version[rc={proc.returncode}]=" + " | ".join(lines))
    return "; ".join(parts)


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


def _untrusted_reason(path: str, parents: bool = True) -> Optional[str]:
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
    if _PRIVATE is None or _untrusted_reason(_PRIVATE, parents=False) is not None:
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
            reason = _untrusted_reason(path)
        except OSError as e:
            reason = f"it cannot be created ({e.strerror or e})"
        if reason is None:
            return path
        private = _private_dir()
        _warn_once(f"dir:{path}", f"hf_win kernels: not using the cache folder {path}: {reason}. Libraries "
                                  f"from a folder others can change could run their code in this process. "
                                  f"Building in the private folder {private} for this process instead "
                                  f"(set HF_WIN_CACHE_DIR to a folder only you can write to keep the cache).")
        return private


# --------------------------------------------------------------------------------------------- files
def _key(source: str, argv_identity: str, flags: List[str], extra_key: str) -> str:
    blob = json.dumps([_FORMAT, source, argv_identity, list(flags), extra_key, sys.platform])
    return hashlib.sha256(blob.encode()).hexdigest()[:40]


def _paths(folder: str, key: str) -> Tuple[str, str, str]:
    base = os.path.join(folder, f"hf_win_{key}")
    return base + ".so", base + ".sha256", base + ".lock"


def _file_problem(st: os.stat_result) -> Optional[str]:
    uid = os.geteuid()
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file" + (" (a symbolic link)" if stat.S_ISLNK(st.st_mode) else "")
    if st.st_uid != uid:
        return f"it is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"it is writable by {_who(st.st_mode)} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _read_checked(path: str, limit: Optional[int] = None) -> bytes:
    """The bytes of ``path`` if it passes :func:`_file_problem` (checked on the open descriptor too);
    raises ``FileNotFoundError`` if absent, ``ValueError(reason)`` if refused."""
    st = os.lstat(path)
    problem = _file_problem(st)
    if problem:
        raise ValueError(problem)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            raise ValueError("it changed while being checked")
        problem = _file_problem(fst)
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


def _fsync_dir(folder: str) -> None:
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


def _write_atomic(path: str, data: bytes) -> None:
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


def _remove_if_ours(path: str) -> None:
    try:
        if os.lstat(path).st_uid == os.geteuid():
            os.unlink(path)
    except OSError:
        pass


def _open_entry(path: str, entry: str) -> ctypes.CDLL:
    """``dlopen`` a verified file; raises ``ValueError(reason)`` if it does not load or lacks ``entry``."""
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        raise ValueError(f"it does not load ({e})") from e
    if not hasattr(lib, entry):
        raise ValueError(f"it does not export the entry point {entry!r}")
    return lib


class _KeyLock:
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


# --------------------------------------------------------------------------------------------- load / build
def load_or_build(source: str, entry: str, flags: List[str], extra_key: str = "") -> ctypes.CDLL:
    """A loaded library that exports ``entry``, built from the C ``source`` with :func:`compiler` and
    ``flags`` (first with ``-fopenmp`` added, then without: Apple clang has no OpenMP; ``-lm`` is linked),
    or found in :func:`cache_dir` and verified.

    ``extra_key`` goes into the key (the caller passes what else the library depends on, e.g. the CPU).
    Loaded libraries are kept per key for the life of the process. A bad cached file is reported, removed
    and rebuilt once; raises :class:`KernelUnavailable` (never crashes) when there is no compiler, the
    source does not compile, or the library built does not load or lacks ``entry``. Failures are not
    remembered here: the caller should remember them rather than call again every step."""
    argv, identity = compiler()
    key = _key(source, identity, flags, extra_key)
    with _LOCK:
        lib = _LOADED.get(key)
        if lib is not None:
            return lib
        folder = cache_dir()
        so_path, sum_path, lock_path = _paths(folder, key)
        with _KeyLock(lock_path):
            lib = _load_cached(so_path, sum_path, entry)
            if lib is None:
                lib = _build_and_install(source, entry, argv, flags, key, folder, so_path, sum_path)
        _LOADED[key] = lib
        return lib


def _load_cached(so_path: str, sum_path: str, entry: str) -> Optional[ctypes.CDLL]:
    """The cached library if it passes every check; None if absent or refused (reported and removed)."""
    try:
        try:
            st = os.lstat(so_path)
        except FileNotFoundError:
            return None
        problem = _file_problem(st)
        if problem:
            raise ValueError(problem)
        try:
            recorded = _read_checked(sum_path, limit=256).decode("ascii", "replace").strip()
        except FileNotFoundError:
            raise ValueError(f"its checksum file {os.path.basename(sum_path)} is missing") from None
        except ValueError as e:
            raise ValueError(f"its checksum file {os.path.basename(sum_path)} is refused: {e}") from None
        if len(recorded) != 64 or any(c not in "0123456789abcdef" for c in recorded):
            raise ValueError(f"its checksum file {os.path.basename(sum_path)} is malformed")
        actual = hashlib.sha256(_read_checked(so_path)).hexdigest()
        if actual != recorded:
            raise ValueError("its SHA-256 does not match the one recorded when it was built "
                             "(truncated or damaged); it was not loaded")
        lib = _open_entry(so_path, entry)  # only now: the bytes are the ones we wrote
    except (ValueError, OSError) as e:
        reason = str(e) if isinstance(e, ValueError) else f"it cannot be read ({e})"
        _COUNTS["rejected"] += 1
        _warn_once(f"file:{so_path}:{reason}",
                   f"hf_win kernels: refusing the cached library {so_path}: {reason}. Rebuilding it.")
        _remove_if_ours(so_path)
        _remove_if_ours(sum_path)
        return None
    _COUNTS["loads"] += 1
    return lib


def _compile(argv: List[str], flags: List[str], src_name: str, out_name: str, cwd: str) -> str:
    """Run the compiler in ``cwd``; returns '' on success, else the error (stderr tail)."""
    err = ""
    for extra in (["-fopenmp"], []):  # no OpenMP (e.g. Apple clang): one thread
        cmd = [*argv, *flags, *extra, src_name, "-o", out_name, "-lm"]
        try:
            proc = subprocess.run(cmd, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  errors="replace", timeout=_COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            err = f"it did not finish within {_COMPILE_TIMEOUT_S} s"
            continue
        except OSError as e:
            return f"it cannot be run: {e}"
        if proc.returncode == 0:
            return ""
        err = (proc.stderr or proc.stdout or f"exit status {proc.returncode}")[-2000:]
    return err


def _build_and_install(source: str, entry: str, argv: List[str], flags: List[str], key: str, folder: str,
                       so_path: str, sum_path: str) -> ctypes.CDLL:
    try:
        build_dir = tempfile.mkdtemp(prefix=".build_", dir=folder)  # 0700, unique: see the module docstring
    except OSError as e:
        raise KernelUnavailable(f"cannot write to the kernel cache folder {folder}: {e}") from e
    try:
        # Fixed relative names: the output does not depend on the temporary folder, so concurrent
        # builders of one key produce the same bytes.
        src_name, out_name = f"hf_win_{key}.c", f"hf_win_{key}.so"
        with open(os.path.join(build_dir, src_name), "w") as f:
            f.write(source)
        err = _compile(argv, flags, src_name, out_name, build_dir)
        if err:
            raise KernelUnavailable(f"the C compiler {' '.join(argv)!r} failed to compile the kernel:\n{err}")
        _COUNTS["builds"] += 1
        built = os.path.join(build_dir, out_name)
        try:
            os.chmod(built, 0o700)  # not group/other-writable, whatever the umask
            with open(built, "rb+") as f:
                os.fsync(f.fileno())
            data = _read_checked(built)
        except (OSError, ValueError) as e:
            raise KernelUnavailable(f"cannot read back the library just built in {build_dir}: {e}") from e
        try:
            lib = _open_entry(built, entry)  # checked before it is installed: a bad build never lands
        except ValueError as e:
            raise KernelUnavailable(f"the library built from the kernel source {e}") from None
        try:
            os.replace(built, so_path)
            _write_atomic(sum_path, (hashlib.sha256(data).hexdigest() + "\n").encode())
            _fsync_dir(folder)
        except OSError as e:  # the library is loaded and fine: use it, just not cached
            _warn_once(f"install:{so_path}", f"hf_win kernels: could not store the kernel in {folder} "
                                             f"({e}); it is used for this process only")
        return lib
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
