"""Time one optimizer step, for every registry optimizer x acceleration mode x path, against torch.optim.AdamW.

Paths: ``fused`` (``fused=True`` with ``HF_WIN_FUSED_BACKEND=auto``: the generated C kernel for CPU tensors,
the Triton kernel for CUDA tensors; on CPU the default ``fused=None`` runs the same kernel), ``triton``
(``fused=True`` with ``HF_WIN_FUSED_BACKEND=triton``: CUDA only, skipped with a note on CPU, where only
Triton's interpreter could run it), ``foreach``, ``per_tensor``.

For a named parameter set (the parameter shapes of a model, with random gradients), each group of
contenders (our optimizer on each path and each ``--state_dtypes``, ``torch.optim.AdamW(fused=True)``,
``AdamW(foreach=True)``, for ``adamw_win`` the same step by the wrapper,
``hf_win.Win(torch.optim.AdamW(fused=True))``, and, with ``--baselines ds_cpu_adam``, DeepSpeed's
``DeepSpeedCPUAdam``: the optimizer ZeRO-Offload runs on the offloaded partitions) is built together
and stepped in interleaved rounds, after warm-up; the table reports the median step time of each
(CUDA: CUDA events) and its ratio to fused AdamW, and to DeepSpeedCPUAdam when it ran, *measured in
the same group*. Also
reported: the time of the first fused step (state creation, the kernel's build or its load from the
cache, and the step), with the kernels and cache entries built/loaded by it, and the peak of memory
allocated during one step beyond the persistent state, in units of the parameters' size ("transient
buffers").

``--schedule`` runs the schedule case instead: ``OneCycleLR(cycle_momentum=True)`` moving the learning
rate and betas/momentum every step for ``--schedule_steps`` steps (default 200) against a constant
schedule, reporting the kernels traced and built (``hf_win.optim.kernels.counters()`` and
``kernels.cache.counters()`` deltas, each run starting from ``kernels.reset()``) and the median ms/step.

    python benchmarks/step_time.py --params vit_s --threads 1       # full table, ViT-S/16 shapes
    python benchmarks/step_time.py --params vit_b --optimizers adamw_win --modes win win2
    python benchmarks/step_time.py --params vit_s --threads 1 --schedule
    python benchmarks/step_time.py --quick                          # tiny smoke run (seconds)
    # against the offload anchor (DeepSpeedCPUAdam's op is built with the C++ compiler and ninja on first use)
    OMP_NUM_THREADS=1 python benchmarks/step_time.py --params vit_b --threads 1 --optimizers adamw_win \
        --modes none win win2 --paths fused --state_dtypes float32 bfloat16 --baselines fused ds_cpu_adam \
        --no_memory --tag offload_t1

Writes ``<out>/step_time_<params>_<device>.csv`` and ``.md`` (``..._schedule`` for ``--schedule``), with
the machine's description and the command.
"""

from __future__ import annotations

import argparse
import contextlib
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

from hf_win.optim import kernels  # noqa: E402
from hf_win.optim import Win, WinOptimizer  # noqa: E402
from hf_win.optim.kernels import cache as kcache  # noqa: E402
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


def gpt_shapes(dim: int, depth: int, vocab: int = 50304, context: int = 2048):
    """Parameter shapes of a GPT-2-style decoder (nanoGPT layout, tied embedding/LM head, biases):
    token and position embeddings, 12 tensors per block (ln_1, attn c_attn/c_proj, ln_2, mlp c_fc/c_proj,
    4x MLP), a final LayerNorm."""
    shapes = [(vocab, dim), (context, dim)]
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (4 * dim, dim), (4 * dim,), (dim, 4 * dim), (dim,)]
    shapes += [(dim,), (dim,)]
    return shapes


PARAM_SETS = {
    "vit_s": lambda: vit_shapes(384, 12, 1536),  # ViT-S/16: 22.1M parameters, 152 tensors
    "vit_b": lambda: vit_shapes(768, 12, 3072),  # ViT-B/16: 86.6M parameters, 152 tensors
    "gpt_1_3b": lambda: gpt_shapes(2048, 24),  # d=2048, 24 layers, vocab 50304, context 2048: 1.32B, 292 tensors
    # the same tensor shapes, 2 of the 24 blocks (0.21B, 28 tensors): what fits a 24 GiB machine with three
    # contenders (a Win2 step with float32 state holds 24 bytes per parameter, fused AdamW and DeepSpeed 16)
    "gpt_1_3b_2blocks": lambda: gpt_shapes(2048, 2),
    "tiny": lambda: vit_shapes(32, 2, 64, classes=10, patch=4, image=16),  # for --quick and tests
    # the host's cost per tensor: many tensors, little arithmetic
    "many_1000x1000": lambda: [(1000,)] * 1000,
    "many_10000x10": lambda: [(10,)] * 10000,
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
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "(unset)"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a",
        "hf_win_fused_backend": os.environ.get("HF_WIN_FUSED_BACKEND", "(auto)"),
        "hf_win_cache": os.environ.get("HF_WIN_CACHE_DIR", "(default)"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
        info["cuda"] = torch.version.cuda
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = "not installed"
        info["triton_cache"] = os.environ.get("TRITON_CACHE_DIR", "(default)")
    return info


@contextlib.contextmanager
def backend(value):
    """``HF_WIN_FUSED_BACKEND=value`` for the duration (``None``: leave it as it is)."""
    if value is None:
        yield
        return
    saved = os.environ.get("HF_WIN_FUSED_BACKEND")
    os.environ["HF_WIN_FUSED_BACKEND"] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ["HF_WIN_FUSED_BACKEND"]
        else:
            os.environ["HF_WIN_FUSED_BACKEND"] = saved


def timed(fn, device) -> float:
    """Seconds ``fn()`` took: CUDA events on CUDA, the wall clock elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def wall(fn, device) -> float:
    """Wall-clock seconds of ``fn()`` until the device is idle (first steps: host-side builds included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- contenders
PATH_FLAGS = {
    "fused": ({"fused": True}, None),  # backend as configured (auto: C on CPU, Triton on CUDA)
    "triton": ({"fused": True}, "triton"),
    "foreach": ({"foreach": True, "fused": False}, None),
    "per_tensor": ({"foreach": False, "fused": False}, None),
}


class Contender:
    def __init__(self, label, optimizer, path, mode, build, shapes, grads, device, env=None):
        self.label, self.optimizer, self.path, self.mode, self.env = label, optimizer, path, mode, env
        self.device = device
        self.impl = ""
        self.params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
        for p, g in zip(self.params, grads):
            p.grad = g  # shared, read-only
        self.opt = build(self.params)
        self.times = []
        self.compile_s = float("nan")
        self.first = ""
        self.transient = float("nan")

    def step(self):
        with backend(self.env):
            return timed(self.opt.step, self.device)

    def first_step(self):
        """The first step, wall clock (state creation + kernel build/load + the step), and what it built."""
        k0, c0 = kernels.counters(), kcache.counters()
        with backend(self.env):
            dt = wall(self.opt.step, self.device)
        k1, c1 = kernels.counters(), kcache.counters()
        if isinstance(self.opt, WinOptimizer):
            path = self.opt.step_path()
            self.impl = "kernel" if k1["calls"] > k0["calls"] else "eager"
            self.backend = path.split(" kernel")[0] if self.impl == "kernel" else "-"
            self.path_taken = path
            if self.impl == "kernel":
                self.compile_s = dt
                self.first = (f"{k1['kernels'] - k0['kernels']} kernel(s), cache {c1['builds'] - c0['builds']} "
                              f"built / {c1['loads'] - c0['loads']} loaded")
        elif isinstance(self.opt, Win):
            self.impl, self.path_taken = "wrapper", self.opt.step_path()
            self.backend = self.path_taken  # e.g. "AdamW step, then win2 on c kernel"
        else:
            self.backend, self.path_taken = "-", type(self.opt).__module__.split(".")[0]
        return dt


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
        contender.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(dev) - base
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    # The profiler's memory timeline records every allocation and free with the tensor it belongs to;
    # replay it in time order.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        contender.step()
    live = peak = 0
    for _, action, _, nbytes in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += nbytes
        elif action == Action.DESTROY:
            live -= nbytes
        peak = max(peak, live)
    return peak


#: The issue's GPU targets, as ratios to torch.optim.AdamW(fused=True): at the bandwidth limit AdamW-Win
#: moves 36/28 and Win2 44/28 of fused AdamW's bytes per parameter.
CUDA_TARGETS = {("adamw_win", "win"): 1.35, ("adamw_win", "win2"): 1.6, ("adamw_win", "none"): 1.05}


def floor_bytes(optimizer: str, mode: str, state_dtype: str = "float32") -> int:
    """Bytes per float32 parameter at the floor: the parameter, the gradient and every state buffer read
    once, the parameter and every buffer written once (torch's AdamW: 2 buffers, 28 bytes); a bfloat16
    state buffer moves 2 bytes per element."""
    if optimizer in OPTIMIZERS:
        buffers = OPTIMIZERS[optimizer].cls.buffers_per_parameter(mode)
    elif optimizer.startswith("hf_win.Win("):  # the wrapper over AdamW keeps AdamW-Win's buffers
        buffers = OPTIMIZERS["adamw_win"].cls.buffers_per_parameter(mode)
    else:  # torch.optim.AdamW, DeepSpeedCPUAdam
        buffers = 2
    return 4 * 3 + 2 * buffers * (2 if state_dtype == "bfloat16" else 4)


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of ``dst.copy_(src)`` over 1 GiB (read + write counted), CUDA events, median of 5."""
    src = torch.empty(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        times.append(timed(lambda: dst.copy_(src), device))
    del src, dst
    return 2 * 2**30 / statistics.median(times[1:]) / 1e9


def ds_cpu_adam(params):
    """DeepSpeed's CPU Adam (AVX, OpenMP) in AdamW mode with torch.optim.AdamW's defaults; its op is built
    (C++ compiler, ninja) on first use."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, lr=1e-3, weight_decay=1e-2, adamw_mode=True, fp32_optimizer_states=True)


def state_dtype_of(opt) -> str:
    if isinstance(opt, WinOptimizer):
        return str(opt.param_groups[0].get("state_dtype") or "float32").replace("torch.", "")
    return "float32"


def our_kwargs(name, mode):
    kw = {"lr": 1e-3, "acceleration_mode": mode}
    if name == "lamb_win":
        kw["max_grad_norm"] = 0.0  # clipping is the Trainer's; measure the step itself
    return kw


def build_groups(args, shapes, grads, device):
    """One group per (optimizer, mode): our paths + the torch.optim.AdamW baselines."""
    for name in args.optimizers:
        spec = OPTIMIZERS[name]
        for mode in args.modes:
            kw = our_kwargs(name, mode)
            builders = []
            for dtype in args.state_dtypes:
                extra = {} if dtype == "float32" else {"state_dtype": dtype}
                suffix = "" if dtype == "float32" else f"/{dtype}_state"
                for path in args.paths:
                    flags, env = PATH_FLAGS[path]
                    builders.append((f"{name}/{mode}/{path}{suffix}", name, path, mode,
                                     lambda ps, kw=dict(kw, **flags, **extra): spec.cls(ps, **kw), env))
            builders.append(("torch.AdamW/fused", "torch.optim.AdamW", "fused", "-",
                             lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), None))
            if "foreach" in args.baselines:
                builders.append(("torch.AdamW/foreach", "torch.optim.AdamW", "foreach", "-",
                                 lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), None))
            if "wrapper" in args.baselines and name == "adamw_win" and mode != "none":
                # the same AdamW-Win step as hf_win.AdamW (the tests check it), by the wrapper
                builders.append((f"Win(torch.AdamW/fused)/{mode}", "hf_win.Win(torch.optim.AdamW(fused=True))",
                                 "wrapper", mode, lambda ps, mode=mode: Win(
                                     torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0, fused=True),
                                     acceleration_mode=mode, weight_decay=1e-2), None))
            if "ds_cpu_adam" in args.baselines:
                builders.append((DS_LABEL, "deepspeed.ops.adam.DeepSpeedCPUAdam", "avx", "-", ds_cpu_adam, None))
            yield name, mode, builders


DS_LABEL = "DeepSpeedCPUAdam"


def run_group(builders, shapes, grads, device, args):
    contenders = [Contender(label, o, path, mode, b, shapes, grads, device, env)
                  for label, o, path, mode, b, env in builders]
    for c in contenders:  # the first step: state, the kernel's build (or load), the step
        c.first_step()
    for _ in range(args.warmup):
        for c in contenders:
            c.step()
    if not args.no_memory:
        for c in contenders:
            c.transient = transient_peak_bytes(c)
    for r in range(args.repeats):  # interleaved rounds, rotating the order
        order = contenders[r % len(contenders):] + contenders[: r % len(contenders)]
        for c in order:
            c.times.append(c.step())
    return contenders


def release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- schedule case
def schedule_case(args, shapes, grads, device):
    """Per optimizer and mode: ``OneCycleLR(cycle_momentum=True)`` against a constant schedule, each run
    of ``--schedule_steps`` steps from ``kernels.reset()`` on the default fused path; two rounds in the
    order constant, scheduled, scheduled, constant (so drift on a shared machine hits both)."""
    rows = []
    for name in args.optimizers:
        spec = OPTIMIZERS[name]
        for mode in args.modes:
            kw = dict(our_kwargs(name, mode), fused=True)
            if name == "sgd_win":
                kw["momentum"] = 0.9
            runs = {"constant": [], "OneCycleLR": []}
            for sched in ("constant", "OneCycleLR", "OneCycleLR", "constant"):
                params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
                for p, g in zip(params, grads):
                    p.grad = g
                opt = spec.cls(params, **kw)
                lr_sched = None
                if sched == "OneCycleLR":
                    lr_sched = torch.optim.lr_scheduler.OneCycleLR(
                        opt, max_lr=1e-3, total_steps=args.schedule_steps, cycle_momentum=True,
                        base_momentum=0.85, max_momentum=0.95)
                kernels.reset()
                k0, c0 = kernels.counters(), kcache.counters()
                moved = set()
                times = []
                first = opt.param_groups[0].get("betas", opt.param_groups[0].get("momentum"))
                for i in range(args.schedule_steps):
                    g = opt.param_groups[0]
                    moved.add((g["lr"], str(g.get("betas", g.get("momentum")))))  # what this step uses
                    dt = wall(opt.step, device) if i == 0 else timed(opt.step, device)
                    times.append(dt)
                    if lr_sched is not None:
                        lr_sched.step()
                k1, c1 = kernels.counters(), kcache.counters()
                runs[sched].append({
                    "path": opt.step_path(),
                    "kernels": k1["kernels"] - k0["kernels"], "traces": k1["traces"] - k0["traces"],
                    "calls": k1["calls"] - k0["calls"],
                    "cache_builds": c1["builds"] - c0["builds"], "cache_loads": c1["loads"] - c0["loads"],
                    "first_s": times[0], "times": times[1:], "distinct_settings": len(moved),
                    "momentum_first_last": f"{first} -> {opt.param_groups[0].get('betas', opt.param_groups[0].get('momentum'))}",
                })
                print(f"{name}/{mode} {sched:<10} {runs[sched][-1]['path']}: kernels {runs[sched][-1]['kernels']} "
                      f"traces {runs[sched][-1]['traces']} calls {runs[sched][-1]['calls']} cache builds "
                      f"{runs[sched][-1]['cache_builds']} loads {runs[sched][-1]['cache_loads']}, "
                      f"{statistics.median(times[1:]) * 1e3:.2f} ms/step, {len(moved)} distinct (lr, betas)",
                      flush=True)
                del opt, params, lr_sched
                release(device)
            const_ms = statistics.median([t for r in runs["constant"] for t in r["times"]]) * 1e3
            for sched, rs in runs.items():
                ms = statistics.median([t for r in rs for t in r["times"]]) * 1e3
                rows.append({
                    "optimizer": name, "mode": mode, "schedule": sched, "path": rs[0]["path"],
                    "steps_per_run": args.schedule_steps, "runs": len(rs),
                    "distinct_lr_betas": ";".join(str(r["distinct_settings"]) for r in rs),
                    "betas_or_momentum_first_to_last": rs[0]["momentum_first_last"],
                    "kernels_built": ";".join(str(r["kernels"]) for r in rs),
                    "traces": ";".join(str(r["traces"]) for r in rs),
                    "kernel_calls": ";".join(str(r["calls"]) for r in rs),
                    "cache_builds": ";".join(str(r["cache_builds"]) for r in rs),
                    "cache_loads": ";".join(str(r["cache_loads"]) for r in rs),
                    "first_step_s": ";".join(f"{r['first_s']:.3f}" for r in rs),
                    "median_ms": round(ms, 3),
                    "ratio_to_constant": round(ms / const_ms, 3),
                })
    return rows


def write_results(rows, title, argv, info, out, stem) -> list:
    """Write ``<stem>.csv``; return the head of ``<stem>.md`` (title, the command, the machine table)."""
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = [f"# {title}", "", "Command: `python benchmarks/step_time.py " + " ".join(argv) + "`", "",
          "| machine | |", "|---|---|"]
    return md + [f"| {k} | {v} |" for k, v in info.items()]


def write_schedule(rows, args, argv, info, out, stem):
    md = write_results(rows, f"Schedule case: `{args.params}`, OneCycleLR(cycle_momentum=True) against a constant "
                       "schedule", argv, info, out, stem)
    md += ["", f"Each run: a fresh optimizer (`fused=True`) and `hf_win.optim.kernels.reset()`, then "
           f"{args.schedule_steps} steps; the scheduled runs call `OneCycleLR(max_lr=1e-3, "
           f"total_steps={args.schedule_steps}, cycle_momentum=True, base_momentum=0.85, max_momentum=0.95)"
           f".step()` after every step, which moves the learning rate and betas[0] (SGD: momentum). Two runs "
           "per schedule, in the order constant, OneCycleLR, OneCycleLR, constant; per-run values are separated "
           "by `;`. kernels / traces / calls: `kernels.counters()` deltas over the run; cache built / loaded: "
           "`kernels.cache.counters()` deltas (a kernel found on disk is loaded, not built). ms/step: median "
           "over both runs of steps 2.."
           f"{args.schedule_steps}; ratio to the constant schedule's median in the same run.", "",
           "| optimizer | mode | schedule | path | distinct (lr, betas) | kernels built | traces | kernel calls | "
           "cache built / loaded | first step s | ms/step | x constant |",
           "|---|---|---|---|---|---|---|---|---|---|---:|---:|"]
    for r in rows:
        md.append(f"| {r['optimizer']} | {r['mode']} | {r['schedule']} | {r['path']} | {r['distinct_lr_betas']} | "
                  f"{r['kernels_built']} | {r['traces']} | {r['kernel_calls']} | {r['cache_builds']} / "
                  f"{r['cache_loads']} | {r['first_step_s']} | {r['median_ms']:.2f} | {r['ratio_to_constant']:.3f} |")
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="vit_s", choices=sorted(PARAM_SETS))
    ap.add_argument("--optimizers", nargs="+", default=available_optimizers(), choices=available_optimizers())
    ap.add_argument("--modes", nargs="+", default=["win", "win2", "none"], choices=["win", "win2", "none"])
    ap.add_argument("--paths", nargs="+", default=["fused", "triton", "foreach"],
                    choices=sorted(PATH_FLAGS))
    ap.add_argument("--baselines", nargs="+", default=["fused", "foreach", "wrapper"],
                    choices=["fused", "foreach", "wrapper", "ds_cpu_adam"],
                    help="torch.optim.AdamW baselines (fused is always run: ratios are to it); wrapper: "
                    "hf_win.Win(torch.optim.AdamW(fused=True)) in the adamw_win groups (win, win2); ds_cpu_adam: "
                    "DeepSpeedCPUAdam (CPU only), the ZeRO-Offload anchor, with a second ratio column")
    ap.add_argument("--state_dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                    help="state_dtype of our optimizers (each one a contender per path)")
    ap.add_argument("--repeats", type=int, default=7, help="timed interleaved rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds after the first step")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave the default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no_memory", action="store_true", help="skip the transient-memory measurement")
    ap.add_argument("--schedule", action="store_true", help="run the schedule case (see the module doc)")
    ap.add_argument("--schedule_steps", type=int, default=200)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--tag", default="", help="suffix for the output file names")
    ap.add_argument("--quick", action="store_true",
                    help="tiny parameter set, AdamW-Win (win) only, 3 rounds: a smoke test of the script")
    args = ap.parse_args(argv)
    argv = list(argv) if argv is not None else sys.argv[1:]
    if args.quick:
        args.params, args.optimizers, args.modes, args.repeats, args.warmup = "tiny", ["adamw_win"], ["win"], 3, 1
        args.schedule_steps = min(args.schedule_steps, 20)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if "triton" in args.paths and device.type != "cuda":
        print(f"note: the triton path runs on CUDA tensors only; skipped on {device.type} "
              "(its CPU form is Triton's interpreter, a correctness check, never timed)", flush=True)
        args.paths = [p for p in args.paths if p != "triton"]
    if "ds_cpu_adam" in args.baselines and device.type != "cpu":
        print(f"note: DeepSpeedCPUAdam steps CPU tensors only; skipped on {device.type}", flush=True)
        args.baselines = [b for b in args.baselines if b != "ds_cpu_adam"]
    torch.manual_seed(0)
    shapes = PARAM_SETS[args.params]()
    n_params = sum(torch.Size(s).numel() for s in shapes)
    grads = [torch.randn(s, device=device) * 1e-2 for s in shapes]
    param_bytes = n_params * 4
    info = machine(device)
    if device.type == "cuda":
        info["copy_bandwidth_GB_s"] = round(copy_bandwidth(device), 1)
    print(f"# {args.params}: {n_params / 1e6:.1f}M parameters in {len(shapes)} tensors; {info}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = ("_" + args.tag) if args.tag else ""
    wall0 = time.perf_counter()

    if args.schedule:
        rows = schedule_case(args, shapes, grads, device)
        info["load_average_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
        info["wall_s"] = round(time.perf_counter() - wall0, 1)
        stem = f"step_time_{args.params}_{device.type}_schedule{tag}"
        write_schedule(rows, args, argv, info, out, stem)
        print(f"wrote {out / stem}.csv and .md", flush=True)
        return rows

    rows = []
    for name, mode, builders in build_groups(args, shapes, grads, device):
        contenders = run_group(builders, shapes, grads, device, args)
        med = {c.label: statistics.median(c.times) for c in contenders}
        base = med["torch.AdamW/fused"]
        anchor = med.get(DS_LABEL)
        for c in contenders:
            rows.append({
                "group": f"{name}/{mode}",
                "optimizer": c.optimizer, "mode": c.mode, "path": c.path, "state_dtype": state_dtype_of(c.opt),
                "runs": c.impl or c.path_taken,
                "backend": c.backend,
                "median_ms": round(med[c.label] * 1e3, 3),
                "min_ms": round(min(c.times) * 1e3, 3),
                "ratio_to_torch_fused_adamw": round(med[c.label] / base, 3),
                "ratio_to_ds_cpu_adam": "" if anchor is None else round(med[c.label] / anchor, 3),
                "compile_s": "" if c.compile_s != c.compile_s else round(c.compile_s, 3),
                "first_step_built": c.first,
                "state_bytes_per_param_byte": round(state_bytes(c.opt) / param_bytes, 2),
                "transient_param_sizes": "" if c.transient != c.transient else round(c.transient / param_bytes, 3),
                "floor_bytes_per_param": floor_bytes(c.optimizer, c.mode, state_dtype_of(c.opt)),
                "GB_s_at_floor": round(floor_bytes(c.optimizer, c.mode, state_dtype_of(c.opt)) * n_params
                                       / med[c.label] / 1e9, 1),
                "target": CUDA_TARGETS.get((c.optimizer, c.mode), "") if device.type == "cuda" else "",
            })
            r = rows[-1]
            print(f"{r['group']:<22} {c.label:<40} {r['median_ms']:>9.2f} ms  x{r['ratio_to_torch_fused_adamw']:<6} "
                  f"(x{r['ratio_to_ds_cpu_adam'] or '-'} DeepSpeedCPUAdam) "
                  f"first {r['compile_s'] or '-':>6} s  {c.path_taken}  transient {r['transient_param_sizes']}",
                  flush=True)
        del contenders
        release(device)
    info["load_average_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    info["wall_s"] = round(time.perf_counter() - wall0, 1)

    stem = f"step_time_{args.params}_{device.type}{tag}"
    md = write_results(rows, f"Optimizer step time: `{args.params}` ({n_params / 1e6:.1f}M parameters, {len(shapes)} "
                       "tensors)", argv, info, out, stem)
    md += ["", f"Median of {args.repeats} interleaved rounds after warm-up "
           f"({'CUDA events' if device.type == 'cuda' else 'wall clock'}); ratio = median / median of "
           "`torch.optim.AdamW(fused=True)` in the same group. runs = what the step executed (kernel: the "
           "generated kernel of the backend named; eager: the foreach operations; torch: torch.optim; wrapper: "
           "torch's fused AdamW step, then Win's acceleration, on the path backend names). "
           "first step s = the first fused step, wall clock: state creation, the kernel's build or its load "
           "from the cache (what it built/loaded is listed), and the step. transient = peak memory allocated "
           "during one step beyond the persistent state, in units of the parameters' size. x DeepSpeedCPUAdam: "
           "median / median of DeepSpeedCPUAdam (adamw_mode, fp32 state) in the same group, when it ran. GB/s = "
           "the floor's bytes per parameter (parameter, gradient and state read once, parameter and state written "
           "once: AdamW 28, AdamW-Win 36, Win2 44 with float32 state) x parameters / median time: a lower bound "
           "of what moved"
           + (f", against the device's copy bandwidth measured in this run ({info['copy_bandwidth_GB_s']} GB/s)"
              if "copy_bandwidth_GB_s" in info else "") + ". target: the ratio the CUDA path aims at.", "",
           "| optimizer | mode | path | state dtype | runs | backend | ms | x fused AdamW | x DeepSpeedCPUAdam | "
           "target | GB/s at floor | first step s | first step built | state / params | transient |",
           "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        ds = "" if r["ratio_to_ds_cpu_adam"] == "" else f"{r['ratio_to_ds_cpu_adam']:.2f}"
        md.append(f"| {r['optimizer']} | {r['mode']} | {r['path']} | {r['state_dtype']} | {r['runs']} | {r['backend']} | "
                  f"{r['median_ms']:.2f} | {r['ratio_to_torch_fused_adamw']:.2f} | {ds} | {r['target']} | "
                  f"{r['GB_s_at_floor']} | {r['compile_s']} | "
                  f"{r['first_step_built']} | {r['state_bytes_per_param_byte']} | {r['transient_param_sizes']} |")
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out / stem}.csv and .md", flush=True)
    return rows


if __name__ == "__main__":
    main()
