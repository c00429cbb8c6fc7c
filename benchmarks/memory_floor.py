"""The memory of an optimizer step on this machine, against torch.optim.AdamW: its traffic floor and its bytes.

An AdamW step reads 4 arrays and writes 3 (7 per element); AdamW-Win touches 9, Win2 11. This times
loops that do nothing but stream 7, 9 and 11 float32 arrays (a few multiply-adds per element, one
fused loop each, compiled by ``torch.compile``) over one tensor of ``--numel`` elements, interleaved with
``torch.optim.AdamW(fused=True)`` on a parameter of the same size, and reports each as a ratio to it:
what a Win / Win2 step that only moves its data would cost. Compare with ``step_time.py``.

    python benchmarks/memory_floor.py --threads 1     # writes benchmarks/results/memory_floor_cpu.{csv,md}

``--report state`` (``both``: after the traffic floor) measures bytes instead of time, for every registry
optimizer x mode x path (per-tensor, foreach, the default kernel) x precision (fp32 state, bf16 state,
bf16 parameters with bf16 state and stochastic rounding; the registry's ``Win(base)`` optimizers: fp32,
their one path), for torch.optim.AdamW (for-loop, foreach, fused) and for ``hf_win.Win`` around
``torch.optim.AdamW(fused=True)``, over a model of ``--state-numel`` float32 elements in a few tensors:

- *state bytes per parameter*: exact, summed over the optimizer's state tensors after the first step;
- *transient peak per parameter*: the largest amount of memory allocated *during* a later step beyond what
  existed before it (temporaries: upcast copies, foreach intermediates), from the CPU allocator's events
  recorded by ``torch.profiler`` (``profile_memory=True``). It sees every allocation made through torch's
  CPU allocator; memory a C kernel takes with its own ``malloc`` would be invisible (ours takes none);
- *step peak per parameter*: parameters + gradients + state + transient peak.

    python benchmarks/memory_floor.py --report state  # writes benchmarks/results/memory_state_cpu.{csv,md}
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_time import machine  # noqa: E402  (the machine table of every benchmark)


def stream7(p, g, m, v):  # AdamW's traffic: read p, g, m, v; write p, m, v
    m.mul_(0.9).add_(g, alpha=0.1)
    v.mul_(0.99).add_(g, alpha=0.01)
    p.add_(m + v, alpha=-0.1)


def stream9(p, g, m, v, x):  # + x (Win)
    m.mul_(0.9).add_(g, alpha=0.1)
    v.mul_(0.99).add_(g, alpha=0.01)
    x.add_(m + v, alpha=-0.1)
    p.mul_(0.5).add_(x, alpha=0.5)


def stream11(p, g, m, v, x, y):  # + x, y (Win2)
    m.mul_(0.9).add_(g, alpha=0.1)
    v.mul_(0.99).add_(g, alpha=0.01)
    x.add_(m + v, alpha=-0.1)
    y.mul_(0.5).add_(x, alpha=0.5)
    p.mul_(0.5).add_(y, alpha=0.5).add_(x, alpha=0.1)


def _transient_peak(step) -> int:
    """Peak bytes allocated through torch's CPU allocator during ``step()`` beyond what existed before."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


STATE_PRECISIONS = {  # name -> (parameter dtype, optimizer keywords)
    "fp32 state": (torch.float32, {}),
    "bf16 state": (torch.float32, {"state_dtype": "bfloat16"}),
    "bf16 params + bf16 state, SR": (torch.bfloat16, {"state_dtype": "bfloat16", "bf16_stochastic_round": True}),
}


def state_memory(numel: int, steps: int = 3, names=None):
    """One row per optimizer configuration: state bytes, transient peak and step peak per parameter
    (``names``: only the configurations of these optimizer names)."""
    import hf_win

    shapes = [(numel // 4,), (numel // 8, 2), (numel // 4 // 64, 64), (numel - numel // 4 * 2 - numel // 4 // 64 * 64
                                                                        - numel // 8 * 2,)]
    shapes = [s for s in shapes if s[0] > 0]
    n = sum(torch.Size(s).numel() for s in shapes)
    configs = []
    for dtype_name, (pdtype, kw) in STATE_PRECISIONS.items():
        for name, spec in hf_win.registry.OPTIMIZERS.items():
            if issubclass(spec.cls, hf_win.Win):
                if pdtype == torch.float32 and not kw:  # Win(base): the base's state, x/y in the parameter's dtype
                    for mode in ("none", "win", "win2"):
                        configs.append((name, mode, "default", dtype_name, pdtype,
                                        lambda ps, cls=spec.cls, mode=mode: cls(ps, acceleration_mode=mode)))
                continue
            for mode in ("none", "win", "win2"):
                for path, pkw in (("per-tensor", dict(foreach=False)), ("foreach", dict(foreach=True)), ("default", {})):
                    lr = dict(lr=1e-2) if name == "sgd_win" else {}
                    configs.append((name, mode, path, dtype_name, pdtype,
                                    lambda ps, spec=spec, mode=mode, pkw=pkw, lr=lr, kw=kw:
                                    spec.cls(ps, acceleration_mode=mode, **lr, **pkw, **kw)))
        if pdtype == torch.float32 and not kw:
            for path, pkw in (("for-loop", dict(foreach=False)), ("foreach", dict(foreach=True)), ("fused", dict(fused=True))):
                configs.append(("torch.optim.AdamW", "-", path, dtype_name, pdtype,
                                lambda ps, pkw=pkw: torch.optim.AdamW(ps, **pkw)))
            for mode in ("win", "win2"):  # the wrapper around torch's fused AdamW: + x (y), + one transient copy
                configs.append(("Win(torch.optim.AdamW)", mode, "fused", dtype_name, pdtype,
                                lambda ps, mode=mode: hf_win.Win(torch.optim.AdamW(ps, weight_decay=0.0, fused=True),
                                                                 acceleration_mode=mode, weight_decay=1e-2)))
    rows = []
    for name, mode, path, dtype_name, pdtype, build in configs:
        if names is not None and name not in names:
            continue
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s).to(pdtype)) for s in shapes]
        for q in params:
            q.grad = torch.randn(q.shape).to(pdtype)
        opt = build(params)
        for _ in range(steps - 1):
            opt.step()
        state = sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items()
                    if torch.is_tensor(v) and v.dim() > 0)
        peak = _transient_peak(opt.step)
        taken = opt.step_path() if hasattr(opt, "step_path") else path
        pbytes = pdtype.itemsize
        rows.append({
            "optimizer": name, "mode": mode, "path": path, "path_taken": taken, "precision": dtype_name,
            "param_bytes": pbytes, "grad_bytes": pbytes,
            "state_bytes_per_param": round(state / n, 3),
            "transient_peak_per_param": round(peak / n, 3),
            "step_peak_per_param": round(2 * pbytes + (state + peak) / n, 3),
        })
        print(f"{name:18s} {mode:4s} {path:10s} {dtype_name:30s} state {state / n:6.2f} B/param  "
              f"transient {peak / n:6.2f}  step peak {rows[-1]['step_peak_per_param']:6.2f}  ({taken})", flush=True)
    return rows, n, shapes


def _csv_and_header(out: Path, stem: str, rows, title: str, argv) -> list:
    """Write ``<stem>.csv``; return the markdown report's first lines (title, command, machine)."""
    info = machine(torch.device("cpu"))
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return [f"# {title}", "",
            "Command: `python benchmarks/memory_floor.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`",
            "", "| machine | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in info.items()]


def write_state_report(rows, n, shapes, out: Path, argv) -> None:
    md = _csv_and_header(out, "memory_state_cpu", rows, "Optimizer state and step memory per parameter", argv)
    md += ["", f"{n} parameters in {len(shapes)} tensors {shapes}. Bytes per parameter element. *state*: exact, "
           "from the state tensors after the first step. *transient*: the peak of memory allocated through "
           "torch's CPU allocator during one later step beyond what existed before it (`torch.profiler` "
           "memory events). *step peak*: parameters + gradients + state + transient. `default` is "
           "`fused=None, foreach=None` (the C kernel on CPU where it builds; `path taken` says what ran).", ""]
    ref = next((r for r in rows if r["optimizer"] == "torch.optim.AdamW" and r["path"] == "fused"), None)
    if ref is not None:
        md += [f"torch.optim.AdamW(fused=True): state {ref['state_bytes_per_param']:g} B/param, step peak "
               f"{ref['step_peak_per_param']:g} B/param.", ""]
    md += ["| optimizer | mode | path | precision | state | transient | step peak | path taken |",
           "|---|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        md.append(f"| {r['optimizer']} | {r['mode']} | {r['path']} | {r['precision']} | "
                  f"{r['state_bytes_per_param']:g} | {r['transient_peak_per_param']:g} | "
                  f"{r['step_peak_per_param']:g} | {r['path_taken']} |")
    (out / "memory_state_cpu.md").write_text("\n".join(md) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=int, default=22_050_000, help="elements (default: ViT-S's parameter count)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--report", choices=("traffic", "state", "both"), default="traffic",
                    help="traffic: the time floor (default); state: bytes per parameter; both")
    ap.add_argument("--state-numel", type=int, default=1_000_000, help="parameters of the --report state model")
    ap.add_argument("--state-optimizers", nargs="+", default=None,
                    help="--report state: only these optimizers (registry names, torch.optim.AdamW, Win(torch.optim.AdamW))")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.report in ("state", "both"):
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        rows, n, shapes = state_memory(args.state_numel, names=args.state_optimizers)
        write_state_report(rows, n, shapes, out, argv)
        if args.report == "state":
            return rows
    torch.manual_seed(0)
    arrays = [torch.rand(args.numel) + 0.1 for _ in range(6)]
    param = torch.nn.Parameter(arrays[0].clone())
    param.grad = arrays[1].clone()
    adamw = torch.optim.AdamW([param], lr=1e-3, fused=True)
    fns = {
        "torch.optim.AdamW(fused=True)": adamw.step,
        "stream 7 arrays (AdamW's traffic)": lambda f=torch.compile(stream7, dynamic=False): f(*arrays[:4]),
        "stream 9 arrays (AdamW-Win's)": lambda f=torch.compile(stream9, dynamic=False): f(*arrays[:5]),
        "stream 11 arrays (AdamW-Win2's)": lambda f=torch.compile(stream11, dynamic=False): f(*arrays[:6]),
    }
    for fn in fns.values():  # compile and warm up
        fn()
        fn()
    times = {k: [] for k in fns}
    keys = list(fns)
    for r in range(args.repeats):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times[keys[0]])
    rows = [{"loop": k, "median_ms": round(statistics.median(v) * 1e3, 3),
             "ratio_to_torch_fused_adamw": round(statistics.median(v) / base, 3),
             "arrays_per_element": {0: 7, 1: 7, 2: 9, 3: 11}[i]} for i, (k, v) in enumerate(times.items())]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = _csv_and_header(out, "memory_floor_cpu", rows, "Memory-traffic floor of an optimizer step", argv)
    md += ["", f"{args.numel} float32 elements; median of {args.repeats} interleaved rounds.", "",
           "| loop | arrays per element | ms | x fused AdamW |", "|---|---:|---:|---:|"]
    md += [f"| {r['loop']} | {r['arrays_per_element']} | {r['median_ms']:.2f} | {r['ratio_to_torch_fused_adamw']:.3f} |"
           for r in rows]
    (out / "memory_floor_cpu.md").write_text("\n".join(md) + "\n")
    for r in rows:
        print(f"{r['loop']:<36} {r['median_ms']:8.2f} ms  x{r['ratio_to_torch_fused_adamw']}")
    return rows


if __name__ == "__main__":
    main()
