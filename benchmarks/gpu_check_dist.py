"""FSDP2 on the Triton kernel, on a lent GPU: one process, ``fully_shard`` on a 1-GPU mesh (the parameters,
gradients and state are DTensors whose local shards are the whole tensors), every optimizer in win and
win2 with the optimizer's own clipping on, a few steps; the same model unsharded with the same optimizer is
the reference. PASS when the sharded run's ``step_path()`` is the Triton kernel (LAMB: its norms summed
over the mesh between the kernel's stages) and the parameters agree to 1e-5. The 2-process CPU tests
(``tests/test_distributed_ddp.py``) check the same on the C kernel with real shards.

    python benchmarks/gpu_check_dist.py [--device cpu]   # cpu: the check itself, on Triton's interpreter

Writes ``<out>/gpu_check_dist_<device>.md``.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "dist_workers"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["HF_WIN_FUSED_BACKEND"] = "triton"
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import common  # tests/dist_workers/common.py: TinyNet, its data, the optimizer arguments
    from hf_win.registry import get_optimizer_spec

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    mesh = init_device_mesh(args.device, (1,))
    device = torch.device(args.device)
    x, labels = common.make_data()
    x, labels = x.to(device), labels.to(device)
    rows, failed = [], 0
    for name, mode in common.combos():
        runs = {}
        for sharded in (False, True):
            model = common.make_model().to(device)
            if sharded:
                for layer in (model.inp, model.norm, model.h1, model.h2, model.out):
                    fully_shard(layer, mesh=mesh)
                fully_shard(model, mesh=mesh)
            opt = get_optimizer_spec(name).cls(common.param_groups(model),
                                               **common.optimizer_kwargs(name, mode, max_grad_norm=common.CLIP))
            for step in range(args.steps):
                sl = slice(step * common.GLOBAL_BATCH, (step + 1) * common.GLOBAL_BATCH)
                opt.zero_grad(set_to_none=True)
                model(x[sl], labels[sl])["loss"].backward()
                opt.step()
            params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().cpu()
                      for n, p in model.named_parameters()}
            runs[sharded] = (params, opt.step_path())
        diff = common.max_abs_diff(runs[False][0], runs[True][0])
        path = runs[True][1]
        ok = path == "triton kernel" and diff < 1e-5
        failed += not ok
        rows.append(f"| {name} | {mode} | {path} | {runs[False][1]} | {diff:.2e} | {'PASS' if ok else 'FAIL'} |")
        print(rows[-1], flush=True)
    dist.destroy_process_group()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)"
    text = [f"# FSDP2 on the Triton kernel: {name}", "", "Command: `python benchmarks/gpu_check_dist.py "
            + " ".join(argv if argv is not None else sys.argv[1:]) + "`", "",
            "| optimizer | mode | FSDP2 step path | unsharded step path | max abs diff | result |",
            "|---|---|---|---|---:|---|", *rows, "", f"{failed} failed"]
    (out / f"gpu_check_dist_{args.device}.md").write_text("\n".join(text) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
