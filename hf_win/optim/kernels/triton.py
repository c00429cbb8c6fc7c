"""The Triton emitter: the same traced step (``schedule.schedule``) as Triton kernels, for CUDA tensors.

Per stage two kernels over every tensor of a call: ``stage<i>_full`` for the whole blocks of tensors whose
arrays all start 16 bytes aligned (no mask; alignment and contiguity hints that are true for exactly
those blocks, so the compiler emits 128-bit accesses) and ``stage<i>`` (masked, no hint) for the tails
and for misaligned tensors; the host sorts the blocks (``aligned``, ``block_tables``). Each reads a table
of data pointers (int64, cast to typed pointers in the kernel) and a table of blocks (tensor index, start
offset), so a param group's step is one or two launches per stage whatever the number of tensors (a step
with a reduction adds a per-tensor sum of the blocks' partial sums in block order, so results are
deterministic). Offsets are int64: tensors past 2^31 elements are fine. Arithmetic is in float32 for
float32/bfloat16/float16 tensors (float64 for float64 parameters), in registers; host scalars arrive in a
float64 tensor (Triton would make Python floats float32), and divisions and square roots are the
correctly rounded ones (``div_rn``/``sqrt_rn``) without FMA contraction, as the eager path computes.
bfloat16 is converted by the same bit operations as the C kernel (nearest, or stochastic with the
counter-based bits of ``_rounding.py``), so both round an element identically. ``aot.py`` compiles every
kernel for sm_80/sm_90 without a GPU and checks these claims in the PTX.

The generated source is registered in ``linecache`` (Triton reads a kernel's source through ``inspect``)
and executed from memory: nothing is written to or loaded from disk but Triton's own compilation cache.
Tested on CPU tensors under ``TRITON_INTERPRET=1``; works with triton 3.6 and 3.9.
"""

from __future__ import annotations

import hashlib
import linecache
import os
from typing import Dict, List, Optional, Sequence

import torch
# Imported here so that this module fails to import where Triton is missing or broken: that failure is
# how kernels.backend_for learns that no Triton kernel can run (the generated source imports them itself).
import triton  # noqa: F401
import triton.language as tl  # noqa: F401

from .. import _rounding as R
from .._precision import compute_dtype, exact_arrays
from .ir import Program, Unsupported
from .schedule import render, schedule, spelling

__all__ = ["emit", "load", "aligned", "block_tables", "to_device", "TritonKernel"]

BLOCK = 1024
NUM_WARPS = 8  # 4 elements per thread and array: no kernel spills (4 warps: a few spilled, sm_80/sm_90)
_TYPES = {torch.float32: "tl.float32", torch.float64: "tl.float64", torch.bfloat16: "tl.uint16",
          torch.float16: "tl.float16"}
_M = f"{R.M32:#x}"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _literal(x: float) -> str:
    if x != x or x in (float("inf"), float("-inf")):
        raise Unsupported("a non-finite literal in the Triton kernel")
    return repr(float(x))


def _spelling(f64: bool) -> dict:
    # correctly rounded division and square root in float32 (Triton's defaults are approximations)
    return spelling(
        t=lambda j: f"T{j}c", c=_literal, sign="tl.where({a} > 0, 1.0, tl.where({a} < 0, -1.0, {a}))",
        max="tl.where(({a} != {a}) | ({b} != {b}), {a} + {b}, tl.where({a} > {b}, {a}, {b}))",
        **({"sqrt": "tl.sqrt({a})"} if f64 else {"sqrt": "tl.sqrt_rn({a})", "/": "tl.div_rn({a}, {b})"}),
    )


def _tscalar(prog: Program, j: int) -> str:
    e = prog.tscalars[j]
    if e[0] == "norm":
        return f"tl.sqrt(tl.load(RED + j * NRED + {e[1]}))"
    if e[0] == "ratio":
        w, u = f"T{e[1]}", f"T{e[2]}"
        r = f"tl.where({w} > 0, tl.where({u} > 0, {w} / {u}, 1.0), 1.0)"
        return f"tl.minimum({r}, 1.0)" if e[3] else r
    raise Unsupported(f"per-tensor scalar {e[0]!r}")


def _stage(prog: Program, si: int, st, dtypes, rounding, ct: str, full: bool) -> List[str]:
    """One stage as a kernel. ``full``: the variant for whole blocks of tensors whose every array starts
    16 bytes aligned: no mask, and hints that say so (pointer alignment, block starts on multiples of
    BLOCK), so the compiler emits 128-bit accesses. Otherwise masked, with no hint (any alignment)."""
    A, K = len(dtypes), len(prog.operands)
    sr_arrays = [a for a in range(A) if rounding[a]]
    name, mask, where = (f"stage{si}_full", "", "") if full else (f"stage{si}", ", mask=mask", "mask, ")
    body = ["@triton.jit",
            f"def {name}(PTRS, NUMEL, KEYS, SC, BT, BS, IDX, PART, RED, NRED: tl.constexpr, BLOCK: tl.constexpr):",
            "    b = tl.load(IDX + tl.program_id(0))",
            "    j = tl.load(BT + b)"]
    if full:
        body.append("    offs = tl.multiple_of(tl.load(BS + b), BLOCK) + tl.arange(0, BLOCK)")
    else:
        body += ["    offs = tl.load(BS + b) + tl.arange(0, BLOCK)", "    mask = offs < tl.load(NUMEL + j)"]
    body += [f"    k{i} = tl.load(SC + {i}).to({ct})" for i in range(K)]
    for j in st.tscalars:
        body.append(f"    T{j} = {_tscalar(prog, j)}")
        body.append(f"    T{j}c = T{j}.to({ct})")
    stored = {a for a, _ in st.stores}
    for a in sorted({a for a, _ in st.loads} | stored):
        ptr = f"tl.load(PTRS + j * {A} + {a}).to(tl.pointer_type({_TYPES[dtypes[a]]}))"
        body.append(f"    a{a} = tl.multiple_of({ptr}, 16)" if full else f"    a{a} = {ptr}")
    for a, vid in st.loads:
        raw = f"tl.load(a{a} + offs{mask + ', other=0' if mask else ''})"
        if dtypes[a] == torch.bfloat16:
            body.append(f"    v{vid} = (({raw}.to(tl.int32) << 16).to(tl.float32, bitcast=True)).to({ct})")
        else:
            body.append(f"    v{vid} = {raw}.to({ct})")
    spell = _spelling(ct == "tl.float64")
    for vid, e in st.lets:
        body.append(f"    v{vid} = {render(e, spell)}")
    for r, vid in st.reductions:
        sq = f"v{vid}.to(tl.float64) * v{vid}.to(tl.float64)"
        body.append(f"    sq{r} = tl.where(mask, {sq}, 0.0)" if not full else f"    sq{r} = {sq}")
        body.append(f"    tl.store(PART + b * NRED + {r}, tl.sum(sq{r}, axis=0))")
    paired, drawn = R.pairs(rounding), set()  # one draw per pair of arrays (see _rounding.py)
    for a, vid in st.stores:
        if dtypes[a] == torch.bfloat16:
            body.append(f"    u{a} = v{vid}.to(tl.float32).to(tl.int32, bitcast=True).to(tl.int64) & {_M}")
            if rounding[a]:
                lead, high = paired[a]
                if lead not in drawn:
                    drawn.add(lead)
                    q = sr_arrays.index(lead)
                    body += [f"    key{lead} = _fmix32((tl.load(SC + {K + q}).to(tl.int64) + "
                             f"tl.load(KEYS + j) * {R.S_TENSOR:#x}) & {_M})",
                             f"    rb{lead} = _mix32((((offs & {_M}) + key{lead}) & {_M}) ^ "
                             f"(((offs >> 32) * {R.S_HIGH:#x}) & {_M}))"]
                half = f"(rb{lead} >> 16)" if high else f"(rb{lead} & 0xFFFF)"
                body.append(f"    h{a} = ((u{a} + {half}) >> 16) & 0xFFFF")
            else:
                body.append(f"    h{a} = ((u{a} + 0x7FFF + ((u{a} >> 16) & 1)) >> 16) & 0xFFFF")
            body.append(f"    h{a} = tl.where(v{vid} != v{vid}, {R.BF16_NAN:#x}, h{a})")
            body.append(f"    tl.store(a{a} + offs, h{a}.to(tl.uint16){mask})")
        else:
            body.append(f"    tl.store(a{a} + offs, v{vid}.to({_TYPES[dtypes[a]]}){mask})")
    return body + [""]


def emit(prog: Program, dtypes: Sequence[torch.dtype], rounding: Sequence[bool]) -> str:
    """Python source defining, per stage, ``stage<i>`` (masked, any alignment) and ``stage<i>_full`` (whole
    blocks of 16-byte-aligned tensors), and ``reduce_blocks`` (Triton kernels)."""
    for d in dtypes:
        if d not in _TYPES:
            raise Unsupported(f"dtype {d} in the Triton kernel (float32, float64, bfloat16, float16)")
    ct = "tl.float64" if compute_dtype(dtypes) == torch.float64 else "tl.float32"
    lines = ["import triton", "import triton.language as tl", "",
             "@triton.jit", "def _fmix32(h):",
             "    h = h ^ (h >> 16)", f"    h = (h * {R.FMIX_1:#x}) & {_M}", "    h = h ^ (h >> 13)",
             f"    h = (h * {R.FMIX_2:#x}) & {_M}", "    return h ^ (h >> 16)", "",
             "@triton.jit", "def _mix32(h):", f"    h = (h * {R.MIX:#x}) & {_M}", "    return h ^ (h >> 16)", ""]
    for si, st in enumerate(schedule(prog, exact_arrays(dtypes))):
        for full in (False, True):
            lines += _stage(prog, si, st, dtypes, rounding, ct, full)
    lines += ["@triton.jit",
              "def reduce_blocks(PART, FIRST, RED, R: tl.constexpr, NRED: tl.constexpr, CH: tl.constexpr):",
              "    j = tl.program_id(0)",
              "    lo = tl.load(FIRST + j)",
              "    hi = tl.load(FIRST + j + 1)",
              "    acc = tl.zeros([CH], dtype=tl.float64)",
              "    for s in range(lo, hi, CH):",
              "        idx = s + tl.arange(0, CH)",
              "        acc += tl.load(PART + idx * NRED + R, mask=idx < hi, other=0.0)",
              "    tl.store(RED + j * NRED + R, tl.sum(acc, axis=0))", ""]
    return "\n".join(lines)


def load(source: str, jit=None) -> dict:
    """Execute generated kernel source from memory (registered in ``linecache`` for ``inspect``); its
    kernels are decorated by ``jit`` (default ``triton.jit``: the interpreter under ``TRITON_INTERPRET=1``;
    ``aot.py`` passes ``JITFunction`` to compile for a GPU whatever the setting)."""
    name = f"<hf_win triton {hashlib.sha256(source.encode()).hexdigest()[:16]}>"
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    namespace: dict = {"__name__": f"hf_win_triton_{name[15:-1]}"}
    exec(compile(source, name, "exec"), namespace)  # noqa: S102 - our own generated source
    if jit is not None:  # re-decorate the plain functions (kept by every Triton version as ``.fn``)
        plain = {k: v.fn for k, v in namespace.items() if hasattr(v, "fn") and callable(v.fn)}
        namespace.update({k: jit(f) for k, f in plain.items()})  # the functions' globals: calls resolve here
    return namespace


def aligned(ptrs: Sequence[int]) -> bool:
    """Whether every address is a multiple of 16 bytes (the ``_full`` kernels' promise)."""
    return all(p % 16 == 0 for p in ptrs)


def block_tables(numels: Sequence[int], is_aligned: Sequence[bool]) -> tuple:
    """CPU int64 tables: per block its tensor (BT) and start (BS), tensor by tensor in order; per tensor
    its first block (FIRST, with the total at the end); the blocks of the ``_full`` kernels (whole blocks
    of aligned tensors) and of the masked ones (the rest)."""
    numel = torch.tensor(list(numels), dtype=torch.int64)
    counts = (numel + BLOCK - 1) // BLOCK
    first = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    bt = torch.repeat_interleave(torch.arange(len(numel), dtype=torch.int64), counts)
    bs = (torch.arange(int(first[-1]), dtype=torch.int64) - first[bt]) * BLOCK
    full = torch.tensor(list(is_aligned), dtype=torch.bool)[bt] & (bs + BLOCK <= numel[bt])
    return bt, bs, first, numel, full.nonzero().flatten(), (~full).nonzero().flatten()


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device`` without waiting for it: a CUDA copy goes from pinned memory, queued
    (``non_blocking``; torch's pinned allocator keeps the buffer until the copy has run)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class TritonKernel:
    """The Triton kernels of one traced step; ``prepare`` compiles them for a device, ``run`` launches
    them over a call's tensors."""

    backend = "triton"

    def __init__(self, prog: Program, dtypes: Sequence[torch.dtype], rounding: Sequence[bool]):
        self.source = emit(prog, dtypes, rounding)
        self.dtypes = list(dtypes)
        ns = load(self.source)
        self.stages = [(ns[f"stage{i}"], ns[f"stage{i}_full"], st)
                       for i, st in enumerate(schedule(prog, exact_arrays(dtypes)))]
        self.reduce = ns["reduce_blocks"]
        self.nred = max(prog.n_reductions, 1)
        self.has_reductions = prog.n_reductions > 0
        self._tables: Dict[tuple, tuple] = {}
        self._prepared: set = set()

    def _options(self) -> dict:
        return {} if _interpreting() else {"num_warps": NUM_WARPS, "enable_fp_fusion": False}

    def prepare(self, device) -> None:
        """Compile (and load onto the device) every kernel a call can launch, before any tensor is touched:
        a compiler or loader error raises here, never halfway through a step. Nothing to do for the
        interpreter."""
        key = str(device)
        if key in self._prepared or _interpreting() or torch.device(device).type != "cuda":
            return
        i64, f64 = (torch.empty(1, dtype=d, device=device) for d in (torch.int64, torch.float64))
        opts = self._options()
        with _on(device):
            for masked, full, st in self.stages:
                for fn in (masked, full):
                    _load_binary(fn.warmup(i64, i64, i64, f64, i64, i64, i64, f64, f64, grid=(1,), NRED=self.nred,
                                           BLOCK=BLOCK, **opts))
                for r, _ in st.reductions:
                    _load_binary(self.reduce.warmup(f64, i64, f64, grid=(1,), R=r, NRED=self.nred, CH=256,
                                                    num_warps=NUM_WARPS))
        self._prepared.add(key)

    def _cached(self, key: tuple, make) -> tuple:
        t = self._tables.get(key)
        if t is None:
            if len(self._tables) > 32:
                self._tables.clear()
            t = self._tables[key] = make()
        return t

    def run(self, ptrs: List[int], numels: List[int], keys: List[int], scalars: List[float], device,
            device_scalars: Optional[dict] = None, sync=None) -> None:
        """Launch the stages over a call's tensors. ``device_scalars``: operand slot -> a 0-dim tensor whose
        value the kernel reads where it is (copied on the device: the host never waits for it). ``sync``
        (sharded tensors): each stage's per-tensor sums, summed over the processes in place, after both
        kernels of the stage. Every table is ready before the first launch."""
        A = len(ptrs) // max(len(numels), 1)
        # device copies of what does not change from step to step, reused while the addresses, sizes and
        # keys are the same (replaced storage gives new addresses, hence new tables)
        bt, bs, first, numel, idx_full, idx_tail, table, kid = self._cached(
            (tuple(ptrs), tuple(numels), tuple(keys), str(device)),
            lambda: tuple(to_device(t, device) for t in block_tables(
                numels, [aligned(ptrs[i * A:(i + 1) * A]) for i in range(len(numels))])) + (
                to_device(torch.tensor(ptrs, dtype=torch.int64), device),
                to_device(torch.tensor(keys, dtype=torch.int64), device)))
        n_blocks = bt.numel()
        if n_blocks == 0:
            if sync is not None:  # no element here: this process's sums are 0, and it takes part in each sum
                for *_, st in self.stages:
                    if st.reductions:
                        sync(torch.zeros(len(numels) * len(st.reductions), dtype=torch.float64, device=device))
            return
        sc = to_device(torch.tensor(scalars or [0.0], dtype=torch.float64), device)
        for slot, value in (device_scalars or {}).items():
            sc[slot:slot + 1].copy_(value.reshape(1), non_blocking=True)
        part = torch.empty(n_blocks * self.nred if self.has_reductions else 1, dtype=torch.float64, device=device)
        red = torch.empty(len(numels) * self.nred if self.has_reductions else 1, dtype=torch.float64, device=device)
        opts = self._options()
        with _on(device):
            for masked, full, st in self.stages:
                for fn, idx in ((full, idx_full), (masked, idx_tail)):
                    if idx.numel():
                        fn[(idx.numel(),)](table, numel, kid, sc, bt, bs, idx, part, red, NRED=self.nred,
                                           BLOCK=BLOCK, **opts)
                for r, _ in st.reductions:
                    self.reduce[(len(numels),)](part, first, red, R=r, NRED=self.nred, CH=256,
                                                **({} if _interpreting() else {"num_warps": NUM_WARPS}))
                if sync is not None and st.reductions:
                    rs = [r for r, _ in st.reductions]
                    sums = red.view(len(numels), self.nred)[:, rs].contiguous()
                    sync(sums)
                    red.view(len(numels), self.nred)[:, rs] = sums


def _load_binary(compiled) -> None:
    """Load a compiled kernel onto the current device now (Triton does it at the first launch otherwise);
    raises where the device cannot run it (registers, shared memory)."""
    init = getattr(compiled, "_init_handles", None)
    if init is not None:
        init()


class _on:
    """``torch.cuda.device(device)`` for CUDA devices, nothing otherwise."""

    def __init__(self, device):
        self.ctx = torch.cuda.device(device) if torch.device(device).type == "cuda" else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx is not None else self

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx is not None else False
