#!/usr/bin/env python
"""Image classification with the Win / Win2 optimizers and the Hugging Face Trainer.

In the style of ``transformers/examples/pytorch/image-classification/run_image_classification.py``: one
``HfArgumentParser`` over the model, data and augmentation arguments and :class:`hf_win.WinTrainingArguments`;
training with :class:`hf_win.WinTrainer`.

    # the built-in offline default: a small ViT from scratch on scikit-learn's handwritten digits
    python run_image_classification.py

    # a recipe of the paper (an argument file; command-line arguments after it override its values)
    python run_image_classification.py configs/vit_small_adamw_win2.yaml --train_dir ... --validation_dir ...

    # fine-tune a checkpoint on a local image folder (ImageNet layout: one sub-folder per class)
    python run_image_classification.py --model_name_or_path PATH --train_dir DIR --validation_dir DIR \
        --optim adamw_win --acceleration_mode win2 --learning_rate 1e-4 --output_dir out

Data: ``--dataset_name`` (``datasets`` name or local path; ``--streaming`` for ImageNet-sized sets), or
``--train_dir`` / ``--validation_dir`` (image folders), or nothing (the digits). Augmentation: per image,
random-resized-crop, horizontal flip and RandAugment (kornia) in the data loader; per batch, mixup / cutmix on
the device. Metrics: top-1 / top-5 accuracy from the project's ``evaluate`` module, in ``all_results.json``.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared module beside this script
from image_classification_utils import (  # noqa: E402
    BatchAugment, UsageError, build_model, decay_parameter_names, load_data, prepare_datasets, soft_target_loss,
    split_and_check, top_k,
)
import image_classification_utils as utils  # noqa: E402
from hf_win import WinTrainer, WinTrainingArguments  # noqa: E402
from hf_win.metrics import load_top_k_accuracy  # noqa: E402

logger = logging.getLogger("run_image_classification")

# The offline default's training arguments (the model, data and augmentation ones are the shared module's).
DIGITS_TRAINING_DEFAULTS: Dict[str, Any] = {
    "optim": "adamw_win",
    "acceleration_mode": "win2",
    "learning_rate": 2e-3,
    "weight_decay": 0.05,
    "warmup_steps": 0.1,
    "lr_scheduler_type": "cosine",
    "num_train_epochs": 20,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 128,
    "eval_strategy": "no",
    "save_strategy": "no",
    "logging_steps": 50,
    "report_to": "none",
    "do_train": True,
    "do_eval": True,
    "output_dir": os.path.join(tempfile.gettempdir(), "hf_win-vit-digits"),
}


def parse_arguments(argv: Optional[Sequence[str]] = None):
    """``(model_args, data_args, aug_args, training_args, used_default_data)``; see ``utils.parse_arguments``."""
    model_args, data_args, aug_args, training_args, default_data = utils.parse_arguments(
        argv, WinTrainingArguments, DIGITS_TRAINING_DEFAULTS)
    if not training_args.do_train and not training_args.do_eval:
        training_args.do_train = training_args.do_eval = True
    # The transforms read the image column, which the Trainer would otherwise drop before they run.
    training_args.remove_unused_columns = False
    return model_args, data_args, aug_args, training_args, default_data


class ImageClassificationTrainer(WinTrainer):
    """``WinTrainer`` whose training loss takes soft targets (mixup / cutmix / label smoothing, BCE option);
    evaluation is the model's own cross-entropy on normalised inputs."""

    loss_is_scaled_for_ga = False  # our loss is a per-batch mean: the Trainer divides by accumulation steps

    def __init__(self, *args, batch_augment: BatchAugment, bce_loss: bool = False,
                 weight_decay_filter: str = "trainer", **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_augment = batch_augment
        self.bce_loss = bce_loss
        self.weight_decay_filter = weight_decay_filter
        self.label_smoother = None  # label smoothing lives in the soft targets

    def get_decay_parameter_names(self, model) -> List[str]:
        if self.weight_decay_filter == "trainer":
            return super().get_decay_parameter_names(model)
        return decay_parameter_names(model, self.weight_decay_filter)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pixel_values, labels = inputs["pixel_values"], inputs["labels"]
        if model.training:
            x, target = self.batch_augment(pixel_values, labels)
            outputs = model(pixel_values=x)
            loss = soft_target_loss(outputs.logits, target, self.bce_loss)
        else:
            outputs = model(pixel_values=self.batch_augment.normalize(pixel_values), labels=labels)
            loss = outputs.loss
        return (loss, outputs) if return_outputs else loss


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    model_args, data_args, aug_args, training_args, default_data = parse_arguments(argv)

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    if default_data:
        logger.warning("No data argument: training a small %s from scratch on scikit-learn's digits (offline default).",
                       {"vit": "ViT", "resnet": "ResNet"}.get(model_args.model_type, model_args.model_type))
        if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
            # A 0.3M-parameter model on 17 tokens: one thread per op beats several (which spin and wait on each
            # other, badly so on a busy machine). OMP_NUM_THREADS=N overrides.
            torch.set_num_threads(1)
            logger.warning("Tiny model on the CPU: 1 intra-op thread (set OMP_NUM_THREADS to choose).")
    if data_args.streaming and training_args.do_train and training_args.max_steps <= 0:
        raise UsageError("--streaming needs --max_steps (a stream has no length to count epochs from)")

    transformers.set_seed(training_args.seed)
    dataset = load_data(data_args, model_args, default_data)
    dataset, validation_key, labels = split_and_check(dataset, data_args, training_args)
    model, image_processor = build_model(model_args, labels, training_args)

    train_ds, eval_ds = prepare_datasets(data_args, aug_args, dataset, validation_key, image_processor,
                                         training_args.seed, training_args.do_train, training_args.do_eval)

    metric = load_top_k_accuracy(cache_dir=model_args.cache_dir)
    ks = top_k(len(labels))

    def preprocess_logits_for_metrics(logits, _labels):
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        return logits.topk(max(ks), dim=-1).indices  # keep k class ids per image, not all the logits

    def compute_metrics(p):
        return metric.compute(predictions=np.asarray(p.predictions).tolist(),
                              references=np.asarray(p.label_ids).tolist(), k=ks)

    batch_augment = BatchAugment(image_processor.image_mean, image_processor.image_std, len(labels), aug_args,
                                 training_args.label_smoothing_factor, model_args.channels_last)
    trainer = ImageClassificationTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=utils.make_collate(),
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        processing_class=image_processor,
        batch_augment=batch_augment,
        bce_loss=aug_args.bce_loss,
        weight_decay_filter=model_args.weight_decay_filter,
    )
    np.random.seed(training_args.seed)
    random.seed(training_args.seed)

    results: Dict[str, float] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        results.update({f"train_{k}" if not k.startswith("train") else k: v for k, v in train_result.metrics.items()})
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
    card = {"tasks": "image-classification", "finetuned_from": model_args.model_name_or_path,
            "dataset": data_args.dataset_name or ("digits" if default_data else data_args.train_dir)}
    trainer.create_model_card(**{k: v for k, v in card.items() if v})  # says which Win ran (mode, reckless steps)
    if trainer.is_world_process_zero():
        n_eval = None if data_args.streaming or eval_ds is None else len(eval_ds)
        summary = [f"optimizer {training_args.optim} ({getattr(training_args, 'acceleration_mode', '-')})"]
        if "eval_top1_accuracy" in results:
            summary.append(f"top-1 {100 * results['eval_top1_accuracy']:.2f}%")
        if "eval_top5_accuracy" in results:
            summary.append(f"top-5 {100 * results['eval_top5_accuracy']:.2f}%")
        where = f" on {n_eval} held-out images" if n_eval else ""
        if "train_runtime" in results:
            summary.append(f"training {results['train_runtime']:.1f}s")
        print(f"\n*** Result{where}: " + ", ".join(summary))
        print(f"*** Metrics in {os.path.join(training_args.output_dir, 'all_results.json')}")
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
