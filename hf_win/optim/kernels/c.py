"""The C emitter: one shared library per traced step structure, for CPU tensors.

``emit`` prints the stages of ``schedule.schedule`` as C: each stage is a ``restrict``-qualified loop over a
chunk of one tensor (so compilers vectorise it without run-time alias checks), compiled with
``-O3 -march=native -ffp-contract=off`` (no FMA contraction, no fast-math: float32 results agree with the
eager path to rounding, float64 replays the golden trajectories). ``hf_win_step`` splits every tensor into
chunks of ``CHUNK`` elements and spreads the chunks over ``torch.get_num_threads()`` OpenMP threads; a
reduction (a norm) is summed per chunk, then per tensor in chunk order, so results never depend on the
number of threads. The library is built and loaded through ``cache.load_or_build`` (a cache that trusts
nothing: see ``cache.py``).

Element types: float32 (``float``), float64 (``double``) and bfloat16 (``uint16_t``, converted by bit
operations: round to nearest even, or stochastic rounding with the counter-based bits of
``hf_win/optim/_rounding.py``). Arithmetic is in double when the parameter is float64, else in float.
"""

from __future__ import annotations

import ctypes
import math
import platform
from typing import List, Sequence

import torch

from .. import _rounding as R
from . import cache
from .._precision import compute_dtype, exact_arrays
from .ir import Program, Unsupported
from .schedule import render, schedule, spelling

__all__ = ["emit", "CKernel", "ELEMENT_TYPES"]

#: Elements per chunk: the unit of work of a thread and of a partial sum.
CHUNK = 16384
assert (1 << 32) % CHUNK == 0, "the stochastic-rounding bits rely on no chunk crossing a multiple of 2**32"
#: Accumulators of a sum in a chunk (each sums every LANES-th element; see ``emit``).
LANES = 16
ELEMENT_TYPES = {torch.float32: "float", torch.float64: "double", torch.bfloat16: "uint16_t"}
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
          "-fPIC", "-shared", "-std=c99"]
ABI = 4  # bump when the entry point's signature changes

_PRELUDE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
static inline float bf16_load(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
"""
# The rounding and its counter-based bits, with the constants of _rounding.py (their only spelling).
_PRELUDE += f"""
static inline uint16_t bf16_round(float f) {{
    uint32_t u; memcpy(&u, &f, 4);
    if (f != f) return {R.BF16_NAN:#x};
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}}
static inline uint16_t bf16_sround(float f, uint32_t r16) {{  /* r16: 16 random bits */
    uint32_t u; memcpy(&u, &f, 4);
    if (f != f) return {R.BF16_NAN:#x};
    u += r16;
    return (uint16_t)(u >> 16);
}}
static inline uint32_t fmix32(uint32_t h) {{
    h ^= h >> 16; h *= {R.FMIX_1:#x}u; h ^= h >> 13; h *= {R.FMIX_2:#x}u; h ^= h >> 16; return h;
}}
static inline uint32_t mix32(uint32_t h) {{ h *= {R.MIX:#x}u; return h ^ (h >> 16); }}
/* The random bits of element g: mix32((lo32(g) + key) ^ hi32(g)*S_HIGH), one draw for a pair of arrays
   (the leader rounds with its high 16 bits, its partner with the low 16: see _rounding.py). A stage computes
   them as mix32((low + (uint32_t)i) ^ high) with low = lo32(base) + key and high = hi32(base)*S_HIGH set once
   (sr_low / sr_high): the same bits, since a stage's elements base..base+n-1 lie in one chunk (base a
   multiple of CHUNK, which divides 2^32, and n <= CHUNK), so hi32 is constant and lo32(base + i) =
   lo32(base) + i. The loop then holds only 32-bit integer arithmetic, which vectorises at full width. */
static inline uint32_t sr_low(uint32_t key, int64_t base) {{ return (uint32_t)base + key; }}
static inline uint32_t sr_high(int64_t base) {{ return (uint32_t)((uint64_t)base >> 32) * {R.S_HIGH:#x}u; }}
"""


def _lit(x: float, ct: str) -> str:
    if math.isnan(x):
        return f"(({ct})NAN)"
    if math.isinf(x):
        return f"(({ct})INFINITY)" if x > 0 else f"(-({ct})INFINITY)"
    return f"(({ct}){x.hex()})"


def _spelling(ct: str) -> dict:
    return spelling(
        t=lambda j: f"(({ct})T{j})", c=lambda x: _lit(x, ct), max="hf_max({a}, {b})", sign="hf_sign({a})",
        sqrt="sqrtf({a})" if ct == "float" else "sqrt({a})",
    )


def _tscalar(prog: Program, j: int) -> str:
    e = prog.tscalars[j]
    if e[0] == "norm":
        return f"sqrt(red[(int64_t)j * NRED + {e[1]}])"
    if e[0] == "ratio":
        w, u = f"T{e[1]}", f"T{e[2]}"
        r = f"({w} > 0 ? ({u} > 0 ? {w} / {u} : 1.0) : 1.0)"
        return f"({r} < 1.0 ? {r} : 1.0)" if e[3] else r
    raise Unsupported(f"per-tensor scalar {e[0]!r}")


def emit(prog: Program, dtypes: Sequence[torch.dtype], rounding: Sequence[bool]) -> str:
    """C source of ``prog`` for arrays of ``dtypes``; ``rounding[a]``: array ``a`` is stored with
    stochastic rounding (bfloat16 arrays only)."""
    for d in dtypes:
        if d not in ELEMENT_TYPES:
            raise Unsupported(f"dtype {d} in the C kernel (float32, float64 and bfloat16 are supported)")
    ct = ELEMENT_TYPES[compute_dtype(dtypes)]
    stages = schedule(prog, exact_arrays(dtypes))
    A, K, NR = len(dtypes), len(prog.operands), prog.n_reductions
    sr_arrays = [a for a in range(A) if rounding[a]]
    paired = R.pairs(rounding)  # array -> (the leader whose key gives its bits, whether it takes the high half)
    out = [_PRELUDE, f"#define NRED {max(NR, 1)}", f"#define LANES {LANES}",
           f"static inline {ct} hf_max({ct} a, {ct} b) {{ return (a != a || b != b) ? a + b : (a > b ? a : b); }}",
           f"static inline {ct} hf_sign({ct} a) {{ return a > 0 ? ({ct})1 : (a < 0 ? ({ct})-1 : a); }}"]
    for si, st in enumerate(stages):
        used = sorted({a for a, _ in st.loads} | {a for a, _ in st.stores})
        params = [f"{'' if a in {s for s, _ in st.stores} else 'const '}{ELEMENT_TYPES[dtypes[a]]} *restrict a{a}"
                  for a in used]
        params += [f"const {ct} k{i}" for i in range(K)]
        params += [f"const double T{j}" for j in st.tscalars]
        leaders = sorted({paired[a][0] for a, _ in st.stores if rounding[a]})
        params += [f"const uint32_t key{a}" for a in leaders]
        params += ["const int64_t base", "double *restrict part"] if st.reductions else ["const int64_t base"]
        body = []
        for a, vid in st.loads:
            et = ELEMENT_TYPES[dtypes[a]]
            val = f"bf16_load(a{a}[i])" if et == "uint16_t" else f"a{a}[i]"
            body.append(f"const {ct} v{vid} = ({ct}){val};")
        spell = _spelling(ct)
        for vid, e in st.lets:
            body.append(f"const {ct} v{vid} = {render(e, spell)};")
        for r, vid in st.reductions:
            body.append(f"acc{r}[LANE] += v{vid} * v{vid};")
        for lead in leaders:
            body.append(f"const uint32_t r{lead} = mix32((low{lead} + (uint32_t)i) ^ high);")
        for a, vid in st.stores:
            et = ELEMENT_TYPES[dtypes[a]]
            if et == "uint16_t":
                if rounding[a]:
                    lead, high = paired[a]
                    val = f"bf16_sround((float)v{vid}, r{lead} {'>> 16' if high else '& 0xffffu'})"
                else:
                    val = f"bf16_round((float)v{vid})"
            else:
                val = f"({et})v{vid}"
            body.append(f"a{a}[i] = {val};")
        signature = f"static void stage{si}(const int64_t n, {', '.join(params)})"
        if leaders:
            signature += " {\n    const uint32_t high = sr_high(base);\n" + "".join(
                f"    const uint32_t low{a} = sr_low(key{a}, base);\n" for a in leaders) + "   "
        else:
            signature += " {\n   "
        if not st.reductions:
            inner = "\n".join(f"        {b}" for b in body)
            out.append(f"{signature} for (int64_t i = 0; i < n; i++) {{\n{inner}\n    }}\n}}")
            continue
        # A sum is not vectorised without reassociation (no fast-math here), and a loop holding one is
        # not vectorised at all. So each of LANES accumulators sums every LANES-th element: the inner
        # loop over lanes is straight-line code the compiler vectorises, and the order of every sum is
        # fixed by the element index alone (chunks start at multiples of LANES).
        lanes = "\n".join(f"            {b}".replace("LANE", "l") for b in body)
        tail = "\n".join(f"        {b}".replace("LANE", "0") for b in body)
        accs = "".join(f"    {ct} acc{r}[LANES] = {{0}};\n" for r, _ in st.reductions)
        outs = "".join(f"    {{ double s = 0.0; for (int l = 0; l < LANES; l++) s += acc{r}[l]; part[{r}] = s; }}\n"
                       for r, _ in st.reductions)
        out.append(f"{signature} \n{accs}    int64_t i0 = 0;\n"
                   f"    for (; i0 + LANES <= n; i0 += LANES) {{\n"
                   f"        for (int l = 0; l < LANES; l++) {{\n            const int64_t i = i0 + l;\n{lanes}\n        }}\n"
                   f"    }}\n    for (int64_t i = i0; i < n; i++) {{\n{tail}\n    }}\n{outs}}}")
    # the entry point
    calls = []
    for si, st in enumerate(stages):
        used = sorted({a for a, _ in st.loads} | {a for a, _ in st.stores})
        args = [f"({ELEMENT_TYPES[dtypes[a]]} *)(intptr_t)ptrs[j * {A} + {a}] + lo" for a in used]
        args += [f"k{i}" for i in range(K)]
        args += [f"T{j}" for j in st.tscalars]
        leaders = sorted({paired[a][0] for a, _ in st.stores if rounding[a]})
        args += [f"fmix32(pre{a} + (uint32_t)(uint64_t)keys[j] * {R.S_TENSOR:#x}u)" for a in leaders]
        args += ["lo", "partial + c * NRED"] if st.reductions else ["lo"]
        tdefs = "".join(f"            const double T{j} = {_tscalar(prog, j)};\n" for j in st.tscalars)
        combine = ""
        if st.reductions:
            rs = ", ".join(str(r) for r, _ in st.reductions)
            combine = f"""
    for (int64_t j = 0; j < n_tensors; j++) {{
        const int rs[] = {{{rs}}};
        for (int q = 0; q < (int)(sizeof(rs) / sizeof(rs[0])); q++) {{
            double s = 0.0;
            for (int64_t c = first[j]; c < first[j + 1]; c++) s += partial[c * NRED + rs[q]];
            red[j * NRED + rs[q]] = s;
        }}
    }}
    if (sync) {{  /* sharded tensors: these sums over every process before the next stage reads them */
        const int rs[] = {{{rs}}}, nq = (int)(sizeof(rs) / sizeof(rs[0]));
        for (int64_t j = 0; j < n_tensors; j++)
            for (int q = 0; q < nq; q++) partial[j * nq + q] = red[j * NRED + rs[q]];
        sync(partial, n_tensors * nq);
        for (int64_t j = 0; j < n_tensors; j++)
            for (int q = 0; q < nq; q++) red[j * NRED + rs[q]] = partial[j * nq + q];
    }}"""
        calls.append(f"""
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1 && total > 1)
#endif
    for (int64_t c = 0; c < total; c++) {{
        const int64_t j = owner[c], lo = (c - first[j]) * {CHUNK}, n = numel[j] - lo < {CHUNK} ? numel[j] - lo : {CHUNK};
        {{
{tdefs}            stage{si}(n, {', '.join(args)});
        }}
    }}{combine}""")
    kdefs = "".join(f"    const {ct} k{i} = ({ct})sc[{i}];\n" for i in range(K))
    predefs = "".join(f"    const uint32_t pre{a} = (uint32_t)(uint64_t)sc[{K + q}];\n" for q, a in enumerate(sr_arrays))
    out.append(f"""
int hf_win_abi(void) {{ return {ABI}; }}

/* ptrs[j*{A} + a]: address of array a of tensor j; numel[j]; keys[j]: the tensor's id for stochastic
   rounding; sc: operands (double), then one stream value per stochastically rounded array; sync: NULL,
   or called after each stage that sums (norms) with those sums (count doubles), to replace them by their
   sums over the processes that hold the other shards of the tensors.
   Returns 0, or -1 when scratch memory could not be allocated (nothing was written then). */
int hf_win_step(int64_t n_tensors, const int64_t *ptrs, const int64_t *numel, const int64_t *keys,
                const double *sc, int n_threads, void (*sync)(double *, int64_t)) {{
{kdefs}{predefs}    int64_t *first = (int64_t *)malloc(sizeof(int64_t) * (size_t)(n_tensors + 1));
    if (!first) return -1;
    first[0] = 0;
    for (int64_t j = 0; j < n_tensors; j++) first[j + 1] = first[j] + (numel[j] + {CHUNK} - 1) / {CHUNK};
    const int64_t total = first[n_tensors];
    int64_t *owner = (int64_t *)malloc(sizeof(int64_t) * (size_t)(total > 0 ? total : 1));
    const int64_t slots = total > n_tensors ? total : (n_tensors > 0 ? n_tensors : 1);  /* partial sums; scratch of sync */
    double *partial = (double *)calloc((size_t)slots * NRED, sizeof(double));
    double *red = (double *)calloc((size_t)(n_tensors > 0 ? n_tensors : 1) * NRED, sizeof(double));
    if (!owner || !partial || !red) {{ free(first); free(owner); free(partial); free(red); return -1; }}
    for (int64_t j = 0; j < n_tensors; j++)
        for (int64_t c = first[j]; c < first[j + 1]; c++) owner[c] = j;
{''.join(calls)}
    free(first); free(owner); free(partial); free(red);
    return 0;
}}
""")
    return "\n".join(out)


def _cpu_id() -> str:
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "model name", "Features")):
                    text += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        pass
    return text


#: The entry point's ``sync`` argument: ``void (*)(double *sums, int64_t count)``.
_SYNC = ctypes.CFUNCTYPE(None, ctypes.POINTER(ctypes.c_double), ctypes.c_int64)


class CKernel:
    """A built C kernel: ``run`` steps tensors given their data pointers."""

    backend = "c"

    def __init__(self, prog: Program, dtypes: Sequence[torch.dtype], rounding: Sequence[bool]):
        source = emit(prog, dtypes, rounding)
        self.lib = cache.load_or_build(source, "hf_win_step", _FLAGS, extra_key=_cpu_id())
        if self.lib.hf_win_abi() != ABI:
            raise cache.KernelUnavailable("the cached library has another entry-point version")
        fn = self.lib.hf_win_step
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                       _SYNC]
        self.fn = fn
        self.n_arrays = len(dtypes)

    def run(self, ptrs: List[int], numels: List[int], keys: List[int], scalars: List[float], device=None,
            sync=None) -> None:
        """Step ``len(numels)`` tensors: ``ptrs`` their arrays' addresses (tensor-major), ``keys`` their ids
        for stochastic rounding, ``scalars`` the host function's operands then the rounding streams.
        ``sync``: None, or a function that sums a float64 tensor in place over the processes holding the
        other shards of these tensors, called with each stage's per-tensor sums (see ``hf_win_step``)."""
        table = (ctypes.c_int64 * len(ptrs))(*ptrs)
        n = (ctypes.c_int64 * len(numels))(*numels)
        k = (ctypes.c_int64 * len(keys))(*keys)
        sc = (ctypes.c_double * max(len(scalars), 1))(*scalars)

        def on_sums(values, count):
            sync(torch.frombuffer((ctypes.c_double * count).from_address(ctypes.addressof(values.contents)),
                                  dtype=torch.float64))

        callback = _SYNC(on_sums) if sync is not None else _SYNC()
        rc = self.fn(len(numels), table, n, k, sc, torch.get_num_threads(), callback)
        if rc != 0:
            raise MemoryError("hf_win C kernel: could not allocate its scratch tables")
