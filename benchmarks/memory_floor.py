"""The memory-traffic floor of an optimizer step on this machine, against torch.optim.AdamW(fused=True).

An AdamW step reads 4 arrays and writes 3 (7 per element); AdamW-Win touches 9, Win2 11. This times
loops that do nothing but stream 7, 9 and 11 float32 arrays (a few multiply-adds per element, one
fused loop each, compiled by ``torch.compile``) over one tensor of ``--numel`` elements, interleaved with
``torch.optim.AdamW(fused=True)`` on a parameter of the same size, and reports each as a ratio to it:
what a Win / Win2 step that only moves its data would cost. Compare with ``step_time.py``.

    python benchmarks/memory_floor.py --threads 1     # writes benchmarks/results/memory_floor_cpu.{csv,md}
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
from step_time import machine  # noqa: E402


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=int, default=22_050_000, help="elements (default: ViT-S's parameter count)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
    info = machine(torch.device("cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "memory_floor_cpu.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = ["# Memory-traffic floor of an optimizer step", "",
          "Command: `python benchmarks/memory_floor.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`",
          "", "| machine | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in info.items()]
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
