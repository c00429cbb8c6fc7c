#!/usr/bin/env python
"""Image classification with the Win / Win2 optimizers and the Hugging Face Trainer.

Hugging Face's ``examples/pytorch/image-classification/run_image_classification.py`` with ``hf_win.WinTrainer``
and ``hf_win.WinTrainingArguments``; what the Win paper's ImageNet recipes need beyond it (argument files, timm's
augmentation, stochastic depth, ...) is in ``paper_recipes.py`` beside this file.

    python run_image_classification.py               # offline default: a small ViT on scikit-learn's digits
    python run_image_classification.py configs/vit_small_adamw_win_win2.yaml --train_dir DIR --validation_dir DIR
    python run_image_classification.py --model_name_or_path PATH --train_dir DIR --optim adamw_win \
        --acceleration_mode win2 --learning_rate 1e-4 --output_dir out
    torchrun --nproc_per_node 2 run_image_classification.py ...   # no GPU: one job on 2 CPU processes (gloo)

Data: ``--dataset_name`` (``--streaming`` for ImageNet-sized sets), ``--train_dir`` / ``--validation_dir``
(image folders), or nothing (the digits). Top-1 / top-5 accuracy end up in ``all_results.json``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # paper_recipes.py beside this script
import paper_recipes as recipes  # noqa: E402
from paper_recipes import AugmentationArguments, BatchAugment, UsageError  # noqa: E402
from hf_win import WinTrainer, WinTrainingArguments  # noqa: E402
from hf_win.metrics import load_top_k_accuracy  # noqa: E402

logger = logging.getLogger("run_image_classification")
SPLIT_SEED = 42  # the held-out split does not move with --seed, so runs with different seeds compare


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "A checkpoint (local path or Hub id) to fine-tune; unset: train from scratch."})
    model_type: str = field(
        default="vit", metadata={"help": "From scratch: a model type with an image-classification head (vit, resnet, ...)."})
    config_overrides: Optional[str] = field(
        default=None,
        metadata={"help": "From scratch: override config defaults, e.g. 'hidden_size=384,num_hidden_layers=12'; lists in "
                  "brackets, e.g. ResNet-101: 'layer_type=bottleneck,depths=[3,4,23,3],hidden_sizes=[256,512,1024,2048]'."},
    )
    image_size: Optional[int] = field(
        default=None, metadata={"help": "From scratch: input size for a model whose config has none (ResNet; 224)."})
    channels_last: bool = field(default=False, metadata={"help": "Channels-last model and inputs (timm --channels-last)."})
    zero_init_residual: bool = field(
        default=False, metadata={"help": "From scratch, ResNet: each block starts as the identity (timm's zero_init_last)."})
    config_name: Optional[str] = field(default=None, metadata={"help": "A config (name or path) if not the model's."})
    image_processor_name: Optional[str] = field(default=None, metadata={"help": "An image processor if not the model's."})
    image_mean: Optional[List[float]] = field(default=None, metadata={"help": "Normalisation mean (3 numbers)."})
    image_std: Optional[List[float]] = field(default=None, metadata={"help": "Normalisation std (3 numbers)."})
    torch_dtype: Optional[str] = field(
        default=None,
        metadata={"help": "Keep the parameters in this dtype; inputs are cast to it. Pure-bfloat16 training: --torch_dtype "
                  "bfloat16 --optim_args state_dtype=bfloat16,bf16_stochastic_round=true (--bf16 autocasts instead).",
                  "choices": ["float32", "bfloat16", "float16"]},
    )
    drop_path_rate: float = field(
        default=0.0, metadata={"help": "Stochastic depth (timm --drop-path), rising linearly over the layers to this rate."})
    weight_decay_filter: str = field(
        default="trainer",
        metadata={"help": "Which parameters get weight decay: 'trainer' (all but biases and norm weights), 'timm' (all but "
                  "1-d parameters, position embeddings, class token), 'all' (timm --bias-decay).",
                  "choices": ["trainer", "timm", "all"]},
    )
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where to cache downloaded models and datasets."})
    model_revision: str = field(default="main", metadata={"help": "Model version (branch, tag or commit)."})
    token: Optional[str] = field(default=None, metadata={"help": "Hub token for private models or datasets."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom code from the Hub."})
    ignore_mismatched_sizes: bool = field(default=False, metadata={"help": "A new classifier for another number of labels."})

    def __post_init__(self):
        scratch_only = [f"--{n}" for n in ("config_overrides", "zero_init_residual") if getattr(self, n)]
        if self.model_name_or_path is not None and scratch_only:
            raise ValueError(f"{scratch_only[0]} only applies when training from scratch (without --model_name_or_path)")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                raise ValueError(f"--{name} takes 3 numbers (one per RGB channel), got {value}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"--drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"--image_size must be >= 1, got {self.image_size}")


@dataclass
class DataTrainingArguments:
    dataset_name: Optional[str] = field(default=None, metadata={"help": "A Hub dataset (ILSVRC/imagenet-1k) or a local path."})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "The dataset's configuration name."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset (no download; needs --max_steps)."})
    train_dir: Optional[str] = field(default=None, metadata={"help": "A folder of training images, a sub-folder per class."})
    validation_dir: Optional[str] = field(default=None, metadata={"help": "A folder of validation images, likewise."})
    image_column_name: str = field(default="image", metadata={"help": "The dataset column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "The dataset column holding the labels."})
    train_val_split: float = field(default=0.15, metadata={"help": "Share of the training set held out if no validation split."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many training images."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many validation images."})

    def __post_init__(self):
        if not 0.0 < self.train_val_split < 1.0:
            raise ValueError(f"--train_val_split must be in (0, 1), got {self.train_val_split}")
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")


# The offline default (no data argument anywhere): model, data and augmentation values, under the user's; each
# script adds its training values. The model's size follows --model_type.
DIGITS_DEFAULTS: Dict[str, Any] = {
    "train_val_split": 0.2,
    "random_resized_crop_scale": [0.6, 1.0],
    "horizontal_flip_prob": 0.0,  # a flipped digit is another glyph
}
DIGITS_MODELS: Dict[str, Dict[str, Any]] = {
    "vit": {"config_overrides": "image_size=16,patch_size=4,num_channels=3,hidden_size=96,num_hidden_layers=4,"
            "num_attention_heads=4,intermediate_size=192,hidden_dropout_prob=0.0,attention_probs_dropout_prob=0.0"},
    "resnet": {"config_overrides": "layer_type=bottleneck,embedding_size=32,hidden_sizes=[64,128],depths=[1,1]",
               "image_size": 16},
}
DIGITS_TRAINING_DEFAULTS: Dict[str, Any] = {
    "optim": "adamw_win", "acceleration_mode": "win2", "learning_rate": 2e-3, "weight_decay": 0.05,
    "warmup_steps": 0.1, "lr_scheduler_type": "cosine", "num_train_epochs": 20, "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 128, "eval_strategy": "no", "save_strategy": "no", "logging_steps": 50,
    "report_to": "none", "do_train": True, "do_eval": True,
    "output_dir": os.path.join(tempfile.gettempdir(), "hf_win-vit-digits"),
}


def digits_defaults(given, training_defaults: Dict[str, Any]) -> Dict[str, Any]:
    """The offline default's values for the arguments ``given`` so far (a namespace)."""
    model = {} if given.config_overrides else DIGITS_MODELS.get(given.model_type, {})
    return {**DIGITS_DEFAULTS, **model, **training_defaults}


def digits_dataset():
    """scikit-learn's handwritten digits (1,797 8x8 grey images, 10 classes) as a ``datasets.DatasetDict``."""
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    images = [Image.fromarray(p, mode="L") for p in pixels]
    ds = datasets.Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)
    return datasets.DatasetDict({"train": ds})


def cpu_processes_launch() -> bool:
    """A multi-process launch (WORLD_SIZE > 1) with no GPU visible: Accelerate would run each process as a job of
    its own unless asked for CPU processes, which both scripts then ask for (gloo), and say so once."""
    accelerator = getattr(torch, "accelerator", None)
    visible = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not visible


def parse_arguments(argv: Optional[Sequence[str]] = None):
    """``(model_args, data_args, aug_args, training_args, used_default_data)``; see ``paper_recipes.parse_arguments``."""
    launch = {"use_cpu": True, "ddp_backend": "gloo"} if cpu_processes_launch() else {}
    model_args, data_args, aug_args, training_args, default_data = recipes.parse_arguments(
        (ModelArguments, DataTrainingArguments, AugmentationArguments, WinTrainingArguments), argv,
        lambda given: digits_defaults(given, DIGITS_TRAINING_DEFAULTS), launch)
    if not training_args.do_train and not training_args.do_eval:
        training_args.do_train = training_args.do_eval = True
    # The transforms read the image column, which the Trainer would otherwise drop before they run.
    training_args.remove_unused_columns = False
    return model_args, data_args, aug_args, training_args, default_data


def load_data(data_args: DataTrainingArguments, model_args: ModelArguments, default_data: bool, seed: int,
              do_train: bool = True, do_eval: bool = True):
    """``(train_ds, eval_ds, label_names)``: the splits asked for (``None`` for the others), checked, with
    ``--max_train_samples`` / ``--max_eval_samples`` applied; no transform yet."""
    import datasets

    streaming = data_args.streaming
    if default_data:
        dataset = digits_dataset()
    elif data_args.dataset_name is not None:
        try:
            dataset = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir,
                                            token=model_args.token, streaming=streaming)
        except (FileNotFoundError, ConnectionError, ValueError) as err:
            raise UsageError(f"--dataset_name {data_args.dataset_name}: {' '.join(str(err).split())}") from None
    else:
        for name in ("train_dir", "validation_dir"):
            if getattr(data_args, name) is not None and not os.path.isdir(getattr(data_args, name)):
                raise UsageError(f"--{name} {getattr(data_args, name)} does not exist or is not a directory")
        folders = {"train": data_args.train_dir, "validation": data_args.validation_dir}
        data_files = {split: os.path.join(folder, "**") for split, folder in folders.items() if folder is not None}
        if "train" not in data_files:
            raise UsageError("--validation_dir needs --train_dir (the labels come from the training folders)")
        try:
            dataset = datasets.load_dataset("imagefolder", data_files=data_files, cache_dir=model_args.cache_dir,
                                            streaming=streaming)
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(f"--train_dir {data_args.train_dir}: no images found ({' '.join(str(err).split())})") from None

    if "train" not in dataset and do_train:
        raise UsageError(f"the dataset has no 'train' split (splits: {', '.join(dataset)})")
    validation_key = next((k for k in ("validation", "valid", "val", "test") if k in dataset), None)
    image_column, label_column = data_args.image_column_name, data_args.label_column_name
    if validation_key is None:  # hold out part of the training set, the same part whatever --seed
        if streaming:
            raise UsageError("--streaming needs a dataset with a validation split (--train_val_split cannot split a stream)")
        label_feature = (dataset["train"].features or {}).get(label_column)
        stratify = label_column if isinstance(label_feature, datasets.ClassLabel) else None
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=SPLIT_SEED, stratify_by_column=stratify)
        dataset, validation_key = datasets.DatasetDict({"train": split["train"], "validation": split["test"]}), "validation"
    reference = dataset["train"] if "train" in dataset else dataset[validation_key]
    columns = list(reference.column_names or (reference.features or {}).keys())
    for name, arg in ((image_column, "image_column_name"), (label_column, "label_column_name")):
        if name not in columns:
            raise UsageError(f"--{arg} {name!r} is not a column of the dataset; its columns are: {', '.join(columns)}")
    label_feature = (reference.features or {}).get(label_column)
    if not isinstance(label_feature, datasets.ClassLabel):
        raise UsageError(f"--label_column_name {label_column!r} must be a ClassLabel column (with names), got {label_feature}")

    train_ds = eval_ds = None
    if do_train:
        train_ds, n = dataset["train"], data_args.max_train_samples
        if n is not None:
            train_ds = train_ds.take(n) if streaming else train_ds.shuffle(seed=seed).select(range(min(n, len(train_ds))))
    if do_eval:
        eval_ds, n = dataset[validation_key], data_args.max_eval_samples
        if n is not None:
            eval_ds = eval_ds.take(n) if streaming else eval_ds.select(range(min(n, len(eval_ds))))
    return train_ds, eval_ds, list(label_feature.names)


def with_transform(ds, transform, data_args: DataTrainingArguments):
    """``ds`` yielding ``{"pixel_values", "labels"}``, ``transform`` applied to each image as it is read."""
    image_column, label_column = data_args.image_column_name, data_args.label_column_name

    def batch_transform(batch):
        return {"pixel_values": [transform(image) for image in batch[image_column]], "labels": list(batch[label_column])}

    if data_args.streaming:
        return ds.map(batch_transform, batched=True, remove_columns=list(ds.column_names or [image_column, label_column]))
    return ds.with_transform(batch_transform)


def build_model(model_args: ModelArguments, labels: List[str], training_args):
    """``(model, image_processor)``: a checkpoint with a classifier for ``labels``, or a model from scratch."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    label2id, id2label = {name: i for i, name in enumerate(labels)}, dict(enumerate(labels))
    common = dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token,
                  trust_remote_code=model_args.trust_remote_code)
    if model_args.model_name_or_path is not None:
        try:
            config = AutoConfig.from_pretrained(model_args.config_name or model_args.model_name_or_path, num_labels=len(labels),
                                                label2id=label2id, id2label=id2label, finetuning_task="image-classification", **common)
            model = AutoModelForImageClassification.from_pretrained(
                model_args.model_name_or_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **common)
            image_processor = AutoImageProcessor.from_pretrained(
                model_args.image_processor_name or model_args.model_name_or_path, **common)
        except (OSError, ValueError) as err:
            raise UsageError(f"--model_name_or_path {model_args.model_name_or_path}: {' '.join(str(err).split())}") from None
    else:
        try:
            config = AutoConfig.for_model(model_args.model_type)
        except ValueError:
            raise UsageError(f"--model_type {model_args.model_type!r} is not a transformers model type") from None
        if model_args.config_overrides:
            recipes.apply_config_overrides(config, model_args.config_overrides)
        if model_args.image_size is not None and hasattr(config, "image_size"):
            raise UsageError(f"--image_size is for models whose config has no image size; for {model_args.model_type} "
                             "set it in --config_overrides (image_size=...)")
        config.num_labels, config.label2id, config.id2label = len(labels), label2id, id2label
        model = AutoModelForImageClassification.from_config(config)
        if model_args.zero_init_residual:
            recipes.zero_init_residual(model)
        if model_args.image_processor_name:
            image_processor = AutoImageProcessor.from_pretrained(model_args.image_processor_name, **common)
        elif model_args.model_type in ("vit", "resnet"):
            size = int(getattr(config, "image_size", None) or model_args.image_size or 224)
            # ViTImageProcessor needs torchvision; without it the PIL one, saved and loaded the same way.
            pil = importlib.util.find_spec("torchvision") is None and hasattr(transformers, "ViTImageProcessorPil")
            processor_class = transformers.ViTImageProcessorPil if pil else transformers.ViTImageProcessor
            image_processor = processor_class(size={"height": size, "width": size})
        else:
            raise UsageError(f"--model_type {model_args.model_type}: give --image_processor_name (only vit and resnet "
                             "have a built-in one)")
    image_processor.image_mean = list(model_args.image_mean or image_processor.image_mean)
    image_processor.image_std = list(model_args.image_std or image_processor.image_std)
    if model_args.drop_path_rate > 0:
        recipes.add_drop_path(model, model_args.drop_path_rate)
    if model_args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if model_args.torch_dtype is not None:
        dtype = getattr(torch, model_args.torch_dtype)
        model = model.to(dtype)

        def cast_inputs(module, args, kwargs):
            if torch.is_tensor(kwargs.get("pixel_values")) and kwargs["pixel_values"].is_floating_point():
                kwargs["pixel_values"] = kwargs["pixel_values"].to(dtype)
            return args, kwargs

        model.register_forward_pre_hook(cast_inputs, with_kwargs=True)
    return model, image_processor


def collate_fn(examples):
    pixel_values = torch.stack([example["pixel_values"] for example in examples])
    labels = torch.tensor([example["labels"] for example in examples], dtype=torch.long)
    return {"pixel_values": pixel_values, "labels": labels}


def top_k(num_labels: int):
    """The k of top-k accuracy worth reporting: 1, and 5 when there are at least 5 classes."""
    return tuple(k for k in (1, 5) if k <= num_labels)


class ImageClassificationTrainer(WinTrainer):
    """``WinTrainer`` training on soft targets (mixup, cutmix, label smoothing; BCE or cross-entropy)."""

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
        return recipes.decay_parameter_names(model, self.weight_decay_filter)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pixel_values, labels = inputs["pixel_values"], inputs["labels"]
        if model.training:
            x, target = self.batch_augment(pixel_values, labels)
            outputs = model(pixel_values=x)
            loss = recipes.soft_target_loss(outputs.logits, target, self.bce_loss)
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
    if cpu_processes_launch() and training_args.process_index == 0:
        logger.warning(f"{training_args.world_size} processes launched and no GPU visible: training as one job on "
                       f"{training_args.world_size} CPU processes ({training_args.ddp_backend}).")
    if default_data:
        logger.warning("No data argument: training a small %s from scratch on scikit-learn's digits (offline default).",
                       {"vit": "ViT", "resnet": "ResNet"}.get(model_args.model_type, model_args.model_type))
        if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
            # A 0.3M-parameter model: one thread per op beats several (which spin and wait on each other).
            torch.set_num_threads(1)
            logger.warning("Tiny model on the CPU: 1 intra-op thread (set OMP_NUM_THREADS to choose).")
    if data_args.streaming and training_args.do_train and training_args.max_steps <= 0:
        raise UsageError("--streaming needs --max_steps (a stream has no length to count epochs from)")

    # Data, model, and the transforms at the model's input size
    transformers.set_seed(training_args.seed)
    train_ds, eval_ds, labels = load_data(data_args, model_args, default_data, training_args.seed,
                                          training_args.do_train, training_args.do_eval)
    model, image_processor = build_model(model_args, labels, training_args)
    size, mode = recipes.image_size_and_interpolation(image_processor, aug_args)
    if train_ds is not None:
        train_ds = with_transform(train_ds, recipes.TrainTransform(size, mode, aug_args), data_args)
    if eval_ds is not None:
        eval_ds = with_transform(eval_ds, recipes.EvalTransform(size, mode, aug_args.eval_crop_pct), data_args)

    # Top-k accuracy from the k best class ids per image (not all the logits)
    metric, ks = load_top_k_accuracy(cache_dir=model_args.cache_dir), top_k(len(labels))

    def preprocess_logits_for_metrics(logits, _labels):
        return (logits[0] if isinstance(logits, (tuple, list)) else logits).topk(max(ks), dim=-1).indices

    def compute_metrics(p):
        return metric.compute(predictions=np.asarray(p.predictions).tolist(), references=np.asarray(p.label_ids).tolist(), k=ks)

    trainer = ImageClassificationTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collate_fn,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        processing_class=image_processor,
        batch_augment=BatchAugment(image_processor.image_mean, image_processor.image_std, len(labels), aug_args,
                                   training_args.label_smoothing_factor, model_args.channels_last),
        bce_loss=aug_args.bce_loss,
        weight_decay_filter=model_args.weight_decay_filter,
    )

    # Training and evaluation
    results: Dict[str, float] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        results.update({k if k.startswith("train") else f"train_{k}": v for k, v in train_result.metrics.items()})
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)

    # Model card (it says which Win ran: mode, reckless steps) and a summary line
    card = {"tasks": "image-classification", "finetuned_from": model_args.model_name_or_path,
            "dataset": data_args.dataset_name or ("digits" if default_data else data_args.train_dir)}
    trainer.create_model_card(**{k: v for k, v in card.items() if v})
    if trainer.is_world_process_zero():
        summary = [f"optimizer {training_args.optim} ({getattr(training_args, 'acceleration_mode', '-')})"]
        summary += [f"top-{k} {100 * results[f'eval_top{k}_accuracy']:.2f}%" for k in ks if f"eval_top{k}_accuracy" in results]
        summary += [f"training {results['train_runtime']:.1f}s"] if "train_runtime" in results else []
        n_eval = None if data_args.streaming or eval_ds is None else len(eval_ds)
        print(f"\n*** Result{f' on {n_eval} held-out images' if n_eval else ''}: " + ", ".join(summary))
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
