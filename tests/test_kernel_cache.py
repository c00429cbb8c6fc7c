"""The kernel cache (hf_win/optim/kernels/cache.py) loads only what it built, from a folder only this user
can write, after checking it; a bad cache file is rebuilt, never a crash."""

import ctypes
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import warnings

import pytest

from hf_win.optim.kernels import cache

SRC = "int hf_win_probe(void) { return 42; }\n"
NO_ENTRY = "int hf_win_other(void) { return 7; }\n"
ENTRY = "hf_win_probe"
FLAGS = ["-O2", "-fPIC", "-shared", "-std=c99"]
FOREIGN_UID = 65534  # "nobody"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_WIN_CACHE_DIR", str(tmp_path / "cache"))
    cache._reset_for_tests()
    yield
    cache._reset_for_tests()


def _need_cc():
    try:
        cache.compiler()
    except cache.KernelUnavailable as e:
        pytest.skip(f"no C compiler here: {e}")


def _paths(source=SRC, flags=FLAGS, folder=None):
    key = cache._key(source, cache.compiler()[1], flags, "")
    so, sidecar, _ = cache._paths(folder or cache.cache_dir(), key)
    return so, sidecar


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _chown_foreign(path):
    try:
        os.lchown(path, FOREIGN_UID, -1)
    except PermissionError:
        pytest.skip("giving a file to another uid needs root (CI runs as root)")


@pytest.fixture
def dlopened(monkeypatch):
    """The paths ctypes.CDLL is asked to open."""
    seen = []
    real = ctypes.CDLL

    def spy(path, *a, **k):
        seen.append(os.path.abspath(path))
        return real(path, *a, **k)

    monkeypatch.setattr(ctypes, "CDLL", spy)
    return seen


def _cache_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, cache.KernelCacheWarning)]


def _compile_plain(source, out, tmp_path):
    src = tmp_path / "plain.c"
    src.write_text(source)
    subprocess.run([*cache.compiler()[0], *FLAGS, str(src), "-o", str(tmp_path / "plain.so")], check=True)
    os.replace(tmp_path / "plain.so", out)


def _put(path, data: bytes) -> None:
    """``data`` becomes the file at ``path`` as a new file (as a writer that died or a planted file leaves
    it): rewriting the library this process has mapped in place would crash this process with SIGBUS."""
    with open(str(path) + ".new", "wb") as f:
        f.write(data)
    os.replace(str(path) + ".new", path)


# --------------------------------------------------------------------------------------------- basics
def test_builds_then_loads_verified_from_cache():
    _need_cc()
    lib = cache.load_or_build(SRC, ENTRY, FLAGS)
    assert lib.hf_win_probe() == 42
    assert cache.counters() == {"builds": 1, "loads": 0, "rejected": 0}
    so, sidecar = _paths()
    assert open(sidecar).read().strip() == _sha(so)  # the sidecar records the library's hash
    assert not os.lstat(so).st_mode & 0o022
    assert not [n for n in os.listdir(os.path.dirname(so)) if n.startswith((".tmp_", ".build_"))]

    assert cache.load_or_build(SRC, ENTRY, FLAGS) is lib  # same process: kept, not re-verified
    assert cache.counters()["loads"] == 0

    cache._reset_for_tests()  # as a new process
    assert cache.load_or_build(SRC, ENTRY, FLAGS).hf_win_probe() == 42
    assert cache.counters() == {"builds": 0, "loads": 1, "rejected": 0}


def test_threads_build_a_key_once():
    _need_cc()
    out = []
    threads = [threading.Thread(target=lambda: out.append(cache.load_or_build(SRC, ENTRY, FLAGS))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 4 and all(lib is out[0] for lib in out)
    assert cache.counters()["builds"] == 1


def test_concurrent_processes_share_one_complete_file(tmp_path):
    _need_cc()
    script = (
        "import json\n"
        "from hf_win.optim.kernels import cache as kc\n"
        f"lib = kc.load_or_build({SRC!r}, {ENTRY!r}, {FLAGS!r})\n"
        "print(json.dumps([lib.hf_win_probe(), kc.counters()]))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    results = [json.loads(p.communicate()[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert [r[0] for r in results] == [42, 42, 42]
    assert sum(r[1]["builds"] for r in results) == 1  # the per-key lock: one compiles, the others load
    assert sum(r[1]["rejected"] for r in results) == 0
    so, sidecar = _paths()
    lock = so[:-len(".so")] + ".lock"
    assert sorted(os.listdir(os.path.dirname(so))) == sorted(os.path.basename(p) for p in (so, sidecar, lock))
    assert open(sidecar).read().strip() == _sha(so)


# --------------------------------------------------------------------------------------------- bad files
def test_truncated_library_is_detected_by_hash_never_dlopened_and_rebuilt(dlopened):
    _need_cc()
    cache.load_or_build(SRC, ENTRY, FLAGS)
    so, sidecar = _paths()
    size = os.path.getsize(so)
    with open(so, "rb") as f:  # a full disk or a killed writer left half a file (loading it would die of
        _put(so, f.read()[: size // 2])  # SIGBUS)
    cache._reset_for_tests()
    del dlopened[:]
    with pytest.warns(cache.KernelCacheWarning, match=r"refusing the cached library .*hf_win_.*\.so: its SHA-256"):
        lib = cache.load_or_build(SRC, ENTRY, FLAGS)
    assert lib.hf_win_probe() == 42
    assert os.path.abspath(so) not in dlopened  # the truncated file was never mapped
    assert cache.counters() == {"builds": 1, "loads": 0, "rejected": 1}
    assert os.path.getsize(so) == size and open(sidecar).read().strip() == _sha(so)


def test_missing_sidecar_is_rebuilt(dlopened):
    _need_cc()
    cache.load_or_build(SRC, ENTRY, FLAGS)
    so, sidecar = _paths()
    os.unlink(sidecar)
    cache._reset_for_tests()
    del dlopened[:]
    with pytest.warns(cache.KernelCacheWarning, match="checksum file .* is missing"):
        assert cache.load_or_build(SRC, ENTRY, FLAGS).hf_win_probe() == 42
    assert os.path.abspath(so) not in dlopened
    assert cache.counters() == {"builds": 1, "loads": 0, "rejected": 1}
    assert os.path.exists(sidecar)


def test_file_that_does_not_load_is_rebuilt_not_a_crash():
    _need_cc()
    cache.load_or_build(SRC, ENTRY, FLAGS)
    so, sidecar = _paths()
    _put(so, b"not an ELF file at all" * 100)
    with open(sidecar, "w") as f:  # a consistent hash: only dlopen can tell
        f.write(_sha(so) + "\n")
    cache._reset_for_tests()
    with pytest.warns(cache.KernelCacheWarning, match="does not load"):
        assert cache.load_or_build(SRC, ENTRY, FLAGS).hf_win_probe() == 42
    assert cache.counters() == {"builds": 1, "loads": 0, "rejected": 1}


def test_valid_file_without_entry_point_is_rebuilt(tmp_path):
    _need_cc()
    cache.load_or_build(SRC, ENTRY, FLAGS)
    so, sidecar = _paths()
    _compile_plain(NO_ENTRY, so, tmp_path)  # loads fine, hash recorded, but no hf_win_probe
    with open(sidecar, "w") as f:
        f.write(_sha(so) + "\n")
    cache._reset_for_tests()
    with pytest.warns(cache.KernelCacheWarning, match="does not export the entry point 'hf_win_probe'"):
        assert cache.load_or_build(SRC, ENTRY, FLAGS).hf_win_probe() == 42
    assert cache.counters() == {"builds": 1, "loads": 0, "rejected": 1}


def test_entry_point_still_missing_after_the_rebuild_raises_once(tmp_path):
    _need_cc()
    so, sidecar = _paths(NO_ENTRY)
    os.makedirs(os.path.dirname(so), exist_ok=True)
    _compile_plain(NO_ENTRY, so, tmp_path)
    with open(sidecar, "w") as f:
        f.write(_sha(so) + "\n")
    with pytest.warns(cache.KernelCacheWarning, match="does not export"):
        with pytest.raises(cache.KernelUnavailable, match="does not export the entry point 'hf_win_probe'"):
            cache.load_or_build(NO_ENTRY, ENTRY, FLAGS)
    assert cache.counters() == {"builds": 1, "loads": 0, "rejected": 1}  # rebuilt exactly once
    assert not os.path.exists(so)  # a bad build is never installed

    cache._reset_for_tests()  # nothing cached: one build, refused before it lands
    with pytest.raises(cache.KernelUnavailable, match="does not export"):
        cache.load_or_build(NO_ENTRY, ENTRY, FLAGS)
    assert cache.counters() == {"builds": 1, "loads": 0, "rejected": 0}
    assert not os.path.exists(so)


def test_foreign_owned_library_is_not_loaded(dlopened):
    _need_cc()
    cache.load_or_build(SRC, ENTRY, FLAGS)
    so, _ = _paths()
    _chown_foreign(so)
    cache._reset_for_tests()
    del dlopened[:]
    with pytest.warns(cache.KernelCacheWarning, match=rf"refusing the cached library {so}: it is owned by uid {FOREIGN_UID}"):
        assert cache.load_or_build(SRC, ENTRY, FLAGS).hf_win_probe() == 42
    assert os.path.abspath(so) not in dlopened
    assert cache.counters() == {"builds": 1, "loads": 0, "rejected": 1}
    assert os.lstat(so).st_uid == os.geteuid()  # replaced by our own build


def test_group_writable_or_symlinked_library_is_not_loaded(tmp_path, dlopened):
    _need_cc()
    cache.load_or_build(SRC, ENTRY, FLAGS)
    so, _ = _paths()
    os.chmod(so, 0o775)
    cache._reset_for_tests()
    with pytest.warns(cache.KernelCacheWarning, match="writable by group"):
        cache.load_or_build(SRC, ENTRY, FLAGS)
    assert cache.counters()["rejected"] == 1

    elsewhere = tmp_path / "elsewhere.so"
    shutil.copy(so, elsewhere)
    os.unlink(so)
    os.symlink(elsewhere, so)
    cache._reset_for_tests()
    del dlopened[:]
    with pytest.warns(cache.KernelCacheWarning, match="not a regular file"):
        assert cache.load_or_build(SRC, ENTRY, FLAGS).hf_win_probe() == 42
    assert cache.counters() == {"builds": 1, "loads": 0, "rejected": 1}
    assert os.path.abspath(so) not in dlopened and str(elsewhere) not in dlopened
    assert not os.path.islink(so)


# --------------------------------------------------------------------------------------------- folders
def test_folder_owned_by_another_user_is_never_used(tmp_path):
    _need_cc()
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    _chown_foreign(folder)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        first, second = cache.cache_dir(), cache.cache_dir()
        lib = cache.load_or_build(SRC, ENTRY, FLAGS)
    msgs = _cache_warnings(rec)
    assert len(msgs) == 1, msgs  # once per process
    assert str(folder) in msgs[0] and f"owned by uid {FOREIGN_UID}" in msgs[0] and first in msgs[0]
    assert first == second != str(folder)
    st = os.lstat(first)
    assert st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700
    assert lib.hf_win_probe() == 42
    assert os.listdir(folder) == []  # nothing read from or written to it
    assert [n for n in os.listdir(first) if n.endswith(".so")]


@pytest.mark.parametrize("mode, who", [(0o777, "group and others"), (0o770, "group"), (0o703, "others")],
                         ids=["0777", "0770", "0703"])
def test_folder_writable_by_others_is_not_trusted(tmp_path, mode, who):
    folder = tmp_path / "cache"
    folder.mkdir()
    os.chmod(folder, mode)
    with pytest.warns(cache.KernelCacheWarning, match=rf"not using the cache folder {folder}: it is writable by {who} "):
        got = cache.cache_dir()
    assert got != str(folder) and os.path.basename(got).startswith("hf_win_kernels_")


def test_parent_writable_by_others_needs_the_sticky_bit(tmp_path, monkeypatch):
    parent = tmp_path / "shared"
    parent.mkdir()
    folder = parent / "cache"
    monkeypatch.setenv("HF_WIN_CACHE_DIR", str(folder))
    os.chmod(parent, 0o777)  # anyone could rename our folder away and put theirs in its place
    with pytest.warns(cache.KernelCacheWarning, match=rf"its parent {parent} is writable by group and others without the sticky bit"):
        assert cache.cache_dir() != str(folder)
    cache._reset_for_tests()
    os.chmod(parent, 0o1777)  # like /tmp: others cannot touch our entries
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.cache_dir() == str(folder)


def test_symlinked_folder_is_not_trusted(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    os.symlink(real, tmp_path / "cache")
    with pytest.warns(cache.KernelCacheWarning, match="it is a symbolic link"):
        assert cache.cache_dir() != str(tmp_path / "cache")


def test_default_folder_is_created_private(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_WIN_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    old = os.umask(0)  # whatever the umask: the folders come out 0700
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = cache.cache_dir()
    finally:
        os.umask(old)
    assert got == str(tmp_path / "home" / ".cache" / "hf_win" / "kernels")
    for d in (got, os.path.dirname(got), os.path.dirname(os.path.dirname(got))):
        assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700, d

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == str(tmp_path / "xdg" / "hf_win" / "kernels")
    assert stat.S_IMODE(os.lstat(tmp_path / "xdg" / "hf_win" / "kernels").st_mode) == 0o700


# --------------------------------------------------------------------------------------------- compiler
def test_cc_with_arguments_is_honoured(monkeypatch):
    _need_cc()
    cc = cache.compiler()[0][0]
    # Compiles only if the arguments reach the compiler ($CC is a command line, not one program name).
    monkeypatch.setenv("CC", f"env HF_WIN_UNUSED=1 {cc} -DHF_WIN_VALUE=42")
    cache._reset_for_tests()
    argv, identity = cache.compiler()
    assert os.path.basename(argv[0]) == "env" and argv[1:] == ["HF_WIN_UNUSED=1", cc, "-DHF_WIN_VALUE=42"]
    assert os.path.realpath(cc) in identity
    lib = cache.load_or_build("int hf_win_probe(void) { return HF_WIN_VALUE; }\n", ENTRY, FLAGS)
    assert lib.hf_win_probe() == 42


def test_identity_holds_the_compiler_version():
    _need_cc()
    argv, identity = cache.compiler()
    version = subprocess.run([*argv, "--version"], capture_output=True, text=True).stdout.splitlines()[0].strip()
    assert version and version in identity


def test_key_changes_with_the_compiler_identity(monkeypatch):
    _need_cc()
    argv, identity = cache.compiler()
    monkeypatch.setattr(cache, "compiler", lambda: (argv, identity + " 1.0"))
    cache.load_or_build(SRC, ENTRY, FLAGS)
    monkeypatch.setattr(cache, "compiler", lambda: (argv, identity + " 2.0"))  # an upgraded compiler
    cache.load_or_build(SRC, ENTRY, FLAGS)
    assert cache.counters()["builds"] == 2
    assert len([n for n in os.listdir(cache.cache_dir()) if n.endswith(".so")]) == 2
    assert cache._key(SRC, "a", FLAGS, "") != cache._key(SRC, "a", FLAGS + ["-O3"], "")
    assert cache._key(SRC, "a", FLAGS, "cpu1") != cache._key(SRC, "a", FLAGS, "cpu2")


def test_compile_error_is_kernel_unavailable_with_the_message():
    _need_cc()
    with pytest.raises(cache.KernelUnavailable, match=r"failed to compile the kernel:\n(.|\n)*error"):
        cache.load_or_build("int hf_win_probe(void) { return undeclared_thing; }\n", ENTRY, FLAGS)
    assert [n for n in os.listdir(cache.cache_dir()) if not n.endswith(".lock")] == []  # nothing installed or left over


def test_no_compiler_is_kernel_unavailable(tmp_path, monkeypatch):
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc") + " -O2")
    monkeypatch.setenv("PATH", str(empty))
    with pytest.warns(cache.KernelCacheWarning, match="program .*no-such-cc' not found; trying cc, gcc, clang"):
        with pytest.raises(cache.KernelUnavailable, match=r"no C compiler found: .*\(CC=.*no-such-cc -O2' was not found"):
            cache.compiler()
    with pytest.raises(cache.KernelUnavailable, match="no C compiler found"):
        cache.load_or_build(SRC, ENTRY, FLAGS)
