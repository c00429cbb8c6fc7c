"""The Python parts of ``benchmarks/gpu_check.sh``: what a lent GPU should show.

    python benchmarks/gpu_check.py correctness   # Triton kernel against foreach, every optimizer x mode,
                                                 # fp32 and bf16 (params and/or state), PASS/FAIL
    python benchmarks/gpu_check.py first-step    # first fused step with an empty Triton cache, then cached
                                                 # (two fresh processes sharing one new TRITON_CACHE_DIR)
    python benchmarks/gpu_check.py matrix        # every kernel of `python -m hf_win.optim.kernels.aot`
                                                 # (optimizer x mode x precision x flags x clipping) compiled
                                                 # and launched on the device, against foreach
    python benchmarks/gpu_check.py sync          # steps under torch.cuda.set_sync_debug_mode("error")

Both default to ``--device cuda``. ``--device cpu --tiny`` runs them on CPU tensors with tiny shapes
through Triton's interpreter (``TRITON_INTERPRET=1``, set here when missing): a check of this script
and of the Triton kernel's arithmetic only; interpreter times are not measurements and are labelled so.
Step times on the model shapes come from ``benchmarks/step_time.py`` (``--params vit_b`` / ``gpt_1_3b``),
which ``gpu_check.sh`` runs. Imports ``hf_win.optim`` and ``hf_win.registry`` only (no transformers).

Writes ``<out>/gpu_check_correctness_<device>.md``, ``<out>/first_step_<device>.md``,
``<out>/gpu_check_matrix_<device>.md`` and ``<out>/gpu_check_sync_<device>.md`` (with the machine and the
command); the correctness and matrix files are rewritten as cases finish, so a timeout keeps what was done.
Exit status 1 when a case fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without install
sys.path.insert(0, str(HERE))


def _prepare_env(args):
    if args.device == "cpu" and not os.environ.get("TRITON_INTERPRET"):
        os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is imported


# ---------------------------------------------------------------------------------------------- correctness
# (name, param dtype, group extras). state_dtype is the param-group key; default: the parameter's dtype.
CONFIGS = [
    ("fp32", "float32", {}),
    ("bf16 params (bf16 state)", "bfloat16", {}),
    ("bf16 params, fp32 state", "bfloat16", {"state_dtype": "float32"}),
    ("fp32 params, bf16 state", "float32", {"state_dtype": "bfloat16"}),
    ("bf16 params, stochastic rounding", "bfloat16", {"bf16_stochastic_round": True}),
]
MODES = ("win", "win2", "none")
STEPS = 5
# Per array dtype: |triton - foreach| <= atol * max|foreach| + rtol * |foreach|, elementwise. float32: both
# paths compute in float32 with correctly rounded / and sqrt and no FMA contraction, so what remains is
# the order of a few operations (the CPU kernel's tests use 2e-6). bfloat16: both round the same float32
# value the same way (nearest, or the same counter-based stochastic bits), so a difference needs a float32
# difference at a rounding boundary; allowed: two bfloat16 ulps (2^-7 relative).
TOLERANCES = {"float32": (1e-5, 1e-6), "bfloat16": (2.0 ** -6, 1e-6)}


def correctness_shapes(tiny: bool):
    if tiny:
        return [(3, 5), (1030,), (17, 33), (1,)]
    # A ViT-B block's shapes, an embedding slice, a tensor past 2^20 that is not a multiple of the block.
    return [(2304, 768), (2304,), (768, 768), (3072, 768), (768, 3072), (768,), (1,), (8192, 512), (2**20 + 3,)]


def compare(ours, ref, dtype):
    """(max abs error, max abs error / max |ref|, elements differing, within tolerance)."""
    import torch

    a, b = ours.detach().double(), ref.detach().double()
    diff = (a - b).abs()
    scale = b.abs().max().item() or 1.0
    rtol, atol = TOLERANCES[str(dtype).replace("torch.", "")]
    ok = bool(torch.all(diff <= atol * scale + rtol * b.abs()).item()) and bool(torch.isfinite(a).all().item())
    return diff.max().item(), diff.max().item() / scale, int((diff > 0).sum().item()), ok


def step_both(kernel, make_params, build, grads, device, dtype):
    """The same steps (one per entry of ``grads``) from the same parameters, with ``kernel``
    (``fused=True`` under ``HF_WIN_FUSED_BACKEND=kernel``) and with foreach: per path (parameters,
    optimizer, its step path, kernel calls)."""
    import torch

    from hf_win.optim import kernels
    from step_time import backend

    result = {}
    for path in (kernel, "foreach"):
        params = make_params()
        opt = build(params, {"fused": True} if path == kernel else {"foreach": True, "fused": False})
        calls0 = kernels.counters()["calls"]
        with backend(kernel if path == kernel else None):
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = g.to(device=device, dtype=dtype)
                opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        result[path] = (params, opt, opt.step_path(), kernels.counters()["calls"] - calls0)
    return result[kernel], result["foreach"]


def run_case(name, mode, config, device, shapes, seed=0, kernel="triton"):
    import torch

    from hf_win.registry import OPTIMIZERS

    label, pdtype, extra = config
    pdtype = getattr(torch, pdtype)
    spec = OPTIMIZERS[name]
    kw = dict(lr=1e-2, acceleration_mode=mode)
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) * 0.5 for s in shapes]
    grads = [[torch.randn(s, generator=gen) * 0.1 for s in shapes] for _ in range(STEPS)]
    (tp, topt, tpath, tcalls), (fp, fopt, _, _) = step_both(
        kernel, lambda: [torch.nn.Parameter(t.to(device=device, dtype=pdtype, copy=True)) for t in init],
        lambda params, flags: spec.cls([dict(extra, params=params)], **kw, **flags),  # state_dtype: a group key
        grads, device, pdtype)
    worst = {"array": "", "abs": 0.0, "rel": 0.0, "differing": 0, "ok": True}
    for i, (a, b) in enumerate(zip(tp, fp)):
        pairs = [("param", a, b)] + [(k, topt.state[a][k], fopt.state[b][k]) for k in fopt.state[b]
                                     if torch.is_tensor(fopt.state[b][k]) and fopt.state[b][k].numel() > 1]
        for key, x, y in pairs:
            abs_err, rel, differing, ok = compare(x, y, y.dtype)
            worst["differing"] += differing
            worst["ok"] &= ok
            if rel >= worst["rel"]:
                worst.update(array=f"{key} ({str(y.dtype).replace('torch.', '')})", abs=abs_err, rel=rel)
    ran_triton = tpath == f"{kernel} kernel" and tcalls >= STEPS  # every tensor, every step, no fallback
    status = "PASS" if worst["ok"] and ran_triton else "FAIL"
    why = "" if ran_triton else f"the fused optimizer did not run on {kernel}: {tpath} ({tcalls} kernel calls)"
    if not worst["ok"]:
        why = (why + "; " if why else "") + "outside the tolerance"
    return {"optimizer": name, "mode": mode, "config": label, "path": tpath, "kernel_calls": tcalls,
            "worst_array": worst["array"], "max_abs_err": worst["abs"], "max_rel_err": worst["rel"],
            "elements_differing": worst["differing"], "status": status, "why": why}


def cases(tiny: bool):
    from hf_win.registry import available_optimizers

    out = []
    for name in available_optimizers():
        for mode in MODES:
            out.append((name, mode, CONFIGS[0]))
        for config in CONFIGS[1:4]:  # low precision: the Win modes (none is the base optimizer's arithmetic)
            for mode in ("win", "win2"):
                out.append((name, mode, config))
        if name == "adamw_win":
            out.append((name, "win", CONFIGS[4]))
    return out


def header(title, device, argv, extra=()):
    import torch

    from step_time import machine

    info = machine(torch.device(device))
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "(unset)")
    md = [f"# {title}", "", "Command: `python benchmarks/gpu_check.py " + " ".join(argv) + "`", "",
          "| machine | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in info.items()]
    md += list(extra)
    return md


def correctness(args, argv):
    import torch

    device = torch.device(args.device)
    shapes = correctness_shapes(args.tiny)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / (f"gpu_check_correctness_{device.type}{'_tiny' if args.tiny else ''}"
                    f"{'' if args.backend == 'triton' else '_' + args.backend}.md")
    todo = cases(args.tiny)
    if args.optimizers:
        todo = [c for c in todo if c[0] in args.optimizers]
    if args.modes:
        todo = [c for c in todo if c[1] in args.modes]
    n = sum(torch.Size(s).numel() for s in shapes)
    head = header("Triton kernel against foreach: correctness", args.device, argv, [
        "", f"Shapes: {shapes} ({n / 1e6:.2f}M elements). {STEPS} steps from the same initial parameters with "
        "the same gradients (a new draw each step), lr=1e-2, the optimizers' other defaults (LAMB clips at "
        "max_grad_norm=1.0). `triton`: `fused=True` under `HF_WIN_FUSED_BACKEND=triton`; reference: "
        "`foreach=True, fused=False`. Compared: the parameters and every state buffer, elementwise: "
        "|triton - foreach| <= atol * max|foreach| + rtol * |foreach| with (rtol, atol) = "
        f"{TOLERANCES['float32']} for float32 arrays, {TOLERANCES['bfloat16']} for bfloat16 arrays. Reported: "
        "the array with the largest error relative to its largest magnitude, the count of elements that "
        "differ at all (all arrays), and PASS only if every array is within its tolerance *and* the step "
        "path says the Triton kernel ran (kernel calls counted).", "",
        "| optimizer | mode | dtypes | path | kernel calls | worst array | max abs err | max err / max abs | "
        "elements differing | result |", "|---|---|---|---|---:|---|---:|---:|---:|---|"])
    rows, t0 = [], time.perf_counter()
    for name, mode, config in todo:
        c0 = time.perf_counter()
        try:
            r = run_case(name, mode, config, device, shapes, kernel=args.backend)
        except Exception as e:  # a crash is a FAIL with its reason, the other cases still run
            r = {"optimizer": name, "mode": mode, "config": config[0], "path": "-", "kernel_calls": 0,
                 "worst_array": "-", "max_abs_err": float("nan"), "max_rel_err": float("nan"),
                 "elements_differing": 0, "status": "FAIL", "why": f"{type(e).__name__}: {e}"}
        rows.append(r)
        print(f"{r['status']} {name}/{mode} [{r['config']}] {r['path']}: max abs {r['max_abs_err']:.3g}, "
              f"rel {r['max_rel_err']:.3g} ({r['worst_array']}), {r['elements_differing']} differing"
              f"{' -- ' + r['why'] if r['why'] else ''} ({time.perf_counter() - c0:.1f} s)", flush=True)
        body = [f"| {x['optimizer']} | {x['mode']} | {x['config']} | {x['path']} | {x['kernel_calls']} | "
                f"{x['worst_array']} | {x['max_abs_err']:.3g} | {x['max_rel_err']:.3g} | {x['elements_differing']} | "
                f"**{x['status']}**{' (' + x['why'] + ')' if x['why'] else ''} |" for x in rows]
        failed = sum(x["status"] != "PASS" for x in rows)
        tail = ["", f"{len(rows)} of {len(todo)} cases run in {time.perf_counter() - t0:.0f} s: "
                f"{len(rows) - failed} PASS, {failed} FAIL."]
        if args.device == "cpu":
            tail.append("CPU tensors through Triton's interpreter: a check of the kernel's arithmetic and of this "
                        "script, not of a GPU.")
        target.write_text("\n".join(head + body + tail) + "\n")
    print(f"{len(rows) - failed} PASS, {failed} FAIL; wrote {target}", flush=True)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------- first step
FIRST_STEP_CASES = [("adamw_win", "win"), ("adamw_win", "win2"), ("lamb_win", "win"), ("sgd_win", "win")]


def first_step_child(args):
    """In a fresh process: for each case, the wall time of the first and second ``step()`` (fused=True) on
    the parameter set's shapes; one JSON line per case on stdout."""
    import torch

    from hf_win.optim import kernels
    from hf_win.registry import OPTIMIZERS
    from step_time import PARAM_SETS, wall

    device = torch.device(args.device)
    shapes = PARAM_SETS["tiny" if args.tiny else args.params]()
    torch.manual_seed(0)
    grads = [torch.randn(s, device=device) * 1e-2 for s in shapes]
    if device.type == "cuda":
        torch.cuda.synchronize()  # the CUDA context exists before anything is timed
    todo = [(n, m) for n, m in FIRST_STEP_CASES
            if (not args.optimizers or n in args.optimizers) and (not args.modes or m in args.modes)]
    for name, mode in todo:
        params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g
        kw = {"lr": 1e-3, "acceleration_mode": mode, "fused": True}
        opt = OPTIMIZERS[name].cls(params, **kw)
        k0 = kernels.counters()
        first = wall(opt.step, device)
        k1 = kernels.counters()
        second = wall(opt.step, device)
        print(json.dumps({"optimizer": name, "mode": mode, "first_s": first, "second_s": second,
                          "kernels": k1["kernels"] - k0["kernels"], "path": opt.step_path()}), flush=True)
        del opt, params


def first_step(args, argv):
    import torch

    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = tempfile.mkdtemp(prefix="hf_win_triton_cache_")  # private (0700), empty
    env = dict(os.environ, TRITON_CACHE_DIR=cache, HF_WIN_FUSED_BACKEND="triton")
    child = [sys.executable, str(Path(__file__).resolve()), "first-step-child", "--device", args.device,
             "--params", args.params] + (["--tiny"] if args.tiny else [])
    for flag, values in (("--optimizers", args.optimizers), ("--modes", args.modes)):
        if values:
            child += [flag, *values]
    results = {}
    for run in ("cold", "cached"):
        t0 = time.perf_counter()
        proc = subprocess.run(child, env=env, capture_output=True, text=True, timeout=args.child_timeout)
        wall_s = time.perf_counter() - t0
        sys.stderr.write(proc.stderr[-4000:])
        if proc.returncode:
            print(f"first-step child ({run}) exited with {proc.returncode}", flush=True)
        results[run] = ([json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")], wall_s)
        for r in results[run][0]:
            print(f"{run:<6} {r['optimizer']}/{r['mode']}: first step {r['first_s']:.3f} s, second "
                  f"{r['second_s'] * 1e3:.2f} ms, {r['kernels']} kernel(s), {r['path']}", flush=True)
    n_files = sum(len(f) for _, _, f in os.walk(cache))
    shapes = "tiny" if args.tiny else args.params
    label = "(interpreter: not a measurement)" if device.type == "cpu" else ""
    md = header(f"First fused step, empty Triton cache then cached: `{shapes}` {label}", args.device, argv, [
        "", "Two fresh processes in turn (`gpu_check.py first-step-child`), sharing one new, empty "
        f"`TRITON_CACHE_DIR` (a private temporary folder; {n_files} files in it afterwards), "
        "`HF_WIN_FUSED_BACKEND=triton`. In each, after the CUDA context and the gradients exist, a new "
        "optimizer (`fused=True`) per case: first step = wall clock of the first `step()` (state creation, "
        "the trace, Triton's compile or its load from the cache, the launch, synchronised); second step "
        "for comparison. The cases run in order in one process, so a later case finds Triton imported.", "",
        "| optimizer | mode | first step, cold cache (s) | first step, cached (s) | second step (ms) | kernels | path |",
        "|---|---|---:|---:|---:|---:|---|"])
    cached = {(r["optimizer"], r["mode"]): r for r in results["cached"][0]}
    for r in results["cold"][0]:
        c = cached.get((r["optimizer"], r["mode"]), {})
        md.append(f"| {r['optimizer']} | {r['mode']} | {r['first_s']:.3f} | "
                  f"{c.get('first_s', float('nan')):.3f} | {r['second_s'] * 1e3:.2f} | {r['kernels']} | {r['path']} |")
    md += ["", f"Process wall time (import, context, shapes, all cases): cold {results['cold'][1]:.1f} s, "
           f"cached {results['cached'][1]:.1f} s."]
    target = out / f"first_step_{device.type}{'_tiny' if args.tiny else ''}.md"
    target.write_text("\n".join(md) + "\n")
    print(f"wrote {target}", flush=True)
    ok = len(results["cold"][0]) == len(results["cached"][0]) > 0
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------- matrix
MATRIX_STEPS = 3


def matrix_case(case, device, seed=0):
    """One case of ``aot.cases()``: ``MATRIX_STEPS`` steps with the Triton kernel and with foreach from the
    same parameters and gradients; the worst array's error against the tolerance of its dtype."""
    import torch

    from hf_win.optim.kernels.aot import PRECISIONS

    dtype, extra = PRECISIONS[case["precision"]]
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(2 * 1024 + 7, generator=gen), torch.randn(5, generator=gen), torch.randn(1024 + 4, generator=gen)]
    grads = [[torch.randn(t.numel() - (1 if i == 2 else 0), generator=gen) * 0.1 for i, t in enumerate(init)]
             for _ in range(MATRIX_STEPS)]

    def make_params():
        params = [torch.nn.Parameter(t.to(device=device, dtype=dtype, copy=True)) for t in init[:2]]
        return params + [torch.nn.Parameter(init[2].to(device=device, dtype=dtype, copy=True)[1:])]  # misaligned

    (tp, topt, tpath, tcalls), (fp, fopt, _, _) = step_both(
        "triton", make_params, lambda params, flags: case["cls"](
            [dict(extra, params=params)], lr=1e-2, acceleration_mode=case["mode"], **case["kwargs"], **flags),
        grads, device, dtype)
    ok, worst = True, (0.0, "")
    for a, b in zip(tp, fp):
        pairs = [("param", a, b)] + [(k, topt.state[a][k], fopt.state[b][k]) for k in fopt.state[b]
                                     if torch.is_tensor(fopt.state[b][k]) and fopt.state[b][k].numel() > 1]
        for key, x, y in pairs:
            tol_dtype = torch.float32 if y.dtype in (torch.float32, torch.float64) else torch.bfloat16
            _, rel, _, good = compare(x, y, tol_dtype)
            ok &= good
            if rel >= worst[0]:
                worst = (rel, f"{key} ({str(y.dtype).replace('torch.', '')})")
    ran = tpath == "triton kernel" and tcalls >= MATRIX_STEPS
    why = "" if ran else f"did not run on the Triton kernel: {tpath}"
    if not ok:
        why = (why + "; " if why else "") + "outside the tolerance"
    return {"case": case["label"], "path": tpath, "calls": tcalls, "worst": worst[1], "rel": worst[0],
            "status": "PASS" if ok and ran else "FAIL", "why": why}


def matrix_child(args):
    """Cases ``args.worker::args.workers`` of ``aot.cases()``, one JSON line each."""
    import torch

    from hf_win.optim.kernels.aot import cases

    device = torch.device(args.device)
    todo = cases()[args.worker::args.workers]
    if args.tiny:
        todo = todo[:: max(1, len(todo) // 6)]
    for case in todo:
        t0 = time.perf_counter()
        try:
            r = matrix_case(case, device)
        except Exception as e:
            r = {"case": case["label"], "path": "-", "calls": 0, "worst": "-", "rel": float("nan"),
                 "status": "FAIL", "why": f"{type(e).__name__}: {str(e)[:300]}"}
        r["seconds"] = time.perf_counter() - t0
        print(json.dumps(r), flush=True)


def matrix(args, argv):
    """Every case of ``aot.cases()`` over ``args.workers`` processes (each compiles its own kernels: the
    compiler runs on the host's cores in parallel), rewritten to the report as results arrive."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"gpu_check_matrix_{args.device}{'_tiny' if args.tiny else ''}.md"
    child = [sys.executable, str(Path(__file__).resolve()), "matrix-child", "--device", args.device,
             "--workers", str(args.workers)] + (["--tiny"] if args.tiny else [])
    procs = [subprocess.Popen(child + ["--worker", str(w)], stdout=subprocess.PIPE, text=True)
             for w in range(args.workers)]
    head = header("Every generated kernel compiled and launched, against foreach", args.device, argv, [
        "", f"Cases of `hf_win.optim.kernels.aot.cases()` (optimizer x mode x precision x flags x clipping), "
        f"{args.workers} processes. Per case {MATRIX_STEPS} steps over a float32-aligned tensor of 2 whole "
        "blocks and a tail, a 5-element tensor and a view 4 bytes past an aligned address (the masked "
        "kernel), `fused=True` under `HF_WIN_FUSED_BACKEND=triton` against `foreach=True, fused=False`; "
        f"tolerances as in the correctness part ({TOLERANCES}; float64 arrays use float32's, float16 "
        "bfloat16's). PASS "
        "only if within tolerance and the step path says the Triton kernel ran.", "",
        "| case | path | kernel calls | worst array | max err / max abs | s | result |",
        "|---|---|---:|---|---:|---:|---|"])
    rows = []
    import selectors

    sel = selectors.DefaultSelector()
    for p in procs:
        sel.register(p.stdout, selectors.EVENT_READ)
    open_ = len(procs)
    while open_:
        for key, _ in sel.select():
            line = key.fileobj.readline()
            if not line:
                sel.unregister(key.fileobj)
                open_ -= 1
                continue
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            rows.append(r)
            print(f"{r['status']} {r['case']}: {r['path']} rel {r['rel']:.3g} ({r['seconds']:.1f} s)"
                  f"{' -- ' + r['why'] if r['why'] else ''}", flush=True)
            failed = sum(x["status"] != "PASS" for x in rows)
            body = [f"| {x['case']} | {x['path']} | {x['calls']} | {x['worst']} | {x['rel']:.3g} | {x['seconds']:.1f} | "
                    f"**{x['status']}**{' (' + x['why'] + ')' if x['why'] else ''} |" for x in rows]
            target.write_text("\n".join(head + body + ["", f"{len(rows)} cases done: {len(rows) - failed} PASS, "
                                                        f"{failed} FAIL."]) + "\n")
    for p in procs:
        p.wait()
    failed = sum(x["status"] != "PASS" for x in rows)
    print(f"{len(rows) - failed} PASS, {failed} FAIL; wrote {target}", flush=True)
    return 1 if failed or not rows else 0


# ---------------------------------------------------------------------------------------------- sync
def sync(args, argv):
    """Steps under ``torch.cuda.set_sync_debug_mode("error")``: any host-device synchronisation in a step
    (a blocking copy, ``.item()``, a stream synchronisation) raises. Two steps first (state creation, the
    kernels' compilation), then three checked steps, with clipping on (its coefficient stays on the device)."""
    import torch

    from hf_win.registry import OPTIMIZERS

    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in (args.optimizers or list(OPTIMIZERS)):
        for mode in ("win", "win2", "none"):
            for dtype, extra in ((torch.float32, {}), (torch.bfloat16, {"bf16_stochastic_round": True})):
                torch.manual_seed(0)
                params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype)) for s in ((3000,), (77, 5))]
                opt = OPTIMIZERS[name].cls([dict(extra, params=params)], lr=1e-3, acceleration_mode=mode,
                                           max_grad_norm=1.0, fused=True)
                status, why = "PASS", ""
                try:
                    for k in range(5):
                        for p in params:
                            p.grad = torch.randn_like(p)
                        if k >= 2 and device.type == "cuda":
                            torch.cuda.set_sync_debug_mode("error")
                        try:
                            opt.step()
                        finally:
                            if device.type == "cuda":
                                torch.cuda.set_sync_debug_mode("default")
                except Exception as e:
                    status, why = "FAIL", f"{type(e).__name__}: {str(e)[:300]}"
                if device.type == "cuda":
                    torch.cuda.synchronize()
                path = opt.step_path()
                if status == "PASS" and "kernel" not in path.split(" / ")[0]:
                    status, why = "FAIL", f"not on a kernel: {path}"
                label = f"{name} {mode} {str(dtype).replace('torch.', '')}{' SR' if extra else ''}, clip 1.0"
                rows.append((label, path, status, why))
                print(f"{status} {label}: {path}{' -- ' + why if why else ''}", flush=True)
    failed = sum(r[2] != "PASS" for r in rows)
    md = header("Steps under torch.cuda.set_sync_debug_mode('error')", args.device, argv, [
        "", "Per case: two steps (state, compilation), then three steps with the sync debug mode set to "
        "`error`: any synchronising CUDA call that torch checks (blocking copies, `.item()`, stream or device "
        "synchronisation) raises and the case FAILs. Tensors of 3000 and 77x5 elements, `max_grad_norm=1.0`.", "",
        "| case | path | result |", "|---|---|---|"]) + [
        f"| {r[0]} | {r[1]} | **{r[2]}**{' (' + r[3] + ')' if r[3] else ''} |" for r in rows] + [
        "", f"{len(rows) - failed} PASS, {failed} FAIL." + (" (CPU: the debug mode does not exist there; only the "
                                                          "steps ran.)" if device.type != "cuda" else "")]
    target = out / f"gpu_check_sync_{device.type}.md"
    target.write_text("\n".join(md) + "\n")
    print(f"wrote {target}", flush=True)
    return 1 if failed else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=["correctness", "first-step", "first-step-child", "matrix", "matrix-child", "sync"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (with --device cpu: the interpreter check)")
    ap.add_argument("--params", default="vit_b", help="first-step: a parameter set of step_time.py")
    ap.add_argument("--optimizers", nargs="*", default=None, help="correctness: only these")
    ap.add_argument("--modes", nargs="*", default=None, help="correctness: only these")
    ap.add_argument("--backend", default="triton", choices=["triton", "c"],
                    help="correctness: the kernel checked (c: the CPU kernel, to check this script on CPU)")
    ap.add_argument("--child_timeout", type=int, default=150, help="first-step: seconds per process")
    ap.add_argument("--workers", type=int, default=8, help="matrix: processes")
    ap.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    argv = list(argv) if argv is not None else sys.argv[1:]
    _prepare_env(args)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: nothing to check (use --device cpu --tiny for the interpreter check)")
            return 2
    if args.part == "correctness":
        return correctness(args, argv)
    if args.part == "first-step":
        return first_step(args, argv)
    if args.part == "matrix":
        return matrix(args, argv)
    if args.part == "matrix-child":
        matrix_child(args)
        return 0
    if args.part == "sync":
        return sync(args, argv)
    first_step_child(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
