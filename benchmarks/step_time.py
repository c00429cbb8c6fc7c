"""Time one optimizer step, for every registry optimizer x acceleration mode x path, against torch.optim.AdamW.

Paths: ``fused`` (``fused=True``: on CPU the generated C kernel of ``hf_win/optim/_ckernel.py``, which is
also what the default ``fused=None`` runs on CPU), ``compiled`` (``fused=True`` with that kernel off, i.e.
the ``torch.compile`` graph used on other devices), ``foreach``, ``per_tensor``.

For a named parameter set (the parameter shapes of a model, with random gradients), each group of
contenders (our optimizer on each path, ``torch.optim.AdamW(fused=True)`` and ``AdamW(foreach=True)``)
is built together and stepped in interleaved rounds, after warm-up; the table reports the median step
time of each and its ratio to fused AdamW *measured in the same group*. Also reported: the time of the
first fused step (the kernel's build or the graph's compile: run the script twice with the same
``HF_WIN_CACHE_DIR`` / ``TORCHINDUCTOR_CACHE_DIR`` to see the cold and the cached figure), and the peak of memory allocated during one step beyond the
persistent state, in units of the parameters' size ("transient buffers").

    python benchmarks/step_time.py --params vit_s                 # full table, ViT-S/16 shapes
    python benchmarks/step_time.py --params vit_b --optimizers adamw_win --modes win win2
    python benchmarks/step_time.py --quick                        # tiny smoke run (seconds + compile)

Writes ``<out>/step_time_<params>_<device>.csv`` and ``.md`` (with the machine's description).
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler (memory measurement) quiet

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from hf_win.optim import _fused  # noqa: E402
from hf_win.optim._base import WinOptimizer  # noqa: E402
from hf_win.registry import OPTIMIZERS, available_optimizers  # noqa: E402


# ---------------------------------------------------------------------------------------------- shapes
def vit_shapes(dim: int, depth: int, mlp: int, classes: int = 1000, patch: int = 16, image: int = 224):
    """Parameter shapes of a ViT (timm ``vit_*_patch16_224`` layout): 12 tensors per block + 8."""
    tokens = (image // patch) ** 2 + 1
    shapes = [(dim, 3, patch, patch), (dim,), (1, 1, dim), (1, tokens, dim)]
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (mlp, dim), (mlp,), (dim, mlp), (dim,)]
    shapes += [(dim,), (dim,), (classes, dim), (classes,)]
    return shapes


PARAM_SETS = {
    "vit_s": lambda: vit_shapes(384, 12, 1536),  # ViT-S/16: 22.0M parameters, 152 tensors
    "vit_b": lambda: vit_shapes(768, 12, 3072),  # ViT-B/16: 86.6M parameters, 152 tensors
    "tiny": lambda: vit_shapes(32, 2, 64, classes=10, patch=4, image=16),  # for --quick and tests
}


# ---------------------------------------------------------------------------------------------- machine
def machine(device: torch.device) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "device": str(device),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a",
        "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "(default)"),
        "hf_win_cache": os.environ.get("HF_WIN_CACHE_DIR", "(default)"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---------------------------------------------------------------------------------------------- contenders
class Contender:
    def __init__(self, label, optimizer, path, mode, build, shapes, grads, device):
        self.label, self.optimizer, self.path, self.mode = label, optimizer, path, mode
        self.cpu_kernel = False if path == "compiled" else True  # the compiled path: CPU kernel off
        self.impl = ""
        self.params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
        for p, g in zip(self.params, grads):
            p.grad = g  # shared, read-only
        self.opt = build(self.params)
        self.times = []
        self.compile_s = float("nan")
        self.transient = float("nan")

    def step(self):
        saved, _fused.CPU_KERNEL = _fused.CPU_KERNEL, self.cpu_kernel
        try:
            t0 = time.perf_counter()
            self.opt.step()
        finally:
            _fused.CPU_KERNEL = saved
        if self.params[0].device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def transient_peak_bytes(contender: Contender) -> int:
    """Peak bytes allocated during one step beyond what was allocated before it (CPU: profiler; CUDA:
    max_memory_allocated)."""
    dev = contender.params[0].device
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        contender.opt.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(dev) - base
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    # The profiler's memory timeline records every allocation and free (the compiled wrapper's buffers
    # included) with the tensor it belongs to; replay it in time order.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        contender.opt.step()
    live = peak = 0
    for _, action, _, nbytes in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += nbytes
        elif action == Action.DESTROY:
            live -= nbytes
        peak = max(peak, live)
    return peak


def build_groups(args, shapes, grads, device):
    """One group per (optimizer, mode): our paths + the two torch.optim.AdamW baselines."""
    for name in args.optimizers:
        spec = OPTIMIZERS[name]
        for mode in args.modes:
            kw = {"lr": 1e-3, "acceleration_mode": mode}
            if name == "lamb_win":
                kw["max_grad_norm"] = 0.0  # clipping is the Trainer's; measure the step itself
            builders = []
            for path in args.paths:
                flags = {"fused": {"fused": True}, "compiled": {"fused": True},
                         "foreach": {"foreach": True, "fused": False},
                         "per_tensor": {"foreach": False, "fused": False}}[path]
                builders.append((f"{name}/{mode}/{path}", name, path, mode,
                                 lambda ps, kw=dict(kw, **flags): spec.cls(ps, **kw)))
            builders.append(("torch.AdamW/fused", "torch.optim.AdamW", "fused", "-",
                             lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)))
            builders.append(("torch.AdamW/foreach", "torch.optim.AdamW", "foreach", "-",
                             lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)))
            yield name, mode, builders


def run_group(builders, shapes, grads, device, args):
    contenders = [Contender(label, o, path, mode, b, shapes, grads, device) for label, o, path, mode, b in builders]
    # Warm-up: the first step creates state (eagerly on every path), the second compiles the fused path.
    for c in contenders:
        c.step()
    for c in contenders:
        before = _fused.compile_counter()
        dt = c.step()
        after = _fused.compile_counter()
        if isinstance(c.opt, WinOptimizer):
            # what really ran: the generated kernel, the compiled graph, or (no fused call) foreach
            c.impl = ("kernel" if after["kernel_calls"] > before["kernel_calls"]
                      else "graph" if after["calls"] > before["calls"] else "eager")
            if c.path in ("fused", "compiled"):
                c.compile_s = dt
    for _ in range(args.warmup):
        for c in contenders:
            c.step()
    for c in contenders:
        c.transient = transient_peak_bytes(c)
    for r in range(args.repeats):  # interleaved rounds, rotating the order
        order = contenders[r % len(contenders):] + contenders[: r % len(contenders)]
        for c in order:
            c.times.append(c.step())
    return contenders


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="vit_s", choices=sorted(PARAM_SETS))
    ap.add_argument("--optimizers", nargs="+", default=available_optimizers(), choices=available_optimizers())
    ap.add_argument("--modes", nargs="+", default=["win", "win2", "none"], choices=["win", "win2", "none"])
    ap.add_argument("--paths", nargs="+", default=["fused", "compiled", "foreach"],
                    choices=["fused", "compiled", "foreach", "per_tensor"])
    ap.add_argument("--repeats", type=int, default=7, help="timed interleaved rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds after the compile step")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave the default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--tag", default="", help="suffix for the output file names")
    ap.add_argument("--quick", action="store_true",
                    help="tiny parameter set, AdamW-Win (win) only, 3 rounds: a smoke test of the script")
    args = ap.parse_args(argv)
    if args.quick:
        args.params, args.optimizers, args.modes, args.repeats, args.warmup = "tiny", ["adamw_win"], ["win"], 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    shapes = PARAM_SETS[args.params]()
    n_params = sum(torch.Size(s).numel() for s in shapes)
    grads = [torch.randn(s, device=device) * 1e-2 for s in shapes]
    param_bytes = n_params * 4
    info = machine(device)
    print(f"# {args.params}: {n_params / 1e6:.1f}M parameters in {len(shapes)} tensors; {info}", flush=True)

    rows = []
    wall0 = time.perf_counter()
    for name, mode, builders in build_groups(args, shapes, grads, device):
        contenders = run_group(builders, shapes, grads, device, args)
        med = {c.label: statistics.median(c.times) for c in contenders}
        base = med["torch.AdamW/fused"]
        for c in contenders:
            rows.append({
                "group": f"{name}/{mode}",
                "optimizer": c.optimizer, "mode": c.mode, "path": c.path, "runs": c.impl or "torch",
                "median_ms": round(med[c.label] * 1e3, 3),
                "min_ms": round(min(c.times) * 1e3, 3),
                "ratio_to_torch_fused_adamw": round(med[c.label] / base, 3),
                "compile_s": "" if c.compile_s != c.compile_s else round(c.compile_s, 3),
                "state_bytes_per_param_byte": round(state_bytes(c.opt) / param_bytes, 2),
                "transient_param_sizes": round(c.transient / param_bytes, 3),
            })
            r = rows[-1]
            print(f"{r['group']:<22} {c.label:<28} {r['median_ms']:>9.2f} ms  x{r['ratio_to_torch_fused_adamw']:<6} "
                  f"compile {r['compile_s'] or '-':>6} s  transient {r['transient_param_sizes']}", flush=True)
        del contenders
        gc.collect()
    info["load_average_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    info["wall_s"] = round(time.perf_counter() - wall0, 1)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"step_time_{args.params}_{device.type}{('_' + args.tag) if args.tag else ''}"
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = [f"# Optimizer step time: `{args.params}` ({n_params / 1e6:.1f}M parameters, {len(shapes)} tensors)", "",
          "Command: `python benchmarks/step_time.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`", "",
          "| machine | |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in info.items()]
    md += ["", f"Median of {args.repeats} interleaved rounds after warm-up; ratio = median / median of "
           "`torch.optim.AdamW(fused=True)` in the same group. runs = what the step executed (kernel: the "
           "generated CPU kernel; graph: the torch.compile graph; eager: the foreach operations; torch: "
           "torch.optim). compile = the first fused step (s): the "
           "kernel's build or the graph's compile, or their load from the cache. "
           "transient = peak memory allocated during one step beyond the persistent state, in units of the "
           "parameters' size.", "",
           "| optimizer | mode | path | runs | ms | x fused AdamW | compile s | state / params | transient |",
           "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['optimizer']} | {r['mode']} | {r['path']} | {r['runs']} | {r['median_ms']:.2f} | "
                  f"{r['ratio_to_torch_fused_adamw']:.2f} | {r['compile_s']} | {r['state_bytes_per_param_byte']} | "
                  f"{r['transient_param_sizes']} |")
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out / stem}.csv and .md", flush=True)
    return rows


if __name__ == "__main__":
    main()
