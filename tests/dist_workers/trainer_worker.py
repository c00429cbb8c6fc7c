"""Launched with 2 processes (``torchrun``, CPU, gloo). Trains ``TinyNet`` with ``hf_win.WinTrainer``:

    python trainer_worker.py OUT.pt MODE[,MODE...] [OPTIMIZERS]

MODE is ``ddp``, ``zero1``, ``zero2``, ``zero3`` (``--deepspeed configs/deepspeed/zeroN.json``),
``zero2_offload``, ``zero3_offload`` (ZeRO-Offload: ``configs/deepspeed/zeroN_offload.json``) or
``fsdp2`` (``--fsdp`` with ``fsdp_config={"version": 2, ...}``: Accelerate's own FSDP2 path,
``fully_shard`` per layer on a CPU device mesh). Every run uses ``--use_cpu`` (without it, each process of
a CPU torchrun believes it is alone and trains on all the data). For each mode and each (optimizer,
win|win2) it records the final full parameters, this process's optimizer-state bytes and the distributed
type Accelerate ran with (for fsdp2 also the evidence that it was sharded); for the ZeRO modes it also
trains 2 steps, saves a checkpoint, resumes from it in a new Trainer for the last 2 steps and records those
parameters; and it records the error LAMB-Win stops with under ZeRO. Rank 0 writes everything to OUT.pt.

TEST-ONLY shim for fsdp2 (``allow_fsdp_on_cpu``; nothing in ``hf_win`` does this): Accelerate 1.15 turns
an ``fsdp_plugin`` into ``DistributedType.FSDP`` only when the processes' type is a GPU-type one
(``MULTI_GPU``, ``MULTI_XPU``, ... in ``AcceleratorState.__init__``); on CPU processes (``MULTI_CPU``) it
silently drops the plugin and runs DDP. The shim wraps ``AcceleratorState.__init__`` and, when an
``fsdp_plugin`` was given and the type came out ``MULTI_CPU``, does what that branch does for GPUs: sets
``distributed_type = FSDP``, stores the plugin, and publishes the type to ``PartialState`` (as the end of
``AcceleratorState.__init__`` does). From there everything is Accelerate's and the Trainer's own code:
``Trainer`` sees ``is_fsdp_enabled``, builds the optimizer first (FSDP2), ``Accelerator.prepare`` runs
``fsdp2_prepare_model`` (``fully_shard`` over the default CPU mesh, here 6 units) and swaps the
optimizer's parameters for the DTensor ones, and the Trainer clips DTensor gradients. It is test-only
because it patches Accelerate's device policy (which may have other reasons on CPU, e.g. mixed precision
or offload, not exercised here); on GPUs none of it is needed. The worker records that the run really was
sharded (every parameter a DTensor with Shard placements holding half of it, per-process state halved).
"""

import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

from torch.distributed.tensor import DTensor, Shard

import common
from hf_win import WinTrainer, WinTrainingArguments

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ZERO_MODES = {"zero1": 1, "zero2": 2, "zero3": 3, "zero2_offload": 2, "zero3_offload": 3}
# FSDP2 through the Trainer: each Linear / LayerNorm its own fully_shard unit (size-based wrap), then the root.
FSDP_CONFIG = {"version": 2, "auto_wrap_policy": "SIZE_BASED_WRAP", "min_num_params": 30}


def allow_fsdp_on_cpu():
    """TEST-ONLY shim (see the module docstring): let Accelerate take its FSDP path on CPU processes."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_hf_win_cpu_fsdp", False):
        return

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # What AcceleratorState.__init__ does for MULTI_GPU & co. when given an fsdp_plugin, including
            # publishing the type to PartialState (every later AcceleratorState() copies PartialState's).
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    __init__._hf_win_cpu_fsdp = True
    AcceleratorState.__init__ = __init__


class Data(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.labels = common.make_data()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.labels[i]}


def make_args(out_dir, name, opt_mode, mode, world, **extra):
    kw = dict(
        output_dir=out_dir, optim=name, acceleration_mode=opt_mode, learning_rate=common.LR,
        weight_decay=common.WEIGHT_DECAY, per_device_train_batch_size=common.GLOBAL_BATCH // world,
        max_steps=common.STEPS, lr_scheduler_type="constant", max_grad_norm=common.TRAINER_MAX_GRAD_NORM,
        train_sampling_strategy="sequential", use_cpu=True, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
        seed=0, ddp_timeout=120,
    )
    if mode in ZERO_MODES:
        kw["deepspeed"] = os.path.join(ROOT, "configs", "deepspeed", f"{mode}.json")
    if mode == "fsdp2":
        kw["fsdp"] = True
        kw["fsdp_config"] = dict(FSDP_CONFIG)
    kw.update(extra)
    return WinTrainingArguments(**kw)


def full_params(trainer, mode):
    if ZERO_MODES.get(mode) == 3:
        from deepspeed.utils import safe_get_full_fp32_param

        return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in trainer.model_wrapped.module.named_parameters()}
    if mode == "fsdp2":
        return {n: p.full_tensor().detach().clone() for n, p in trainer.model.named_parameters()}
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _is_shard(p):
    return (isinstance(p, DTensor) and all(isinstance(pl, Shard) for pl in p.placements)
            and p.to_local().numel() < p.numel())


def reset():
    """Let the next Trainer in this process build its own Accelerator / DeepSpeed state."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    AcceleratorState._reset_state()
    # AcceleratorState publishes its type to PartialState (which _reset_state keeps): undo FSDP's.
    if PartialState._shared_state.get("distributed_type") == DistributedType.FSDP:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_CPU
    for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        os.environ.pop(key, None)


def train(out_dir, name, opt_mode, mode, world, resume=None, **extra):
    """Returns (full parameters, this process's optimizer-state bytes, facts about the run)."""
    args = make_args(out_dir, name, opt_mode, mode, world, **extra)
    trainer = WinTrainer(model=common.make_model(), args=args, train_dataset=Data())
    trainer.train(resume_from_checkpoint=resume)
    params = full_params(trainer, mode)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    state_bytes = sum(_local(v).numel() * v.element_size() for s in getattr(inner, "state", {}).values()
                      for v in s.values() if torch.is_tensor(v))
    info = {"distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1],
            "optimizer": type(inner).__name__}
    if mode == "fsdp2":
        # Evidence that the run was really sharded: every model parameter, and every parameter the optimizer
        # steps, is a DTensor with Shard placements holding part of the tensor; the state bytes of each process.
        opt_params = [p for g in inner.param_groups for p in g["params"]]
        model_params = [p for _, p in trainer.model.named_parameters()]
        per_process = [None] * world
        dist.all_gather_object(per_process, state_bytes)
        info.update(
            state_bytes_per_process=per_process,
            sharded=all(map(_is_shard, model_params)) and all(map(_is_shard, opt_params)),
            optimizer_steps_model_params={id(p) for p in opt_params} == {id(p) for p in model_params},
            fsdp_units=sum(type(m).__name__.startswith("FSDP") for m in trainer.model.modules()),
        )
    if mode in ZERO_MODES:
        zero = trainer.model_wrapped.optimizer  # DeepSpeed's ZeRO optimizer around ours
        info["offload"] = bool(getattr(zero, "cpu_offload", False) or getattr(zero, "offload_optimizer", False))
        info["step_path"] = zero.optimizer.step_path()  # what stepped the (offloaded) fp32 partitions
        info["state_devices"] = sorted({str(p.device) for p in zero.optimizer.state})
        trainer.model_wrapped.destroy()
    trainer.accelerator.free_memory()
    del trainer
    reset()
    return params, state_bytes, info


def main(out_path, modes, names):
    torch.set_num_threads(1)
    results, errors, memory, seconds, infos = {}, {}, {}, {}, {}
    tmp = os.path.join(os.path.dirname(os.path.abspath(out_path)), "runs")  # shared by the ranks
    world = int(os.environ["WORLD_SIZE"])
    if "fsdp2" in modes:
        # Without the shim, Accelerate would drop --fsdp on CPU processes: WinTrainer refuses at construction.
        def refusal(launch_mode):
            """The ValueError WinTrainer raises at construction, or None if it builds."""
            try:
                WinTrainer(model=common.make_model(), args=make_args(os.path.join(tmp, "noshim"), "adamw_win",
                                                                      "win", launch_mode, world), train_dataset=Data())
                return None
            except ValueError as e:
                return str(e)
            finally:
                reset()

        errors["fsdp2_without_shim"] = refusal("fsdp2")
        os.environ["ACCELERATE_USE_FSDP"] = "true"  # what accelerate launch with an FSDP config sets
        errors["accelerate_fsdp_without_shim"] = refusal("ddp")
        allow_fsdp_on_cpu()
    for mode in modes:
        t0 = time.time()
        combos = common.combos(names)
        if mode in ZERO_MODES:
            combos = [c for c in combos if c[0] != "lamb_win"]
        for name, opt_mode in combos:
            key = f"{mode}/{name}/{opt_mode}"
            results[key], memory[key], infos[key] = train(os.path.join(tmp, key), name, opt_mode, mode, world)
        if mode in ZERO_MODES:
            # Resume from a ZeRO checkpoint: 2 steps + checkpoint, then a new Trainer resumes to step 4.
            name, opt_mode = ("adan_win", "win2") if ZERO_MODES[mode] != 2 else ("adamw_win", "win")
            run_dir = os.path.join(tmp, mode, "resume")
            train(run_dir, name, opt_mode, mode, world, max_steps=2, save_strategy="steps", save_steps=2)
            ckpt = os.path.join(run_dir, "checkpoint-2")
            results[f"{mode}/resume/{name}/{opt_mode}"], _, _ = train(run_dir, name, opt_mode, mode, world, resume=ckpt)
            # LAMB-Win's trust ratio cannot be computed on ZeRO's flattened partitions: refused at start.
            try:
                train(os.path.join(tmp, mode, "lamb"), "lamb_win", "win", mode, world)
                errors[mode] = None
            except ValueError as e:
                errors[mode] = f"{type(e).__name__}: {e}"
                reset()
        seconds[mode] = time.time() - t0
    if dist.get_rank() == 0:
        torch.save({"params": results, "errors": errors, "state_bytes": memory, "info": infos,
                    "seconds": seconds}, out_path)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",") if len(sys.argv) > 3 else None)
