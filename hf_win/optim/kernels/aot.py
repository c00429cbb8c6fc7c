"""Every Triton kernel hf-win generates, compiled for NVIDIA GPUs on a machine without one, with the facts
of its machine code::

    python -m hf_win.optim.kernels.aot --arch sm_80,sm_90 --out DIR

The kernels are the ones ``kernels.find`` builds for real optimizers (``cases``: every registry optimizer
and the extension example Lion-Win x acceleration mode x precision, amsgrad / nesterov, with and without
in-optimizer clipping; two steps, so first-step variants appear), collected without launching anything.
Each distinct kernel function is compiled once per architecture by ``triton.compile`` (TTIR, PTX, and a
cubin by the ``ptxas`` Triton ships; no GPU, no driver). Written: ``DIR/<arch>/<kernel>.ptx`` and
``DIR/report.md`` / ``DIR/report.json``: per kernel its registers, spills, shared memory, global load and
store widths, FMA count and the divisions and square roots it uses; per case its kernels and the bytes
each element moves (loads + stores times the dtype size, from the traced program) against the floor
(every array read once, every written array written once). Exit status 1 when anything fails to compile
or a case does not fuse.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import io
import json
import multiprocessing
import os
import platform
import re
import resource
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, List

if "triton" not in sys.modules:  # the cases are collected on CPU tensors (nothing is launched)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from . import collect  # noqa: E402
from .aot_report import THREAD_ELEMENTS, full_width, markdown, wide_bytes  # noqa: E402,F401 (the report's rules)
from .triton import BLOCK, NUM_WARPS, load  # noqa: E402

MODES = ("win", "win2", "none")
#: precision label -> (parameter dtype, extra group keys)
PRECISIONS = {
    "float32": (torch.float32, {}),
    "bf16 state": (torch.float32, {"state_dtype": "bfloat16"}),
    "bf16 params + SR": (torch.bfloat16, {"bf16_stochastic_round": True}),
    "float16": (torch.float16, {}),
    "float64": (torch.float64, {}),
}
#: the group flags that change a kernel's structure, per optimizer that has them
FLAGS = {"amsgrad": {"amsgrad": True}, "momentum": {"momentum": 0.9, "dampening": 0.1},
         "nesterov": {"nesterov": True, "momentum": 0.9}}
_SIGNATURE = {"PTRS": "*i64", "NUMEL": "*i64", "KEYS": "*i64", "SC": "*fp64", "BT": "*i64", "BS": "*i64",
              "IDX": "*i64", "PART": "*fp64", "RED": "*fp64", "FIRST": "*i64"}


def optimizers() -> Dict[str, type]:
    """The registry's optimizers with a kernel of their own (not the ``Win(base)`` wrappers) and, from a
    checkout, the extension example ``LionWin``."""
    from hf_win.registry import OPTIMIZERS

    out = {name: spec.cls for name, spec in OPTIMIZERS.items() if not spec.wraps_base}
    example = Path(__file__).resolve().parents[3] / "examples" / "extending" / "lion_win.py"
    if example.is_file():
        import importlib.util

        spec = importlib.util.spec_from_file_location("hf_win_example_lion_win", example)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out["lion_win (example)"] = module.LionWin
    return out


def win_around_adamw(groups, lr, acceleration_mode, fused, max_grad_norm=0.0):
    """``hf_win.Win(torch.optim.AdamW)``: the acceleration pass every ``Win(base)`` optimizer runs after its
    base's step (one kernel per mode and dtype, whatever the base; bfloat16/float16 parameters take it on
    foreach, in float32)."""
    from hf_win.optim.wrapper import Win

    return Win(torch.optim.AdamW(groups, lr=lr, weight_decay=0.0), acceleration_mode=acceleration_mode,
               weight_decay=0.01, fused=fused)


def cases() -> List[dict]:
    out = [dict(label=f"win_pass {mode} {precision}", cls=win_around_adamw, mode=mode, precision=precision, kwargs={})
           for mode in ("win", "win2") for precision in ("float32", "float64")]
    for name, cls in optimizers().items():
        defaults = cls([torch.nn.Parameter(torch.zeros(1))], lr=1e-3).defaults
        flag_sets = [("", {})] + [(f, kw) for f, kw in FLAGS.items() if f in defaults]
        for mode in MODES:
            for precision in PRECISIONS:
                for flag, kw in flag_sets:
                    for clip in (0.0, 1.0):
                        label = " ".join(x for x in (name, mode, precision, flag, "clip" if clip else "") if x)
                        out.append(dict(label=label, cls=cls, mode=mode, precision=precision,
                                        kwargs=dict(kw, max_grad_norm=clip)))
    return out


def kernels_of(case: dict) -> list:
    """The Triton kernels two steps of ``case`` use (found or built, never launched). Raises RuntimeError
    naming the path when the step does not fuse."""
    dtype, extra = PRECISIONS[case["precision"]]
    params = [torch.nn.Parameter(torch.randn(4, 3).to(dtype)), torch.nn.Parameter(torch.randn(5).to(dtype))]
    opt = case["cls"]([dict(extra, params=params)], lr=1e-3, acceleration_mode=case["mode"], fused=True,
                      **case["kwargs"])
    saved = os.environ.get("HF_WIN_FUSED_BACKEND")
    os.environ["HF_WIN_FUSED_BACKEND"] = "triton"
    try:
        with collect() as found:
            for _ in range(2):
                for p in params:
                    p.grad = torch.randn_like(p)
                opt.step()
    finally:
        os.environ.pop("HF_WIN_FUSED_BACKEND") if saved is None else os.environ.update(HF_WIN_FUSED_BACKEND=saved)
    if opt.step_path() not in ("triton kernel", f"AdamW step, then {case['mode']} on triton kernel") or not found:
        raise RuntimeError(f"{case['label']}: the step ran on {opt.step_path()}")
    return found


def bytes_per_element(kernel) -> tuple:
    """(bytes moved, floor) per element of a step: every stage's loads and stores times the dtype size;
    the floor reads each array once and writes each written array once."""
    size = [d.itemsize for d in kernel.dtypes]
    moved = sum(size[a] for _, _, st in kernel.stages for a, _ in st.loads + st.stores)
    read = {a for _, _, st in kernel.stages for a, _ in st.loads}
    written = {a for _, _, st in kernel.stages for a, _ in st.stores}
    return moved, sum(size[a] for a in read) + sum(size[a] for a in written)


def functions(kernel) -> List[tuple]:
    """(name, constexprs, arrays loaded, arrays stored) of every kernel function a call can launch."""
    out = []
    for i, (_, _, st) in enumerate(kernel.stages):
        io_ = ([a for a, _ in st.loads], [a for a, _ in st.stores])
        out += [(f"stage{i}", {"NRED": kernel.nred, "BLOCK": BLOCK}, *io_),
                (f"stage{i}_full", {"NRED": kernel.nred, "BLOCK": BLOCK}, *io_)]
        out += [("reduce_blocks", {"R": r, "NRED": kernel.nred, "CH": 256}, [], []) for r, _ in st.reductions]
    return out


_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")


def ptx_facts(ptx: str) -> dict:
    """Global access widths (bits -> count, loads and stores), FMAs, divisions and square roots."""
    widths = {"ld": Counter(), "st": Counter()}
    for op, suffix in _ACCESS.findall(ptx):
        parts = suffix.split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next(int(m.group(1)) for p in reversed(parts) if (m := re.fullmatch(r"[bfsu](\d+)", p)))
        widths[op][vec * bits] += 1
    return {
        "loads": dict(sorted(widths["ld"].items())), "stores": dict(sorted(widths["st"].items())),
        "fma": len(re.findall(r"\bfma\.", ptx)),
        "div_rn": len(re.findall(r"\bdiv\.rn\.", ptx)), "sqrt_rn": len(re.findall(r"\bsqrt\.rn\.", ptx)),
        "approx": len(re.findall(r"\b(?:div\.(?:approx|full)|sqrt\.approx|rcp\.approx|rsqrt\.approx)\.", ptx)),
    }


def ptxas_facts(log: str) -> dict:
    def num(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else None

    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads")}


def compile_function(source: str, name: str, constexprs: dict, cc: int) -> dict:
    """Compile one kernel function of generated ``source`` for ``sm_<cc>``: its PTX and facts."""
    fn = load(source, JITFunction)[name]
    signature = {a: "constexpr" if a in constexprs else _SIGNATURE[a] for a in fn.arg_names}
    log = io.StringIO()
    t0, cpu0, kids0 = time.perf_counter(), time.process_time(), _children_cpu()
    with contextlib.redirect_stdout(log), _env(TRITON_DUMP_PTXAS_LOG="1"):
        compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": NUM_WARPS, "enable_fp_fusion": False})
    ptx = compiled.asm["ptx"]
    cpu = time.process_time() - cpu0 + _children_cpu() - kids0  # the compiler here and ptxas
    return {"ptx": ptx, "seconds": time.perf_counter() - t0, "cpu_seconds": cpu, "shared": compiled.metadata.shared,
            "cubin_bytes": len(compiled.asm["cubin"]), **ptxas_facts(log.getvalue()), **ptx_facts(ptx)}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def _env(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.update({k: v})


def workers() -> int:
    """Compiler processes: the CPUs this process may use, at most 8."""
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except AttributeError:  # not Linux
        return max(1, min(8, os.cpu_count() or 1))


def run(archs: List[int], out: Path, progress=print) -> dict:
    """Collect every case's kernels, compile each distinct kernel function once per architecture, write
    the PTX and the report; returns the report (``failures`` lists what went wrong)."""
    report = {"triton": triton.__version__, "torch": torch.__version__, "archs": [f"sm_{a}" for a in archs],
              "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
              "cases": [], "kernels": {}, "failures": []}
    todo: Dict[str, tuple] = {}  # kernel id -> (source, name, constexprs, first case, loads, stores, dtypes)
    ids_of: Dict[str, str] = {}  # hash of (source, function, constexprs) -> kernel id
    t0 = time.perf_counter()
    for case in cases():
        try:
            found = kernels_of(case)
        except Exception as e:  # reported, the other cases go on
            report["failures"].append(f"{case['label']}: {type(e).__name__}: {e}")
            continue
        ids = []
        for kernel in found:
            plain = load(kernel.source)
            for name, constexprs, loads, stores in functions(kernel):
                # the function's own text (the helper it calls is the same in every source)
                text = inspect.getsource(plain[name].fn)
                key = hashlib.sha256(f"{text}\0{sorted(constexprs.items())}".encode()).hexdigest()
                kid = ids_of.get(key)
                if kid is None:
                    kid = ids_of[key] = f"{re.sub(r'[^a-z0-9]+', '_', case['label'])}__{name}" + (
                        f"_r{constexprs['R']}" if "R" in constexprs else "")
                    todo[kid] = (kernel.source, name, constexprs, case["label"], loads, stores,
                                 [str(d).replace("torch.", "") for d in kernel.dtypes])
                ids.append(kid)
        moved, floor = bytes_per_element(found[-1])  # the kernel of the later steps
        report["cases"].append({"case": case["label"], "kernels": ids, "bytes_per_element": moved, "floor": floor})
    progress(f"{len(report['cases'])} cases, {len(todo)} distinct kernel functions "
             f"({time.perf_counter() - t0:.1f} s to collect)")
    jobs = [(cc, kid, spec) for cc in archs for kid, spec in todo.items()]
    t1 = time.perf_counter()
    # Compiled in fresh processes, where Triton is imported without its interpreter: under
    # TRITON_INTERPRET=1 (how this process collects the cases) Triton's own library functions (tl.sum)
    # are interpreter objects that the compiler cannot inline.
    with tempfile.TemporaryDirectory(prefix="hf_win_aot_cache_") as cache, \
            _env(TRITON_CACHE_DIR=cache, TRITON_INTERPRET="0"), ProcessPoolExecutor(workers(), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(compile_function, spec[0], spec[1], spec[2], cc): (cc, kid, spec)
                   for cc, kid, spec in jobs}
        for future in as_completed(futures):
            cc, kid, (_, _, _, label, loads, stores, dtypes) = futures[future]
            try:
                facts = future.result()
            except Exception as e:  # a compiler error: reported, the rest goes on
                report["failures"].append(f"sm_{cc} {kid}: {type(e).__name__}: {str(e)[:2000]}")
                continue
            (out / f"sm_{cc}").mkdir(parents=True, exist_ok=True)
            (out / f"sm_{cc}" / f"{kid}.ptx").write_text(facts.pop("ptx"))
            share = {a: THREAD_ELEMENTS * torch.finfo(getattr(torch, dtypes[a])).bits // 8 for a in set(loads) | set(stores)}
            facts.update(array_bytes_per_thread={"ld": sum(share[a] for a in loads if share[a] >= 16),
                                                 "st": sum(share[a] for a in stores if share[a] >= 16)},
                         dtypes=dtypes, first_case=label)
            report["kernels"].setdefault(kid, {})[f"sm_{cc}"] = facts
    report["kernels"] = {k: dict(sorted(v.items())) for k, v in sorted(report["kernels"].items())}
    progress(f"{len(jobs)} compilations in {time.perf_counter() - t1:.1f} s ({workers()} processes)")
    report["seconds"] = time.perf_counter() - t0
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "report.md").write_text(markdown(report))
    return report


def parse_archs(text: str) -> List[int]:
    archs = []
    for part in text.split(","):
        m = re.fullmatch(r"sm_(\d+)", part.strip())
        if not m:
            raise SystemExit(f"--arch: comma-separated sm_<NN> targets (e.g. sm_80,sm_90), got {part!r}")
        archs.append(int(m.group(1)))
    return archs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hf_win.optim.kernels.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sm_80,sm_90", help="comma-separated targets, e.g. sm_80,sm_90 (sm_100 "
                    "where the installed Triton supports it)")
    ap.add_argument("--out", required=True, help="folder for the PTX files and report.md / report.json")
    args = ap.parse_args(argv)
    report = run(parse_archs(args.arch), Path(args.out))
    print(f"wrote {args.out}/report.md: {len(report['kernels'])} kernels, {len(report['failures'])} failures, "
          f"{report['seconds']:.0f} s")
    for f in report["failures"]:
        print("FAIL", f)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
