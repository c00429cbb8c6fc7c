#!/usr/bin/env python
"""Image classification with the Win / Win2 optimizers in your own training loop, with 🤗 Accelerate.

The counterpart of ``transformers/examples/pytorch/image-classification/run_image_classification_no_trainer.py``
(same training flags) beside our Trainer script, whose model and data arguments, datasets and models it uses
(and ``paper_recipes.py``'s augmentation), plus ``--optim``, ``--acceleration_mode``, ``--reckless_steps``. The
optimizer comes from ``hf_win.create_optimizer``.

    python run_image_classification_no_trainer.py                      # the offline default: the digits
    accelerate launch --num_processes 8 run_image_classification_no_trainer.py --train_dir DIR \\
        --validation_dir DIR --optim lamb_win --acceleration_mode win2 --checkpointing_steps 1000 --output_dir out
    torchrun --nproc_per_node 8 run_image_classification_no_trainer.py ...    # the same; no GPU: CPU processes (gloo)
    ... --resume_from_checkpoint out/step_1000

Checkpoints (``--checkpointing_steps N|epoch``) are ``accelerator.save_state`` folders (``step_N``,
``epoch_N``): model, optimizer with its Win state, scheduler, data-loader position and RNG states; a resumed run
continues as the uninterrupted one would. Per-image augmentation is a function of (seed, epoch, image), so it
does not depend on the number of processes. At the end: the model, its image processor and ``all_results.json``
(top-1 / top-5 accuracy).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, set_seed
from transformers import SchedulerType, get_scheduler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the scripts beside this one
import paper_recipes as recipes  # noqa: E402
import run_image_classification as ric  # noqa: E402  (the Trainer script: model and data arguments, datasets, models)
from paper_recipes import UsageError  # noqa: E402
from hf_win import create_optimizer  # noqa: E402
from hf_win.metrics import load_top_k_accuracy  # noqa: E402
from hf_win.optim import MODES  # noqa: E402
from hf_win.registry import OPTIMIZERS  # noqa: E402
from hf_win.training_args import check_win_fields, validate_win_optimizer, win_optimizer_kwargs  # noqa: E402

logger = get_logger(__name__)


@dataclass
class TrainingArguments:
    """The training flags of Hugging Face's no_trainer script, and Win's."""

    output_dir: Optional[str] = field(default=None, metadata={"help": "Where to store the final model."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Batch size (per device) for training."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Batch size (per device) for evaluation."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Initial learning rate (after the warmup)."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay (see --weight_decay_filter)."})
    num_train_epochs: int = field(default=3, metadata={"help": "Total number of training epochs to perform."})
    max_train_steps: Optional[int] = field(default=None, metadata={"help": "Total number of training steps; overrides num_train_epochs."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches to accumulate before an update."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "The scheduler type.", "choices": [t.value for t in SchedulerType]})
    num_warmup_steps: int = field(default=0, metadata={"help": "Number of steps for the warmup in the lr scheduler."})
    seed: int = field(default=42, metadata={"help": "A seed for reproducible training (and the per-image augmentation)."})
    checkpointing_steps: Optional[str] = field(default=None, metadata={"help": "Save the state every n steps, or 'epoch'."})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "A checkpoint folder (step_N or epoch_N) to continue from."})
    with_tracking: bool = field(default=False, metadata={"help": "Log to experiment trackers (--report_to)."})
    report_to: str = field(default="all", metadata={"help": "Trackers for --with_tracking: tensorboard, wandb, ... or all."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global gradient norm (0: off), as the Trainer script."})
    label_smoothing_factor: float = field(default=0.0, metadata={"help": "Label smoothing, folded into the soft targets."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data loader worker processes."})
    cpu: bool = field(default=False, metadata={"help": "Train on CPU processes even where a GPU is visible (accelerate's cpu; "
                                                "the default under a multi-process launch with no GPU)."})
    optim: str = field(default="adamw_win", metadata={"help": "The Win optimizer.", "choices": list(OPTIMIZERS)})
    acceleration_mode: str = field(default="win", metadata={"help": "win (one extra state), win2 (two) or none.", "choices": list(MODES)})
    reckless_steps: List[float] = field(default_factory=lambda: [2.0, 8.0], metadata={"help": "Reckless steps R1 R2 (> 0)."})
    optim_args: Optional[str] = field(default=None, metadata={"help": "Other optimizer keywords 'key=value,...' (as --optim_args of the Trainer)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "First beta (Adam-type optimizers, Adan)."})
    adam_beta2: float = field(default=0.999, metadata={"help": "Second beta (Adam-type optimizers, Adan)."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "Epsilon."})

    def __post_init__(self):
        check_win_fields(self, win=True)
        validate_win_optimizer(self)  # bad hyper-parameters stop here, before anything is built
        steps = self.checkpointing_steps
        if steps is not None and steps != "epoch" and not (steps.isdigit() and int(steps) > 0):
            raise ValueError(f"--checkpointing_steps must be a positive number of steps or 'epoch', got {steps!r}")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ValueError(f"--max_train_steps must be >= 1, got {self.max_train_steps}")
        if self.resume_from_checkpoint and not os.path.isdir(self.resume_from_checkpoint):
            raise ValueError(f"--resume_from_checkpoint {self.resume_from_checkpoint} is not a checkpoint folder")


DIGITS_TRAINING_DEFAULTS: Dict[str, Any] = {  # the Trainer script's offline default, in this script's flags
    "optim": "adamw_win", "acceleration_mode": "win2", "learning_rate": 2e-3, "weight_decay": 0.05,
    "lr_scheduler_type": "cosine", "num_warmup_steps": 46, "num_train_epochs": 20,
    "per_device_train_batch_size": 64, "per_device_eval_batch_size": 128,
    "output_dir": os.path.join(tempfile.gettempdir(), "hf_win-vit-digits-no-trainer"),
}


class SeededTransformDataset(torch.utils.data.Dataset):
    """A map-style dataset whose per-image augmentation is a function of (seed, epoch, index) alone: the same
    image gets the same crop, flip and RandAugment however many processes or loader workers there are, and a
    run resumed mid-epoch sees exactly what the uninterrupted run saw (nothing here touches the global RNG).
    Call :meth:`set_epoch` at the start of every epoch."""

    def __init__(self, ds, transform, data_args, seed: int):
        self.ds, self.transform, self.seed, self.epoch = ds, transform, int(seed), 0
        self.image_column, self.label_column = data_args.image_column_name, data_args.label_column_name

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        example = self.ds[int(i)]
        generator = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + int(i)) % 2**63)
        return {"pixel_values": self.transform(example[self.image_column], generator), "labels": example[self.label_column]}


def parse_arguments(argv: Optional[Sequence[str]] = None):
    """``(model_args, data_args, aug_args, args, used_default_data)``: the Trainer script's model and data
    arguments, the recipes' augmentation arguments and this script's training arguments."""
    return recipes.parse_arguments(
        (ric.ModelArguments, ric.DataTrainingArguments, recipes.AugmentationArguments, TrainingArguments), argv,
        lambda given: ric.digits_defaults(given, DIGITS_TRAINING_DEFAULTS),
        {"cpu": True} if ric.cpu_processes_launch() else {})


def evaluate(model, eval_dataloader, batch_augment, accelerator, metric, ks):
    model.eval()
    predictions, references = [], []
    for batch in eval_dataloader:
        with torch.no_grad():
            logits = model(pixel_values=batch_augment.normalize(batch["pixel_values"])).logits
        ids, labels = accelerator.gather_for_metrics((logits.topk(max(ks), dim=-1).indices, batch["labels"]))
        predictions += ids.tolist()
        references += labels.tolist()
    return {f"eval_{k}": v for k, v in metric.compute(predictions=predictions, references=references, k=ks).items()}


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    model_args, data_args, aug_args, args, default_data = parse_arguments(argv)
    if data_args.streaming and args.max_train_steps is None:
        raise UsageError("--streaming needs --max_train_steps (a stream has no length to count epochs from)")
    tracking = dict(log_with=args.report_to, project_dir=args.output_dir) if args.with_tracking else {}
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    gloo = [InitProcessGroupKwargs(backend="gloo")] if args.cpu and launched > 1 else []  # not MPI where torch has it
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, cpu=args.cpu,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
                              kwargs_handlers=gloo, **tracking)
    if launched > accelerator.num_processes:  # each process would train alone on all the data
        raise UsageError(f"launched as {launched} processes, but Accelerate runs them as {accelerator.num_processes} "
                         f"({accelerator.distributed_type}); --cpu true runs them as CPU processes")
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if ric.cpu_processes_launch():
        logger.warning(f"{launched} processes launched and no GPU visible: training as one job on "
                       f"{accelerator.num_processes} CPU processes ({accelerator.state.backend}).")
    transformers.utils.logging.set_verbosity_warning() if accelerator.is_local_main_process else \
        transformers.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    if accelerator.is_main_process and args.output_dir is not None:
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()

    with accelerator.main_process_first():
        train_dataset, eval_dataset, labels = ric.load_data(data_args, model_args, default_data, args.seed)
        model, image_processor = ric.build_model(model_args, labels, args)
    size, mode = recipes.image_size_and_interpolation(image_processor, aug_args)
    train_transform = recipes.TrainTransform(size, mode, aug_args)
    train_dataset = (ric.with_transform(train_dataset, train_transform, data_args) if data_args.streaming  # global RNG
                     else SeededTransformDataset(train_dataset, train_transform, data_args, args.seed))
    eval_dataset = ric.with_transform(eval_dataset, recipes.EvalTransform(size, mode, aug_args.eval_crop_pct), data_args)
    loader = dict(collate_fn=ric.collate_fn, num_workers=args.dataloader_num_workers)
    # Own generators: creating a loader's iterator does not draw from the global RNG (the step's mixup and drop
    # path do), so a resumed run's global RNG, restored by load_state, is the uninterrupted run's.
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset, shuffle=not data_args.streaming, batch_size=args.per_device_train_batch_size,
        generator=torch.Generator().manual_seed(args.seed), **loader)
    eval_dataloader = torch.utils.data.DataLoader(eval_dataset, batch_size=args.per_device_eval_batch_size,
                                                  generator=torch.Generator().manual_seed(args.seed), **loader)

    decay = set(recipes.decay_parameter_names(model, model_args.weight_decay_filter))
    groups = [{"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": args.weight_decay},
              {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0}]
    _, kwargs = win_optimizer_kwargs(args)  # lr, betas, eps, mode, reckless steps, --optim_args; clipping below
    optimizer = create_optimizer(args.optim, [g for g in groups if g["params"]], **kwargs)

    steps_per_epoch = None if data_args.streaming else math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer,
                                 num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler)
    if steps_per_epoch is not None:  # the loader is now this process's share
        steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
        args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    if args.with_tracking:
        accelerator.init_trackers("image_classification_no_trainer", {k: str(v) for k, v in vars(args).items()})
    batch_augment = recipes.BatchAugment(image_processor.image_mean, image_processor.image_std, len(labels), aug_args,
                                         args.label_smoothing_factor, model_args.channels_last).to(accelerator.device)
    metric, ks = load_top_k_accuracy(cache_dir=model_args.cache_dir), ric.top_k(len(labels))

    total = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"***** Running training: {args.max_train_steps} steps of {total} images, {args.optim} "
                f"({args.acceleration_mode}, reckless steps {tuple(args.reckless_steps)}), {accelerator.num_processes} process(es) *****")
    completed_steps, starting_epoch, resume_batches = 0, 0, 0
    if args.resume_from_checkpoint:
        accelerator.print(f"Resumed from checkpoint: {args.resume_from_checkpoint}")
        accelerator.load_state(args.resume_from_checkpoint)
        name = os.path.basename(os.path.normpath(args.resume_from_checkpoint))
        if name.startswith("epoch_"):
            starting_epoch = int(name[len("epoch_"):]) + 1
            completed_steps = starting_epoch * steps_per_epoch
        elif name.startswith("step_") and steps_per_epoch is not None:
            completed_steps = int(name[len("step_"):])
            starting_epoch = completed_steps // steps_per_epoch
            resume_batches = (completed_steps - starting_epoch * steps_per_epoch) * args.gradient_accumulation_steps
        else:
            raise UsageError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: not a step_N or epoch_N "
                             "folder of this script (or a stream, which cannot resume mid-epoch)")

    def save(name):
        accelerator.save_state(os.path.join(args.output_dir or ".", name))

    eval_metrics, train_loss = {}, float("nan")
    for epoch in range(starting_epoch, args.num_train_epochs):
        model.train()
        train_dataloader.set_epoch(epoch)
        if hasattr(train_dataset, "set_epoch"):
            train_dataset.set_epoch(epoch)
        skip = resume_batches if epoch == starting_epoch else 0
        active = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        losses = []
        for batch in active:
            with accelerator.accumulate(model):
                x, target = batch_augment(batch["pixel_values"], batch["labels"])
                loss = recipes.soft_target_loss(model(pixel_values=x).logits, target, aug_args.bce_loss)
                losses.append(loss.detach())
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                completed_steps += 1
                if args.checkpointing_steps not in (None, "epoch") and completed_steps % int(args.checkpointing_steps) == 0:
                    save(f"step_{completed_steps}")
            if completed_steps >= args.max_train_steps:
                break
        if losses:
            train_loss = float(accelerator.gather(torch.stack(losses).mean()[None]).mean())
        eval_metrics = evaluate(model, eval_dataloader, batch_augment, accelerator, metric, ks)
        logger.info(f"epoch {epoch}: train_loss {train_loss:.4f}, {eval_metrics}")
        if args.with_tracking:
            accelerator.log({"train_loss": train_loss, **eval_metrics, "epoch": epoch}, step=completed_steps)
        if args.checkpointing_steps == "epoch":
            save(f"epoch_{epoch}")
        if completed_steps >= args.max_train_steps:
            break
    if args.with_tracking:
        accelerator.end_training()

    results = {**eval_metrics, "train_loss": train_loss, "train_steps": completed_steps}
    if args.output_dir is not None:
        accelerator.wait_for_everyone()
        # get_state_dict gathers the whole parameters under FSDP (every process takes part)
        accelerator.unwrap_model(model).save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process,
                                                        save_function=accelerator.save,
                                                        state_dict=accelerator.get_state_dict(model))
        if accelerator.is_main_process:
            image_processor.save_pretrained(args.output_dir)
            with open(os.path.join(args.output_dir, "all_results.json"), "w") as f:
                json.dump({**results, "optimizer": args.optim, "acceleration_mode": args.acceleration_mode,
                           "reckless_steps": list(args.reckless_steps), "optim_args": args.optim_args}, f, indent=2)
    accelerator.print(f"*** Result: optimizer {args.optim} ({args.acceleration_mode}), "
                      + ", ".join(f"{k[5:]} {100 * v:.2f}%" for k, v in eval_metrics.items()))
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        run(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
