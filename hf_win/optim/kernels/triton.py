"""The Triton emitter: the same traced step (``schedule.schedule``) as Triton kernels, for CUDA tensors.

One launch per stage over every tensor of a call: a table of data pointers (int64, cast to typed
pointers in the kernel) and a table of blocks (tensor index, start offset), so a param group's step is one
launch whatever the number of tensors (three for a step with a reduction: the stage that computes it, a
per-tensor sum of the blocks' partial sums in block order, so results are deterministic, then the stage
that uses it). Offsets are int64: tensors past 2^31 elements are fine. Arithmetic is in float32 for
float32/bfloat16/float16 tensors (float64 for float64 parameters), in registers; host scalars arrive in a
float64 tensor (Triton would make Python floats float32), and divisions and square roots are the
correctly rounded ones (``div_rn``/``sqrt_rn``) without FMA contraction, as the eager path computes.
bfloat16 is converted by the same bit operations as the C kernel (nearest, or stochastic with the
counter-based bits of ``_rounding.py``), so both round an element identically.

The generated source is registered in ``linecache`` (Triton reads a kernel's source through ``inspect``)
and executed from memory: nothing is written to or loaded from disk but Triton's own compilation cache.
Tested on CPU tensors under ``TRITON_INTERPRET=1``; works with triton 3.6 and 3.9.
"""

from __future__ import annotations

import contextlib
import hashlib
import linecache
import os
from typing import Dict, List, Sequence

import torch
# Imported here so that this module fails to import where Triton is missing or broken: that failure is
# how kernels.backend_for learns that no Triton kernel can run (the generated source imports them itself).
import triton  # noqa: F401
import triton.language as tl  # noqa: F401

from .. import _rounding as R
from .._precision import compute_dtype, exact_arrays
from .ir import Program, Unsupported
from .schedule import render, schedule, spelling

__all__ = ["emit", "TritonKernel"]

BLOCK = 1024
NUM_WARPS = 4
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


def emit(prog: Program, dtypes: Sequence[torch.dtype], rounding: Sequence[bool]) -> str:
    """Python source defining ``stage0``, ``stage1``, ... and ``reduce_blocks`` (Triton kernels)."""
    for d in dtypes:
        if d not in _TYPES:
            raise Unsupported(f"dtype {d} in the Triton kernel (float32, float64, bfloat16, float16)")
    f64 = compute_dtype(dtypes) == torch.float64
    ct = "tl.float64" if f64 else "tl.float32"
    A, K = len(dtypes), len(prog.operands)
    sr_arrays = [a for a in range(A) if rounding[a]]
    lines = ["import triton", "import triton.language as tl", "",
             "@triton.jit", "def _fmix32(h):",
             "    h = h ^ (h >> 16)", f"    h = (h * {R.FMIX_1:#x}) & {_M}", "    h = h ^ (h >> 13)",
             f"    h = (h * {R.FMIX_2:#x}) & {_M}", "    return h ^ (h >> 16)", ""]
    for si, st in enumerate(schedule(prog, exact_arrays(dtypes))):
        stored = {a for a, _ in st.stores}
        body = ["@triton.jit",
                f"def stage{si}(PTRS, NUMEL, KEYS, SC, BT, BS, PART, RED, NRED: tl.constexpr, BLOCK: tl.constexpr):",
                "    b = tl.program_id(0)",
                "    j = tl.load(BT + b)",
                "    offs = tl.load(BS + b) + tl.arange(0, BLOCK)",
                "    mask = offs < tl.load(NUMEL + j)"]
        body += [f"    k{i} = tl.load(SC + {i}).to({ct})" for i in range(K)]
        for j in st.tscalars:
            body.append(f"    T{j} = {_tscalar(prog, j)}")
            body.append(f"    T{j}c = T{j}.to({ct})")
        used = sorted({a for a, _ in st.loads} | stored)
        for a in used:
            body.append(f"    a{a} = tl.load(PTRS + j * {A} + {a}).to(tl.pointer_type({_TYPES[dtypes[a]]}))")
        for a, vid in st.loads:
            raw = f"tl.load(a{a} + offs, mask=mask, other=0)"
            if dtypes[a] == torch.bfloat16:
                body.append(f"    v{vid} = (({raw}.to(tl.int32) << 16).to(tl.float32, bitcast=True)).to({ct})")
            else:
                body.append(f"    v{vid} = {raw}.to({ct})")
        spell = _spelling(f64)
        for vid, e in st.lets:
            body.append(f"    v{vid} = {render(e, spell)}")
        for r, vid in st.reductions:
            body.append(f"    sq{r} = tl.where(mask, v{vid}.to(tl.float64) * v{vid}.to(tl.float64), 0.0)")
            body.append(f"    tl.store(PART + b * NRED + {r}, tl.sum(sq{r}, axis=0))")
        for a, vid in st.stores:
            if dtypes[a] == torch.bfloat16:
                body.append(f"    u{a} = v{vid}.to(tl.float32).to(tl.int32, bitcast=True).to(tl.int64) & {_M}")
                if rounding[a]:
                    q = sr_arrays.index(a)
                    body += [f"    key{a} = _fmix32((tl.load(SC + {K + q}).to(tl.int64) + "
                             f"tl.load(KEYS + j) * {R.S_TENSOR:#x}) & {_M})",
                             f"    rb{a} = _fmix32((((offs & {_M}) + key{a}) & {_M}) ^ (((offs >> 32) * {R.S_HIGH:#x}) & {_M}))",
                             f"    h{a} = ((u{a} + (rb{a} >> 16)) >> 16) & 0xFFFF"]
                else:
                    body.append(f"    h{a} = ((u{a} + 0x7FFF + ((u{a} >> 16) & 1)) >> 16) & 0xFFFF")
                body.append(f"    h{a} = tl.where(v{vid} != v{vid}, {R.BF16_NAN:#x}, h{a})")
                body.append(f"    tl.store(a{a} + offs, h{a}.to(tl.uint16), mask=mask)")
            else:
                body.append(f"    tl.store(a{a} + offs, v{vid}.to({_TYPES[dtypes[a]]}), mask=mask)")
        lines += body + [""]
    lines += ["@triton.jit",
              "def reduce_blocks(PART, FIRST, RED, R, NRED: tl.constexpr, CH: tl.constexpr):",
              "    j = tl.program_id(0)",
              "    lo = tl.load(FIRST + j)",
              "    hi = tl.load(FIRST + j + 1)",
              "    acc = tl.zeros([CH], dtype=tl.float64)",
              "    for s in range(lo, hi, CH):",
              "        idx = s + tl.arange(0, CH)",
              "        acc += tl.load(PART + idx * NRED + R, mask=idx < hi, other=0.0)",
              "    tl.store(RED + j * NRED + R, tl.sum(acc, axis=0))", ""]
    return "\n".join(lines)


def _load_source(source: str) -> dict:
    """Execute generated kernel source from memory (registered in ``linecache`` for ``inspect``)."""
    name = f"<hf_win triton {hashlib.sha256(source.encode()).hexdigest()[:16]}>"
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    namespace: dict = {"__name__": f"hf_win_triton_{name[15:-1]}"}
    exec(compile(source, name, "exec"), namespace)  # noqa: S102 - our own generated source
    return namespace


class TritonKernel:
    """The Triton kernels of one traced step; ``run`` launches them over a call's tensors."""

    backend = "triton"

    def __init__(self, prog: Program, dtypes: Sequence[torch.dtype], rounding: Sequence[bool]):
        self.source = emit(prog, dtypes, rounding)
        ns = _load_source(self.source)
        self.stages = [(ns[f"stage{i}"], st) for i, st in enumerate(schedule(prog, exact_arrays(dtypes)))]
        self.reduce = ns["reduce_blocks"]
        self.nred = max(prog.n_reductions, 1)
        self.has_reductions = prog.n_reductions > 0
        self._tables: Dict[tuple, tuple] = {}

    def _blocks(self, numels: List[int], device) -> tuple:
        key = (tuple(numels), str(device))
        t = self._tables.get(key)
        if t is None:
            counts = [(n + BLOCK - 1) // BLOCK for n in numels]
            bt = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), torch.tensor(counts))
            starts = torch.cat([torch.arange(c, dtype=torch.int64) * BLOCK for c in counts])
            first = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0)
            numel = torch.tensor(numels, dtype=torch.int64)
            t = tuple(x.to(device) for x in (bt, starts, first, numel)) + (int(sum(counts)),)
            if len(self._tables) > 32:
                self._tables.clear()
            self._tables[key] = t
        return t

    def _cached(self, key: tuple, values: List[int], device) -> torch.Tensor:
        """An int64 device copy of ``values``, reused while the addresses do not change (replaced
        storage gives new addresses, hence a new table)."""
        t = self._tables.get(key)
        if t is None:
            if len(self._tables) > 32:
                self._tables.clear()
            t = self._tables[key] = torch.tensor(values, dtype=torch.int64).to(device)
        return t

    def run(self, ptrs: List[int], numels: List[int], keys: List[int], scalars: List[float], device,
            sync=None) -> None:
        """As ``CKernel.run`` (``sync``: each stage's per-tensor sums, summed over the processes in place)."""
        bt, bs, first, numel, n_blocks = self._blocks(numels, device)
        if n_blocks == 0:
            if sync is not None:  # no element here: this process's sums are 0, and it takes part in each sum
                for _, st in self.stages:
                    if st.reductions:
                        sync(torch.zeros(len(numels) * len(st.reductions), dtype=torch.float64, device=device))
            return
        table = self._cached(("ptrs", tuple(ptrs), str(device)), ptrs, device)
        kid = self._cached(("keys", tuple(keys), str(device)), keys, device)
        sc = torch.tensor(scalars or [0.0], dtype=torch.float64).to(device)
        part = torch.empty(n_blocks * self.nred if self.has_reductions else 1, dtype=torch.float64, device=device)
        red = torch.empty(len(numels) * self.nred if self.has_reductions else 1, dtype=torch.float64, device=device)
        extra = {} if _interpreting() else {"num_warps": NUM_WARPS, "enable_fp_fusion": False}
        device_ctx = torch.cuda.device(device) if torch.device(device).type == "cuda" else contextlib.nullcontext()
        with device_ctx:
            for fn, st in self.stages:
                fn[(n_blocks,)](table, numel, kid, sc, bt, bs, part, red, NRED=self.nred, BLOCK=BLOCK, **extra)
                for r, _ in st.reductions:
                    self.reduce[(len(numels),)](part, first, red, r, NRED=self.nred, CH=256,
                                                **({} if _interpreting() else {"num_warps": NUM_WARPS}))
                if sync is not None and st.reductions:
                    rs = [r for r, _ in st.reductions]
                    sums = red.view(len(numels), self.nred)[:, rs].contiguous()
                    sync(sums)
                    red.view(len(numels), self.nred)[:, rs] = sums
