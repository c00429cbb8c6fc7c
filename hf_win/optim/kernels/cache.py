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

import ctypes
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
from typing import Dict, List, Optional, Tuple

from .cache_folder import (KernelCacheWarning, KeyLock, cache_dir, file_problem, fsync_dir, open_entry,
                           read_checked, remove_if_ours, warn_once, write_atomic)
from .cache_folder import reset as _reset_folder
from .compiler import KernelUnavailable, compile_library, compiler
from .compiler import reset as _reset_compiler

__all__ = ["KernelUnavailable", "KernelCacheWarning", "compiler", "cache_dir", "load_or_build", "counters",
           "reset_counters"]

#: Bumped whenever what goes into a key, or how a library is built or installed, changes.
_FORMAT = "hf_win-kernel-cache-2"

_LOCK = threading.RLock()
_LOADED: Dict[str, ctypes.CDLL] = {}  # key -> verified, loaded library
_COUNTS = {"builds": 0, "loads": 0, "rejected": 0}


def counters() -> Dict[str, int]:
    """``{'builds': n, 'loads': n, 'rejected': n}``: libraries compiled, loaded from the cache after
    verification, and cached files refused."""
    return dict(_COUNTS)


def reset_counters() -> None:
    _COUNTS.update(builds=0, loads=0, rejected=0)


def _reset_for_tests() -> None:
    """Forget this process's state: loaded libraries, compiler identities, warnings already given, the
    private folder (not deleted: libraries may still be mapped from it) and the counters."""
    with _LOCK:
        _LOADED.clear()
        _reset_compiler()
        _reset_folder()
        reset_counters()


# --------------------------------------------------------------------------------------------- files
def _key(source: str, argv_identity: str, flags: List[str], extra_key: str) -> str:
    blob = json.dumps([_FORMAT, source, argv_identity, list(flags), extra_key, sys.platform])
    return hashlib.sha256(blob.encode()).hexdigest()[:40]


def _paths(folder: str, key: str) -> Tuple[str, str, str]:
    base = os.path.join(folder, f"hf_win_{key}")
    return base + ".so", base + ".sha256", base + ".lock"


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
        with KeyLock(lock_path):
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
        problem = file_problem(st)
        if problem:
            raise ValueError(problem)
        try:
            recorded = read_checked(sum_path, limit=256).decode("ascii", "replace").strip()
        except FileNotFoundError:
            raise ValueError(f"its checksum file {os.path.basename(sum_path)} is missing") from None
        except ValueError as e:
            raise ValueError(f"its checksum file {os.path.basename(sum_path)} is refused: {e}") from None
        if len(recorded) != 64 or any(c not in "0123456789abcdef" for c in recorded):
            raise ValueError(f"its checksum file {os.path.basename(sum_path)} is malformed")
        actual = hashlib.sha256(read_checked(so_path)).hexdigest()
        if actual != recorded:
            raise ValueError("its SHA-256 does not match the one recorded when it was built "
                             "(truncated or damaged); it was not loaded")
        lib = open_entry(so_path, entry)  # only now: the bytes are the ones we wrote
    except (ValueError, OSError) as e:
        reason = str(e) if isinstance(e, ValueError) else f"it cannot be read ({e})"
        _COUNTS["rejected"] += 1
        warn_once(f"file:{so_path}:{reason}",
                   f"hf_win kernels: refusing the cached library {so_path}: {reason}. Rebuilding it.")
        remove_if_ours(so_path)
        remove_if_ours(sum_path)
        return None
    _COUNTS["loads"] += 1
    return lib


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
        err = compile_library(argv, flags, src_name, out_name, build_dir)
        if err:
            raise KernelUnavailable(f"the C compiler {' '.join(argv)!r} failed to compile the kernel:\n{err}")
        _COUNTS["builds"] += 1
        built = os.path.join(build_dir, out_name)
        try:
            os.chmod(built, 0o700)  # not group/other-writable, whatever the umask
            with open(built, "rb+") as f:
                os.fsync(f.fileno())
            data = read_checked(built)
        except (OSError, ValueError) as e:
            raise KernelUnavailable(f"cannot read back the library just built in {build_dir}: {e}") from e
        try:
            lib = open_entry(built, entry)  # checked before it is installed: a bad build never lands
        except ValueError as e:
            raise KernelUnavailable(f"the library built from the kernel source {e}") from None
        try:
            os.replace(built, so_path)
            write_atomic(sum_path, (hashlib.sha256(data).hexdigest() + "\n").encode())
            fsync_dir(folder)
        except OSError as e:  # the library is loaded and fine: use it, just not cached
            warn_once(f"install:{so_path}", f"hf_win kernels: could not store the kernel in {folder} "
                                             f"({e}); it is used for this process only")
        return lib
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
