"""Launched with 2 processes (``accelerate launch --multi_gpu --num_processes 2``, CPU, gloo).

For every registry optimizer in win and win2 it trains ``TinyNet`` for a few steps twice:
1. DDP through ``Accelerator(cpu=True).prepare`` (the optimizer's own clipping on: under DDP every
   process holds the full, averaged gradient, so the clipping norm is the global one);
2. DDP + ``torch.distributed.optim.ZeroRedundancyOptimizer(optimizer_class=<Win optimizer>)`` (each
   process keeps the state of about half of the parameters);
3. FSDP2: ``torch.distributed.fsdp.fully_shard`` per layer on a CPU device mesh (DTensor parameters), the
   optimizer's own clipping on; and again with ``CPUOffloadPolicy`` (FSDP2's optimizer offload: the
   sharded parameters and the step on the CPU). (FSDP2 through ``WinTrainer`` / Accelerate is tested in
   ``test_distributed_fsdp2_trainer.py``.) The path each FSDP2 run's step took is recorded. LAMB-Win (the
   kernel sums its norms over the processes between stages) also runs on the Triton kernel, under Triton's
   interpreter (``HF_WIN_FUSED_BACKEND=triton``), when triton imports.
Rank 0 writes the final parameters, the per-process optimizer-state bytes and the refusal message for the
optimizer's own clipping under ZeroRedundancyOptimizer to ``argv[1]``.
"""

import importlib.util
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor

import common
from hf_win.registry import get_optimizer_spec


class Uneven(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(1, 5))
        self.b = torch.nn.Parameter(torch.randn(3, 4))

    def forward(self):
        return self.a.sum() * 2 + (self.a ** 2).sum() + (self.b ** 2).sum()


def local_batches(rank, world):
    x, labels = common.make_data()
    per = common.GLOBAL_BATCH // world
    for step in range(common.STEPS):
        lo = step * common.GLOBAL_BATCH + rank * per
        yield x[lo : lo + per], labels[lo : lo + per]


def train(model, opt, rank, world):
    for xb, yb in local_batches(rank, world):
        opt.zero_grad(set_to_none=True)
        model(xb, yb)["loss"].backward()
        opt.step()


def main(out_path):
    torch.set_num_threads(1)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernel on CPU tensors (fsdp2_triton)
    acc = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo", timeout=timedelta(seconds=60))])
    rank, world = acc.process_index, acc.num_processes
    assert world == 2 and dist.get_backend() == "gloo", (world, dist.get_backend() if dist.is_initialized() else None)
    mesh = init_device_mesh("cpu", (world,))
    results, memory, errors, paths = {}, {}, {}, {}
    for name, mode in common.combos():
        cls = get_optimizer_spec(name).cls
        # 1. DDP, optimizer clipping on (max_grad_norm=common.CLIP: correct under DDP, the gradients are the full ones).
        model = common.make_model()
        opt = cls(common.param_groups(model), **common.optimizer_kwargs(name, mode, max_grad_norm=common.CLIP))
        ddp_model, opt = acc.prepare(model, opt)
        assert isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel)
        train(ddp_model, opt, rank, world)
        results[f"ddp/{name}/{mode}"] = {n: p.detach().clone() for n, p in acc.unwrap_model(ddp_model).named_parameters()}
        ddp_bytes = opt.optimizer.state_bytes()
        acc.free_memory()

        # 2. ZeroRedundancyOptimizer over a DDP model.
        model = common.make_model()
        ddp_model = torch.nn.parallel.DistributedDataParallel(model)
        zero = ZeroRedundancyOptimizer(
            common.param_groups(model), optimizer_class=cls, **common.optimizer_kwargs(name, mode)
        )
        train(ddp_model, zero, rank, world)
        results[f"zero/{name}/{mode}"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        zero_local = [None] * world
        dist.all_gather_object(zero_local, zero.optim.state_bytes())

        # 3. FSDP2: fully_shard on a CPU device mesh; parameters, gradients and optimizer state are DTensor
        #    shards. Optimizer clipping on (max_grad_norm=common.CLIP): norms of DTensors are reduced over processes.
        variants = [("fsdp2", {}), ("fsdp2_cpu_offload", {"offload_policy": CPUOffloadPolicy(pin_memory=False)})]
        if name == "lamb_win" and importlib.util.find_spec("triton") is not None:
            variants.append(("fsdp2_triton", {}))
        for variant, policy in variants:
            saved = os.environ.get("HF_WIN_FUSED_BACKEND")
            if variant == "fsdp2_triton":
                os.environ["HF_WIN_FUSED_BACKEND"] = "triton"
            try:
                model = common.make_model()
                for layer in (model.inp, model.norm, model.h1, model.h2, model.out):
                    fully_shard(layer, mesh=mesh, **policy)
                fully_shard(model, mesh=mesh, **policy)
                assert all(isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in model.parameters())
                opt = cls(common.param_groups(model), **common.optimizer_kwargs(name, mode, max_grad_norm=common.CLIP))
                train(model, opt, rank, world)
            finally:
                os.environ.pop("HF_WIN_FUSED_BACKEND", None)
                if saved is not None:
                    os.environ["HF_WIN_FUSED_BACKEND"] = saved
            results[f"{variant}/{name}/{mode}"] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
            paths[f"{variant}/{name}/{mode}"] = opt.step_path()
        fsdp_local = [None] * world
        dist.all_gather_object(fsdp_local, sum(v.to_local().numel() * v.element_size() for s in opt.state.values()
                                               for v in s.values() if isinstance(v, DTensor)))
        memory[f"{name}/{mode}"] = {"ddp_per_process": ddp_bytes, "zero_per_process": zero_local,
                                    "fsdp2_per_process": fsdp_local}

    # An uneven split: a (1, 5) parameter leaves rank 1 an empty local shard, which still takes part in the
    # kernel's all-reduce of LAMB's norms (against the same model unsharded, in this process).
    for sharded in (False, True):
        torch.manual_seed(0)
        model = Uneven()
        if sharded:
            fully_shard(model, mesh=mesh)
        opt = get_optimizer_spec("lamb_win").cls(model.parameters(), lr=common.LR, weight_decay=common.WEIGHT_DECAY,
                                                 acceleration_mode="win2", max_grad_norm=common.CLIP)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            model().backward()
            opt.step()
        key = "uneven/fsdp2" if sharded else "uneven/one_process"
        results[key] = {n: (p.full_tensor() if sharded else p).detach().clone() for n, p in model.named_parameters()}
        paths[key] = opt.step_path()
    local_sizes = [None] * world
    dist.all_gather_object(local_sizes, [p.to_local().numel() for p in model.parameters()])
    paths["uneven/local_sizes"] = local_sizes

    # The optimizer's own clipping would see only this process's parameters: refused at construction.
    model = common.make_model()
    try:
        ZeroRedundancyOptimizer(model.parameters(), optimizer_class=get_optimizer_spec("adamw_win").cls,
                                lr=common.LR, max_grad_norm=1.0)
        errors["zero_clip"] = None
    except ValueError as e:
        errors["zero_clip"] = str(e)

    if rank == 0:
        torch.save({"params": results, "memory": memory, "errors": errors, "paths": paths,
                    "n_params": sum(p.numel() for p in model.parameters())}, out_path)
    dist.barrier()
    acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
