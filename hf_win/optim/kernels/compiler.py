"""The C compiler of the kernel cache: which one (``$CC``, else ``cc``, ``gcc`` or ``clang`` on ``PATH``; the
user's own choice, trusted as such), its identity (part of every cache key) and running it.
See ``cache.py`` for the rules of the cache as a whole."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import threading
from typing import Dict, List, Tuple

from .cache_folder import warn_once

__all__ = ["KernelUnavailable", "compiler", "compile_library", "reset"]

_COMPILE_TIMEOUT_S = 600
_VERSION_TIMEOUT_S = 60

_LOCK = threading.RLock()
_IDENTITY: Dict[Tuple[str, str], Tuple[List[str], str]] = {}  # ($CC, $PATH) -> compiler()


class KernelUnavailable(Exception):
    """A kernel cannot be built or loaded here; ``str(e)`` is the reason in words (logged by the caller)."""


def reset() -> None:
    """Forget the compiler identities found so far (tests)."""
    with _LOCK:
        _IDENTITY.clear()


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
            warn_once(f"cc-parse:{cc_env}", f"hf_win kernels: cannot parse CC={cc_env!r} ({e}); "
                                             "trying cc, gcc, clang instead")
        if argv:
            found = shutil.which(argv[0])
            if found:
                return [found, *argv[1:]]
            warn_once(f"cc-missing:{cc_env}", f"hf_win kernels: CC={cc_env!r}: program {argv[0]!r} not found; "
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



def compile_library(argv: List[str], flags: List[str], src_name: str, out_name: str, cwd: str) -> str:
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
