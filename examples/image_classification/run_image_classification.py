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

import json
import logging
import math
import os
import random
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import HfArgumentParser

from hf_win import WinTrainer, WinTrainingArguments
from hf_win.metrics import load_top_k_accuracy

logger = logging.getLogger("run_image_classification")

# A Hub dataset's or our image folders' usual names.
DATA_ARGUMENTS = ("dataset_name", "train_dir", "validation_dir")
SPLIT_SEED = 42  # the held-out split does not move with --seed, so runs with different seeds compare


class UsageError(Exception):
    """Bad input: reported as one line ``error: ...`` and exit status 2."""


# ------------------------------------------------------------------------------------------------ arguments
@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "A pretrained checkpoint (local path or Hub id) to fine-tune. Leave unset to train from scratch."},
    )
    model_type: str = field(
        default="vit",
        metadata={"help": "Architecture when training from scratch (a transformers model type with an image-classification head)."},
    )
    config_overrides: Optional[str] = field(
        default=None,
        metadata={
            "help": "From scratch: override config defaults, e.g. 'hidden_size=384,num_hidden_layers=12,"
            "num_attention_heads=6,intermediate_size=1536,image_size=224,patch_size=16'."
        },
    )
    config_name: Optional[str] = field(default=None, metadata={"help": "A config (name or path) if not the model's."})
    image_processor_name: Optional[str] = field(default=None, metadata={"help": "An image processor (name or path) if not the model's."})
    image_mean: Optional[List[float]] = field(
        default=None, metadata={"help": "From scratch: normalisation mean (3 numbers); default the image processor's."}
    )
    image_std: Optional[List[float]] = field(
        default=None, metadata={"help": "From scratch: normalisation std (3 numbers); default the image processor's."}
    )
    drop_path_rate: float = field(
        default=0.0,
        metadata={"help": "Stochastic depth (timm --drop-path) for ViT: rate rising linearly over the layers to this value."},
    )
    weight_decay_filter: str = field(
        default="trainer",
        metadata={
            "help": "Which parameters get weight decay. 'trainer': all but biases and norm weights (the Trainer's "
            "rule); 'timm': all but 1-d parameters, position embeddings and the class token (timm/DeiT); 'all': every "
            "parameter (timm --bias-decay).",
            "choices": ["trainer", "timm", "all"],
        },
    )
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where to cache downloaded models and datasets."})
    model_revision: str = field(default="main", metadata={"help": "Model version (branch, tag or commit)."})
    token: Optional[str] = field(default=None, metadata={"help": "Hub token for private models or datasets."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom code from the Hub."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Re-initialise the classifier of a checkpoint with a different number of labels."}
    )

    def __post_init__(self):
        if self.model_name_or_path is not None and self.config_overrides is not None:
            raise ValueError("--config_overrides only applies when training from scratch (without --model_name_or_path)")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                raise ValueError(f"--{name} takes 3 numbers (one per RGB channel), got {value}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"--drop_path_rate must be in [0, 1), got {self.drop_path_rate}")


@dataclass
class DataTrainingArguments:
    dataset_name: Optional[str] = field(
        default=None, metadata={"help": "A dataset from the Hub (e.g. ILSVRC/imagenet-1k) or a local dataset path."}
    )
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "The dataset's configuration name."})
    streaming: bool = field(
        default=False, metadata={"help": "Stream the dataset (no full download; requires --max_steps)."}
    )
    train_dir: Optional[str] = field(default=None, metadata={"help": "A folder of training images, one sub-folder per class."})
    validation_dir: Optional[str] = field(default=None, metadata={"help": "A folder of validation images, one sub-folder per class."})
    image_column_name: str = field(default="image", metadata={"help": "The dataset column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "The dataset column holding the labels."})
    train_val_split: float = field(
        default=0.15, metadata={"help": "Fraction of the training set held out for validation when there is no validation split."}
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many training images."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many validation images."})

    def __post_init__(self):
        if not 0.0 < self.train_val_split < 1.0:
            raise ValueError(f"--train_val_split must be in (0, 1), got {self.train_val_split}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")


@dataclass
class AugmentationArguments:
    random_resized_crop_scale: List[float] = field(
        default_factory=lambda: [0.08, 1.0],
        metadata={"help": "Random-resized-crop: range of the crop's area as a fraction of the image (timm --scale)."},
    )
    random_resized_crop_ratio: List[float] = field(
        default_factory=lambda: [3.0 / 4.0, 4.0 / 3.0],
        metadata={"help": "Random-resized-crop: range of the crop's aspect ratio (timm --ratio)."},
    )
    horizontal_flip_prob: float = field(default=0.5, metadata={"help": "Probability of a horizontal flip (timm --hflip)."})
    randaugment_num_ops: int = field(
        default=0, metadata={"help": "RandAugment: operations per image (0 = off; timm 'rand-n2' = 2)."}
    )
    randaugment_magnitude: float = field(
        default=9.0, metadata={"help": "RandAugment magnitude on timm's 0-10 scale ('rand-m7' = 7); strictly between 0 and 10."}
    )
    mixup_alpha: float = field(default=0.0, metadata={"help": "Mixup Beta(alpha, alpha); 0 = off (timm --mixup)."})
    cutmix_alpha: float = field(default=0.0, metadata={"help": "CutMix Beta(alpha, alpha); 0 = off (timm --cutmix)."})
    mixup_prob: float = field(default=1.0, metadata={"help": "Probability of mixing a batch (timm --mixup-prob)."})
    mixup_switch_prob: float = field(
        default=0.5, metadata={"help": "With both mixup and cutmix on, probability of cutmix (timm --mixup-switch-prob)."}
    )
    bce_loss: bool = field(
        default=False, metadata={"help": "Binary cross-entropy on the (soft) targets instead of softmax cross-entropy (timm --bce-loss)."}
    )
    interpolation: Optional[str] = field(
        default=None,
        metadata={"help": "Resize interpolation; default the image processor's.", "choices": ["bilinear", "bicubic", "nearest"]},
    )
    eval_crop_pct: Optional[float] = field(
        default=None,
        metadata={
            "help": "Evaluation: resize the shorter side to size/crop_pct and center-crop (timm crop_pct, 0.875 for "
            "DeiT). Default: resize to the model's size as its image processor does."
        },
    )

    def __post_init__(self):
        def pair(name, low_ok):
            value = [float(v) for v in getattr(self, name)]
            if len(value) != 2 or not (low_ok(value[0]) and value[0] <= value[1]):
                raise ValueError(f"--{name} takes two numbers LOW HIGH with 0 < LOW <= HIGH, got {getattr(self, name)}")
            setattr(self, name, value)

        pair("random_resized_crop_scale", lambda v: 0 < v)
        if self.random_resized_crop_scale[1] > 1:
            raise ValueError(f"--random_resized_crop_scale HIGH must be <= 1, got {self.random_resized_crop_scale}")
        pair("random_resized_crop_ratio", lambda v: 0 < v)
        for name in ("horizontal_flip_prob", "mixup_prob", "mixup_switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name} must be in [0, 1], got {getattr(self, name)}")
        if self.randaugment_num_ops < 0:
            raise ValueError(f"--randaugment_num_ops must be >= 0, got {self.randaugment_num_ops}")
        if self.randaugment_num_ops and not 0.0 < self.randaugment_magnitude < 10.0:
            raise ValueError(f"--randaugment_magnitude must be strictly between 0 and 10, got {self.randaugment_magnitude}")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_crop_pct is not None and not 0.0 < self.eval_crop_pct <= 1.0:
            raise ValueError(f"--eval_crop_pct must be in (0, 1], got {self.eval_crop_pct}")

    @property
    def mixing(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


# The offline default: arguments put before the user's when no data argument is given (the user's win).
DIGITS_DEFAULTS: Dict[str, Any] = {
    "model_type": "vit",
    "config_overrides": "image_size=16,patch_size=4,num_channels=3,hidden_size=96,num_hidden_layers=4,"
    "num_attention_heads=4,intermediate_size=192,hidden_dropout_prob=0.0,attention_probs_dropout_prob=0.0",
    "train_val_split": 0.2,
    "random_resized_crop_scale": [0.6, 1.0],
    "horizontal_flip_prob": 0.0,  # a flipped digit is another glyph
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


class _OneLineParser(HfArgumentParser):
    """argparse errors as one line (the usage of TrainingArguments alone is hundreds of lines)."""

    def error(self, message):  # noqa: D401 - argparse API
        raise UsageError(message)


def make_parser() -> HfArgumentParser:
    return _OneLineParser((ModelArguments, DataTrainingArguments, AugmentationArguments, WinTrainingArguments))


def _to_tokens(options: Dict[str, Any], parser: HfArgumentParser, source: str) -> List[str]:
    """Arguments from a file (or a dict) as command-line tokens, so one parser handles both."""
    known = {a.dest for a in parser._actions}
    tokens: List[str] = []
    for key, value in options.items():
        if key not in known:
            raise UsageError(f"{source}: unknown argument {key!r}")
        if value is None:
            continue
        if isinstance(value, bool):
            tokens += [f"--{key}", "true" if value else "false"]
        elif isinstance(value, (list, tuple)):
            tokens += [f"--{key}"] + [str(v) for v in value]
        elif isinstance(value, dict):
            tokens += [f"--{key}", json.dumps(value)]
        else:
            tokens += [f"--{key}", str(value)]
    return tokens


def load_argument_file(path: str) -> Dict[str, Any]:
    import yaml

    if not os.path.isfile(path):
        raise UsageError(f"argument file {path} does not exist")
    with open(path) as f:
        text = f.read()
    try:
        options = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        detail = " ".join(str(err).split())
        raise UsageError(f"argument file {path} does not parse: {detail}") from None
    if not isinstance(options, dict):
        raise UsageError(f"argument file {path} must hold a mapping of argument names to values, got {type(options).__name__}")
    return options


def parse_arguments(argv: Optional[Sequence[str]] = None):
    """``(model_args, data_args, aug_args, training_args, used_default_data)`` from the command line.

    ``argv[0]`` may be an argument file (.yaml/.yml/.json); later arguments override its values. With no data
    argument anywhere, :data:`DIGITS_DEFAULTS` come first (so any of them can still be overridden).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    tokens: List[str] = []
    if argv and argv[0].endswith((".yaml", ".yml", ".json")) and not argv[0].startswith("-"):
        path, argv = argv[0], argv[1:]
        options = load_argument_file(path)
        cli = {t[2:].split("=", 1)[0] for t in argv if t.startswith("--")}
        # A data source on the command line replaces the file's (image folders instead of the Hub set, ...).
        if cli & {"train_dir", "validation_dir"}:
            options = {k: v for k, v in options.items() if k not in ("dataset_name", "dataset_config_name")}
        if "dataset_name" in cli:
            options = {k: v for k, v in options.items() if k not in ("train_dir", "validation_dir")}
        tokens += _to_tokens(options, parser, path)
    tokens += argv
    given = {t[2:].split("=", 1)[0] for t in tokens if t.startswith("--")}
    default_data = not any(name in given for name in DATA_ARGUMENTS)
    if default_data:
        tokens = _to_tokens(DIGITS_DEFAULTS, parser, "defaults") + tokens
    try:
        model_args, data_args, aug_args, training_args = parser.parse_args_into_dataclasses(args=tokens)
    except ValueError as err:
        raise UsageError(" ".join(str(err).split())) from None
    if not training_args.do_train and not training_args.do_eval:
        training_args.do_train = training_args.do_eval = True
    # The transforms read the image column, which the Trainer would otherwise drop before they run.
    training_args.remove_unused_columns = False
    return model_args, data_args, aug_args, training_args, default_data


# ------------------------------------------------------------------------------------------------ data
def digits_dataset():
    """scikit-learn's handwritten digits (1,797 8x8 grey images, 10 classes) as a ``datasets.DatasetDict``."""
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p, mode="L") for p in pixels], "label": digits.target.tolist()}, features=features
    )
    return datasets.DatasetDict({"train": ds})


def load_data(data_args: DataTrainingArguments, model_args: ModelArguments, default_data: bool):
    import datasets

    if default_data:
        return digits_dataset()
    if data_args.dataset_name is not None:
        try:
            return datasets.load_dataset(
                data_args.dataset_name,
                data_args.dataset_config_name,
                cache_dir=model_args.cache_dir,
                token=model_args.token,
                streaming=data_args.streaming,
            )
        except (FileNotFoundError, ConnectionError, ValueError) as err:
            raise UsageError(f"--dataset_name {data_args.dataset_name}: {' '.join(str(err).split())}") from None
    data_files = {}
    for split, name in (("train", "train_dir"), ("validation", "validation_dir")):
        folder = getattr(data_args, name)
        if folder is None:
            continue
        if not os.path.isdir(folder):
            raise UsageError(f"--{name} {folder} does not exist or is not a directory")
        data_files[split] = os.path.join(folder, "**")
    if "train" not in data_files:
        raise UsageError("--validation_dir needs --train_dir (the labels come from the training folders)")
    try:
        return datasets.load_dataset(
            "imagefolder", data_files=data_files, cache_dir=model_args.cache_dir, streaming=data_args.streaming
        )
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"--train_dir {data_args.train_dir}: no images found ({' '.join(str(err).split())})") from None


def split_and_check(dataset, data_args: DataTrainingArguments, training_args):
    """Train / validation splits, checked columns, label names."""
    import datasets

    if "train" not in dataset and training_args.do_train:
        raise UsageError(f"the dataset has no 'train' split (splits: {', '.join(dataset)})")
    validation_key = next((k for k in ("validation", "valid", "val", "test") if k in dataset), None)
    if validation_key is None:
        if data_args.streaming:
            raise UsageError("--streaming needs a dataset with a validation split (--train_val_split cannot split a stream)")
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=SPLIT_SEED,
                                                  stratify_by_column=_stratify_column(dataset["train"], data_args))
        dataset = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
        validation_key = "validation"
    reference = dataset["train"] if "train" in dataset else dataset[validation_key]
    columns = list(reference.column_names or (reference.features or {}).keys())
    for name, arg in ((data_args.image_column_name, "image_column_name"), (data_args.label_column_name, "label_column_name")):
        if name not in columns:
            raise UsageError(f"--{arg} {name!r} is not a column of the dataset; its columns are: {', '.join(columns)}")
    label_feature = (reference.features or {}).get(data_args.label_column_name)
    if not isinstance(label_feature, datasets.ClassLabel):
        raise UsageError(
            f"--label_column_name {data_args.label_column_name!r} must be a ClassLabel column (class ids with names), "
            f"got {label_feature}"
        )
    return dataset, validation_key, list(label_feature.names)


def _stratify_column(ds, data_args):
    import datasets

    feature = ds.features.get(data_args.label_column_name) if ds.features else None
    return data_args.label_column_name if isinstance(feature, datasets.ClassLabel) else None


# ------------------------------------------------------------------------------------------------ transforms
_PIL_TO_MODE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL resample codes used by image processors


def _target_size(image_processor) -> tuple:
    size = image_processor.size
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    if "shortest_edge" in size:
        return int(size["shortest_edge"]), int(size["shortest_edge"])
    raise UsageError(f"cannot read an image size from the image processor's size {dict(size)}")


def _to_tensor(image) -> torch.Tensor:
    """PIL image -> float tensor (3, H, W) in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def _resize(x: torch.Tensor, size, mode: str) -> torch.Tensor:
    antialias = mode in ("bilinear", "bicubic")
    out = F.interpolate(x[None], size=tuple(size), mode=mode, antialias=antialias,
                        **({} if mode == "nearest" else {"align_corners": False}))[0]
    return out.clamp_(0.0, 1.0)


def random_resized_crop_box(height: int, width: int, scale, ratio, generator=None):
    """torchvision's RandomResizedCrop.get_params in plain torch: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=generator))
        aspect = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height  # fallback: central crop at the nearest allowed aspect ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TrainTransform:
    """Per image: random-resized-crop, horizontal flip, RandAugment (kornia). Output in [0, 1]; the
    normalisation happens on the device (:class:`BatchAugment`), after mixup / cutmix inputs are formed."""

    def __init__(self, size, mode: str, aug: AugmentationArguments):
        self.size, self.mode, self.aug = size, mode, aug
        self.randaugment = None
        if aug.randaugment_num_ops:
            from kornia.augmentation.auto import RandAugment

            # kornia's magnitude runs over (0, 30) where timm's runs over (0, 10): m_kornia = 3 * m_timm.
            m = int(round(3 * aug.randaugment_magnitude))
            self.randaugment = RandAugment(n=aug.randaugment_num_ops, m=min(max(m, 1), 29))

    def __call__(self, image) -> torch.Tensor:
        x = _to_tensor(image)
        top, left, h, w = random_resized_crop_box(x.shape[1], x.shape[2], self.aug.random_resized_crop_scale,
                                                  self.aug.random_resized_crop_ratio)
        x = _resize(x[:, top:top + h, left:left + w], self.size, self.mode)
        if self.aug.horizontal_flip_prob > 0 and float(torch.rand(())) < self.aug.horizontal_flip_prob:
            x = x.flip(-1)
        if self.randaugment is not None:
            x = self.randaugment(x[None])[0].clamp_(0.0, 1.0)
        return x


class EvalTransform:
    """Resize as the image processor does (or timm-style: shorter side to size/crop_pct, center-crop)."""

    def __init__(self, size, mode: str, crop_pct: Optional[float]):
        self.size, self.mode, self.crop_pct = size, mode, crop_pct

    def __call__(self, image) -> torch.Tensor:
        x = _to_tensor(image)
        if self.crop_pct is None:
            return _resize(x, self.size, self.mode)
        h, w = x.shape[1:]
        short = int(math.floor(max(self.size) / self.crop_pct))
        scale = short / min(h, w)
        x = _resize(x, (max(short, int(round(h * scale))), max(short, int(round(w * scale)))), self.mode)
        top, left = (x.shape[1] - self.size[0]) // 2, (x.shape[2] - self.size[1]) // 2
        return x[:, top:top + self.size[0], left:left + self.size[1]]


class BatchAugment(torch.nn.Module):
    """On the device: normalise, and in training mix the batch (timm's Mixup, mode 'batch') into soft targets
    with label smoothing folded in."""

    def __init__(self, mean, std, num_labels: int, aug: AugmentationArguments, label_smoothing: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.num_labels, self.aug, self.smoothing = num_labels, aug, float(label_smoothing)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device, x.dtype)) / self.std.to(x.device, x.dtype)

    def soft_targets(self, labels: torch.Tensor) -> torch.Tensor:
        off = self.smoothing / self.num_labels
        return torch.full((labels.shape[0], self.num_labels), off, device=labels.device).scatter_(
            1, labels.view(-1, 1), 1.0 - self.smoothing + off
        )

    def _lam(self):
        aug = self.aug
        if not aug.mixing or float(torch.rand(())) >= aug.mixup_prob:
            return 1.0, False
        cutmix = aug.cutmix_alpha > 0 and (aug.mixup_alpha <= 0 or float(torch.rand(())) < aug.mixup_switch_prob)
        alpha = aug.cutmix_alpha if cutmix else aug.mixup_alpha
        return float(np.random.beta(alpha, alpha)), cutmix

    def forward(self, x: torch.Tensor, labels: torch.Tensor):
        x = self.normalize(x)
        target = self.soft_targets(labels)
        lam, cutmix = self._lam()
        if lam < 1.0:
            if cutmix:  # one box for the batch, lam corrected to the box's true area (timm correct_lam)
                H, W = x.shape[-2:]
                cut = math.sqrt(1.0 - lam)
                ch, cw = int(H * cut), int(W * cut)
                cy, cx = int(np.random.randint(0, H)), int(np.random.randint(0, W))
                y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
                x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
                x = x.clone()
                x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
                lam = 1.0 - (y1 - y0) * (x1 - x0) / float(H * W)
            else:
                x = x * lam + x.flip(0) * (1.0 - lam)
            target = target * lam + target.flip(0) * (1.0 - lam)
        return x, target


class DropPath(torch.nn.Module):
    """Stochastic depth per sample (timm's DropPath) on a residual branch."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self):
        return f"p={self.p}"


def add_drop_path(model, rate: float) -> None:
    """Stochastic depth for ViT-family layers: each layer's residual-branch dropout (used on both the attention
    and the MLP branch) gets a DropPath after it, the rate rising linearly from 0 to ``rate`` (as in timm)."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("Layer") and hasattr(m, "attention")
              and hasattr(m, "mlp") and isinstance(getattr(m, "dropout", None), torch.nn.Dropout)]
    if not layers:
        raise UsageError(f"--drop_path_rate is implemented for ViT-family models, not for {type(model).__name__}")
    for i, layer in enumerate(layers):
        p = rate * i / max(len(layers) - 1, 1)
        layer.dropout = torch.nn.Sequential(layer.dropout, DropPath(p))


# ------------------------------------------------------------------------------------------------ trainer
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
        named = [(n, p) for n, p in model.named_parameters()]
        if self.weight_decay_filter == "all":
            return [n for n, _ in named]
        # timm's param_groups_weight_decay with DeiT's no_weight_decay() = {pos_embed, cls_token}
        return [n for n, p in named if p.ndim > 1 and not n.endswith(".bias")
                and not n.endswith(("position_embeddings", "cls_token", "mask_token"))]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pixel_values, labels = inputs["pixel_values"], inputs["labels"]
        if model.training:
            x, target = self.batch_augment(pixel_values, labels)
            outputs = model(pixel_values=x)
            logits = outputs.logits.float()
            if self.bce_loss:
                loss = F.binary_cross_entropy_with_logits(logits, target)
            else:
                loss = torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
        else:
            outputs = model(pixel_values=self.batch_augment.normalize(pixel_values), labels=labels)
            loss = outputs.loss
        return (loss, outputs) if return_outputs else loss


# ------------------------------------------------------------------------------------------------ model
def _vit_image_processor_class():
    """ViTImageProcessor needs torchvision; without it (as here) the PIL one, saved and loaded the same way."""
    import importlib.util

    import transformers as tf

    if importlib.util.find_spec("torchvision") is None and hasattr(tf, "ViTImageProcessorPil"):
        return tf.ViTImageProcessorPil
    return tf.ViTImageProcessor


def build_model(model_args: ModelArguments, labels: List[str], training_args):
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    label2id = {name: i for i, name in enumerate(labels)}
    id2label = {i: name for i, name in enumerate(labels)}
    common = dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token,
                  trust_remote_code=model_args.trust_remote_code)
    if model_args.model_name_or_path is not None:
        source = model_args.config_name or model_args.model_name_or_path
        try:
            config = AutoConfig.from_pretrained(source, num_labels=len(labels), label2id=label2id, id2label=id2label,
                                                finetuning_task="image-classification", **common)
            model = AutoModelForImageClassification.from_pretrained(
                model_args.model_name_or_path, config=config,
                ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **common)
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
            try:
                config.update_from_string(model_args.config_overrides)
            except ValueError as err:
                raise UsageError(f"--config_overrides: {' '.join(str(err).split())}") from None
        config.num_labels = len(labels)
        config.label2id, config.id2label = label2id, id2label
        model = AutoModelForImageClassification.from_config(config)
        if model_args.image_processor_name:
            image_processor = AutoImageProcessor.from_pretrained(model_args.image_processor_name, **common)
        elif model_args.model_type == "vit":
            size = int(config.image_size)
            image_processor = _vit_image_processor_class()(size={"height": size, "width": size})
        else:
            raise UsageError(f"--model_type {model_args.model_type}: give --image_processor_name (only vit has a built-in one)")
    if model_args.image_mean is not None:
        image_processor.image_mean = list(model_args.image_mean)
    if model_args.image_std is not None:
        image_processor.image_std = list(model_args.image_std)
    if model_args.drop_path_rate > 0:
        add_drop_path(model, model_args.drop_path_rate)
    return model, image_processor


# ------------------------------------------------------------------------------------------------ main
def make_collate():
    def collate_fn(examples):
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long),
        }

    return collate_fn


def _with_transform(ds, fn, image_column, label_column, streaming):
    def batch_transform(batch):
        return {"pixel_values": [fn(img) for img in batch[image_column]], "labels": list(batch[label_column])}

    if streaming:
        return ds.map(batch_transform, batched=True, remove_columns=list(ds.column_names or [image_column, label_column]))
    return ds.with_transform(batch_transform)


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
        logger.warning("No data argument: training a small ViT from scratch on scikit-learn's digits (offline default).")
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

    size = _target_size(image_processor)
    mode = aug_args.interpolation or _PIL_TO_MODE.get(int(getattr(image_processor, "resample", 2) or 2), "bilinear")
    img_col, lab_col = data_args.image_column_name, data_args.label_column_name
    train_ds = eval_ds = None
    if training_args.do_train:
        train_ds = dataset["train"]
        if data_args.max_train_samples is not None:
            train_ds = (train_ds.take(data_args.max_train_samples) if data_args.streaming
                        else train_ds.shuffle(seed=training_args.seed).select(range(min(data_args.max_train_samples, len(train_ds)))))
        train_ds = _with_transform(train_ds, TrainTransform(size, mode, aug_args), img_col, lab_col, data_args.streaming)
    if training_args.do_eval:
        eval_ds = dataset[validation_key]
        if data_args.max_eval_samples is not None:
            eval_ds = (eval_ds.take(data_args.max_eval_samples) if data_args.streaming
                       else eval_ds.select(range(min(data_args.max_eval_samples, len(eval_ds)))))
        eval_ds = _with_transform(eval_ds, EvalTransform(size, mode, aug_args.eval_crop_pct), img_col, lab_col,
                                  data_args.streaming)

    metric = load_top_k_accuracy(cache_dir=model_args.cache_dir)
    ks = tuple(k for k in (1, 5) if k <= len(labels))

    def preprocess_logits_for_metrics(logits, _labels):
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        return logits.topk(max(ks), dim=-1).indices  # keep k class ids per image, not all the logits

    def compute_metrics(p):
        return metric.compute(predictions=np.asarray(p.predictions).tolist(),
                              references=np.asarray(p.label_ids).tolist(), k=ks)

    batch_augment = BatchAugment(image_processor.image_mean, image_processor.image_std, len(labels), aug_args,
                                 training_args.label_smoothing_factor)
    trainer = ImageClassificationTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=make_collate(),
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
