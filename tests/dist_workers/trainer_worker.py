"""Launched with 2 processes (``torchrun``, CPU, gloo). Trains ``TinyNet`` with ``hf_win.WinTrainer``:

    python trainer_worker.py OUT.pt MODE[,MODE...] [OPTIMIZERS]

MODE is ``ddp`` or ``zero1``, ``zero2``, ``zero3`` (``--deepspeed configs/deepspeed/zeroN.json``). (FSDP2
through the Trainer needs a GPU-type device: Accelerate 1.15 turns FSDP on only for those; FSDP2 itself is
tested on CPU in ``ddp_worker.py``.) Every run uses ``--use_cpu`` (without it, each process of a
CPU torchrun believes it is alone and trains on all the data). For each mode and each (optimizer,
win|win2) it records the final full parameters; for the ZeRO modes it also trains 2 steps, saves a
checkpoint, resumes from it in a new Trainer for the last 2 steps and records those parameters; and it
records the error LAMB-Win stops with under ZeRO. Rank 0 writes everything to OUT.pt.
"""

import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

import common
from hf_win import WinTrainer, WinTrainingArguments

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ZERO_MODES = {"zero1": 1, "zero2": 2, "zero3": 3}


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
    kw.update(extra)
    return WinTrainingArguments(**kw)


def full_params(trainer, mode):
    if mode == "zero3":
        from deepspeed.utils import safe_get_full_fp32_param

        return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in trainer.model_wrapped.module.named_parameters()}
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def reset():
    """Let the next Trainer in this process build its own Accelerator / DeepSpeed state."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    AcceleratorState._reset_state()
    for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        os.environ.pop(key, None)


def train(out_dir, name, opt_mode, mode, world, resume=None, **extra):
    args = make_args(out_dir, name, opt_mode, mode, world, **extra)
    trainer = WinTrainer(model=common.make_model(), args=args, train_dataset=Data())
    trainer.train(resume_from_checkpoint=resume)
    params = full_params(trainer, mode)
    state_bytes = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    state_bytes = sum(v.numel() * v.element_size() for s in getattr(state_bytes, "state", {}).values()
                      for v in s.values() if torch.is_tensor(v))
    if mode in ZERO_MODES:
        trainer.model_wrapped.destroy()
    trainer.accelerator.free_memory()
    del trainer
    reset()
    return params, state_bytes


def main(out_path, modes, names):
    torch.set_num_threads(1)
    results, errors, memory, seconds = {}, {}, {}, {}
    tmp = os.path.join(os.path.dirname(os.path.abspath(out_path)), "runs")  # shared by the ranks
    world = int(os.environ["WORLD_SIZE"])
    for mode in modes:
        t0 = time.time()
        combos = common.combos(names)
        if mode in ZERO_MODES:
            combos = [c for c in combos if c[0] != "lamb_win"]
        for name, opt_mode in combos:
            key = f"{mode}/{name}/{opt_mode}"
            results[key], memory[key] = train(os.path.join(tmp, key), name, opt_mode, mode, world)
        if mode in ZERO_MODES:
            # Resume from a ZeRO checkpoint: 2 steps + checkpoint, then a new Trainer resumes to step 4.
            name, opt_mode = ("adan_win", "win2") if mode != "zero2" else ("adamw_win", "win")
            run_dir = os.path.join(tmp, mode, "resume")
            train(run_dir, name, opt_mode, mode, world, max_steps=2, save_strategy="steps", save_steps=2)
            ckpt = os.path.join(run_dir, "checkpoint-2")
            results[f"{mode}/resume/{name}/{opt_mode}"], _ = train(run_dir, name, opt_mode, mode, world, resume=ckpt)
            # LAMB-Win's trust ratio cannot be computed on ZeRO's flattened partitions: refused at start.
            try:
                train(os.path.join(tmp, mode, "lamb"), "lamb_win", "win", mode, world)
                errors[mode] = None
            except ValueError as e:
                errors[mode] = f"{type(e).__name__}: {e}"
                reset()
        seconds[mode] = time.time() - t0
    if dist.get_rank() == 0:
        torch.save({"params": results, "errors": errors, "state_bytes": memory, "seconds": seconds}, out_path)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",") if len(sys.argv) > 3 else None)
