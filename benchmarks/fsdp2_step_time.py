"""The optimizer step of one process under FSDP2: the kernel on the local shards against foreach on the
DTensors, in the same run.

    torchrun --nproc_per_node 2 benchmarks/fsdp2_step_time.py --params vit_s --threads 1
    torchrun --nproc_per_node 2 benchmarks/fsdp2_step_time.py --device cuda ...   # one GPU per process

The parameters are a model's shapes (``step_time.PARAM_SETS``) in one module, ``fully_shard`` on a 1-D
mesh of all processes (Shard(0) DTensors), with random DTensor gradients. For each optimizer and mode the
two paths (``fused=None``: the kernel; ``foreach=True``) are built together and stepped in interleaved
rounds after warm-up; the median step time of rank 0 is reported, with the ratio foreach / kernel and
``torch.optim.AdamW(foreach=True)`` on the same DTensors as a reference. Rank 0 writes
``<out>/fsdp2_step_time_<params>_<device>_<world>p.md`` with the machine and the command.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import step_time  # noqa: E402  (the shapes, the machine description, the timer)
from hf_win.registry import OPTIMIZERS  # noqa: E402


class Flat(torch.nn.Module):
    def __init__(self, shapes, device):
        super().__init__()
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="vit_s", choices=sorted(step_time.PARAM_SETS))
    ap.add_argument("--optimizers", nargs="+", default=["adamw_win", "lamb_win"], choices=sorted(OPTIMIZERS))
    ap.add_argument("--modes", nargs="+", default=["win", "win2"], choices=["win", "win2", "none"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    if args.threads:
        torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    mesh = init_device_mesh(args.device, (world,))
    shapes = step_time.PARAM_SETS[args.params]()
    torch.manual_seed(0)
    rows = []
    for name in args.optimizers:
        for mode in args.modes:
            kw = dict(step_time.our_kwargs(name, mode))
            contenders = {"kernel": lambda ps: OPTIMIZERS[name].cls(ps, **kw),
                          "foreach": lambda ps: OPTIMIZERS[name].cls(ps, foreach=True, fused=False, **kw),
                          "torch.AdamW/foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)}
            built = {}
            for label, make in contenders.items():
                model = Flat(shapes, device)
                fully_shard(model, mesh=mesh)
                for p in model.parameters():
                    p.grad = distribute_tensor(torch.randn(p.shape, device=device) * 1e-2, mesh, p.placements)
                built[label] = make(list(model.parameters()))
            times = {label: [] for label in built}
            for label, opt in built.items():
                for _ in range(1 + args.warmup):
                    opt.step()
            for r in range(args.repeats):
                labels = list(built)
                for label in labels[r % len(labels):] + labels[: r % len(labels)]:
                    dist.barrier()
                    times[label].append(step_time.timed(built[label].step, device))
            med = {label: statistics.median(ts) * 1e3 for label, ts in times.items()}
            paths = {label: getattr(opt, "step_path", lambda: "torch")() for label, opt in built.items()}
            rows.append((name, mode, med["kernel"], paths["kernel"], med["foreach"], med["foreach"] / med["kernel"],
                         med["torch.AdamW/foreach"]))
            if rank == 0:
                print(f"{name}/{mode}: kernel {med['kernel']:.2f} ms ({paths['kernel']}), foreach {med['foreach']:.2f} "
                      f"ms, x{med['foreach'] / med['kernel']:.2f}; torch AdamW foreach {med['torch.AdamW/foreach']:.2f} ms",
                      flush=True)
            del built
    if rank == 0:
        info = step_time.machine(device)
        info["processes"] = world
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        n = sum(torch.Size(s).numel() for s in shapes)
        md = [f"# Optimizer step per process under FSDP2: `{args.params}` ({n / 1e6:.1f}M parameters, {world} processes)",
              "", "Command: `torchrun --nproc_per_node " + str(world) + " benchmarks/fsdp2_step_time.py "
              + " ".join(argv if argv is not None else sys.argv[1:]) + "`", "", "| machine | |", "|---|---|",
              *[f"| {k} | {v} |" for k, v in info.items()], "",
              f"Median of {args.repeats} interleaved rounds on rank 0 (a barrier before each step).", "",
              "| optimizer | mode | kernel ms | kernel path | foreach ms | foreach / kernel | torch AdamW foreach ms |",
              "|---|---|---:|---|---:|---:|---:|"]
        md += [f"| {a} | {b} | {c:.2f} | {d} | {e:.2f} | {f:.2f} | {g:.2f} |" for a, b, c, d, e, f, g in rows]
        (out / f"fsdp2_step_time_{args.params}_{device.type}_{world}p.md").write_text("\n".join(md) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
