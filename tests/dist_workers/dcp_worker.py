"""Sharded checkpoints of Win optimizers through ``torch.distributed.checkpoint`` (DCP).

    python dcp_worker.py OUT PHASE[,PHASE...]                       (one process, no process group)
    torchrun --nproc_per_node 2 dcp_worker.py OUT PHASE[,PHASE...]  (FSDP2: fully_shard on a CPU mesh, gloo)

PHASE ``save``: for every registry optimizer in win and win2 (the optimizer's own clipping on), train
``common.STEPS`` steps without stopping; then, in a fresh model and optimizer, train ``SAVE_AT`` steps,
save model and optimizer with ``dcp.save`` under ``OUT/ckpt<world>/<name>_<mode>`` (one combination with
``dcp.async_save``) and resume from it as Accelerate does (``load_fsdp_model`` then
``load_fsdp_optimizer``): a fresh model and optimizer, the model loaded first, then
``get_optimizer_state_dict`` of the fresh optimizer (which creates its state with one step at lr 0 and zero
gradients: it must not move the loaded parameters), ``dcp.load`` into it and ``set_optimizer_state_dict``;
then the remaining steps.

PHASE ``load<W>``: resume, as above, from the checkpoints saved by a run with world size ``W`` and train
the remaining steps.

Rank 0 writes ``OUT/<phase>_world<world>.pt``: full parameters and the full optimizer state (every tensor
gathered from its shards) at the points the test compares, and the bits the optimizer's state creation
moved.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

import common
from hf_win.registry import get_optimizer_spec

SAVE_AT = 2  # steps before the checkpoint; common.STEPS in all
ASYNC = ("adamw_win", "win2")  # the combination saved with dcp.async_save
#: Combinations with other keywords, as "<name>/<mode>/<label>": bfloat16 state (its Win sequences are kept
#: as bfloat16 differences from the parameter: the lr-0 state creation must not move them either)
EXTRA = {"adamw_win/win2/bf16_state": dict(state_dtype="bfloat16")}


def sharded() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def build(name: str, mode: str, mesh, **extra):
    """TinyNet (fully_shard per layer and on the root when ``mesh``) and its Win optimizer (``extra``:
    more keywords for it)."""
    from torch.distributed.fsdp import fully_shard

    model = common.make_model()
    if mesh is not None:
        for layer in (model.inp, model.norm, model.h1, model.h2, model.out):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert all(isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in model.parameters())
    cls = get_optimizer_spec(name).cls
    opt = cls(common.param_groups(model), **common.optimizer_kwargs(name, mode, max_grad_norm=common.CLIP), **extra)
    return model, opt


def train(model, opt, steps: range) -> None:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    x, labels = common.make_data()
    per = common.GLOBAL_BATCH // world
    for step in steps:
        lo = step * common.GLOBAL_BATCH + rank * per
        opt.zero_grad(set_to_none=True)
        model(x[lo : lo + per], labels[lo : lo + per])["loss"].backward()
        opt.step()


def _full(t):
    t = t.full_tensor() if isinstance(t, DTensor) else t
    return t.detach().clone() if isinstance(t, torch.Tensor) else t


def full_params(model) -> dict:
    return {n: _full(p) for n, p in model.named_parameters()}


def full_state(model, opt) -> dict:
    """Every optimizer state entry as ``"<parameter name>/<key>"``: tensors whole, plus each group's
    entries other than ``params`` as ``"group<i>/<key>"``; and which entries were DTensors."""
    sd = get_optimizer_state_dict(model, opt)
    out, dtensors = {}, []
    for fqn, state in sd["state"].items():
        for key, value in state.items():
            out[f"{fqn}/{key}"] = _full(value)
            if isinstance(value, DTensor):
                dtensors.append(f"{fqn}/{key}")
    for i, group in enumerate(sd["param_groups"]):
        for key, value in group.items():
            if key != "params":
                out[f"group{i}/{key}"] = value
    return {"state": out, "dtensors": sorted(dtensors)}


def resume(name: str, mode: str, mesh, ckpt: str, **extra) -> dict:
    """Accelerate's order: model, then optimizer. Returns the loaded state, the bits the optimizer's
    state creation moved, and the parameters after the remaining steps."""
    model, opt = build(name, mode, mesh, **extra)
    model_sd = get_model_state_dict(model)
    dcp.load({"model": model_sd}, checkpoint_id=os.path.join(ckpt, "model"))
    set_model_state_dict(model, model_sd)
    loaded = full_params(model)
    optim_sd = get_optimizer_state_dict(model, opt)  # a fresh optimizer: one step at lr 0, zero gradients
    moved = sum(int((a.view(torch.int32) != b.view(torch.int32)).sum()) for a, b in
                zip(loaded.values(), full_params(model).values()))
    dcp.load({"optim": optim_sd}, checkpoint_id=os.path.join(ckpt, "optim"))
    set_optimizer_state_dict(model, opt, optim_sd)
    state = full_state(model, opt)
    train(model, opt, range(SAVE_AT, common.STEPS))
    return {"moved_bits": moved, "loaded_params": loaded, "loaded_state": state, "final": full_params(model),
            "path": opt.step_path()}


def main(out: str, phases: str) -> None:
    torch.set_num_threads(1)
    mesh = None
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
        if dist.get_world_size() > 1:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    for phase in phases.split(","):
        results = {}
        combos = [(f"{n}/{m}", n, m, {}) for n, m in common.combos()]
        combos += [(key, *key.split("/")[:2], extra) for key, extra in EXTRA.items()]
        for key, name, mode, extra in combos:
            if phase == "save":
                ckpt = os.path.join(out, f"ckpt{world}", key.replace("/", "_"))
                model, opt = build(name, mode, mesh, **extra)
                train(model, opt, range(common.STEPS))
                uninterrupted = full_params(model)
                model, opt = build(name, mode, mesh, **extra)
                train(model, opt, range(SAVE_AT))
                saved = {"params": full_params(model), "state": full_state(model, opt)}
                dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=os.path.join(ckpt, "model"))
                optim_sd = {"optim": get_optimizer_state_dict(model, opt)}
                if (name, mode) == ASYNC and not extra and hasattr(dcp, "async_save"):
                    dcp.async_save(optim_sd, checkpoint_id=os.path.join(ckpt, "optim")).result()
                    saved["async"] = True
                else:
                    dcp.save(optim_sd, checkpoint_id=os.path.join(ckpt, "optim"))
                if dist.is_initialized():
                    dist.barrier()
                results[key] = {"uninterrupted": uninterrupted, "saved": saved,
                                "resumed": resume(name, mode, mesh, ckpt, **extra)}
            elif phase.startswith("load"):
                ckpt = os.path.join(out, f"ckpt{phase[4:]}", key.replace("/", "_"))
                results[key] = {"resumed": resume(name, mode, mesh, ckpt, **extra)}
            else:
                raise SystemExit(f"unknown phase {phase!r}: save or load<world size>")
        if rank == 0:
            torch.save(results, os.path.join(out, f"{phase}_world{world}.pt"))
        if dist.is_initialized():
            dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
