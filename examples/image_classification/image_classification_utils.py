"""What ``run_image_classification.py`` (Trainer) and ``run_image_classification_no_trainer.py`` (Accelerate)
share: the model, data and augmentation arguments, argument files, the datasets (the offline digits, image
folders, ``datasets`` sets), the per-image transforms, mixup / cutmix / label smoothing on the device, the
soft-target loss, the models built from scratch (ViT, ResNet) and the weight-decay filters.

Plain PyTorch, kornia for RandAugment; no torchvision (see the README).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import HfArgumentParser


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
        metadata={"help": "Architecture when training from scratch (a transformers model type with an image-classification "
                  "head; vit and resnet have a built-in image processor)."},
    )
    config_overrides: Optional[str] = field(
        default=None,
        metadata={
            "help": "From scratch: override config defaults, e.g. 'hidden_size=384,num_hidden_layers=12,"
            "num_attention_heads=6,intermediate_size=1536,image_size=224,patch_size=16'; lists in brackets, e.g. "
            "ResNet-101: 'layer_type=bottleneck,depths=[3,4,23,3],hidden_sizes=[256,512,1024,2048]'."
        },
    )
    image_size: Optional[int] = field(
        default=None,
        metadata={"help": "From scratch: input size for a model whose config has none (ResNet; default 224)."},
    )
    channels_last: bool = field(
        default=False,
        metadata={"help": "Channels-last memory format for the model and its inputs (timm --channels-last; faster "
                  "convolutions on GPUs, the same results)."},
    )
    zero_init_residual: bool = field(
        default=False,
        metadata={"help": "From scratch, ResNet: zero the last BatchNorm weight of every residual block (timm's "
                  "zero_init_last, on by default in timm's ResNets)."},
    )
    config_name: Optional[str] = field(default=None, metadata={"help": "A config (name or path) if not the model's."})
    image_processor_name: Optional[str] = field(default=None, metadata={"help": "An image processor (name or path) if not the model's."})
    image_mean: Optional[List[float]] = field(
        default=None, metadata={"help": "From scratch: normalisation mean (3 numbers); default the image processor's."}
    )
    image_std: Optional[List[float]] = field(
        default=None, metadata={"help": "From scratch: normalisation std (3 numbers); default the image processor's."}
    )
    torch_dtype: Optional[str] = field(
        default=None,
        metadata={"help": "Keep the model's parameters in this dtype ('float32', 'bfloat16', 'float16'); inputs are cast "
                          "to it. Pure-bfloat16 training: --torch_dtype bfloat16 with --optim_args "
                          "state_dtype=bfloat16,bf16_stochastic_round=true (unlike --bf16, which autocasts float32 "
                          "parameters)."},
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
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"--image_size must be >= 1, got {self.image_size}")
        if self.model_name_or_path is not None and self.zero_init_residual:
            raise ValueError("--zero_init_residual only applies when training from scratch (without --model_name_or_path)")


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


class _OneLineParser(HfArgumentParser):
    """argparse errors as one line (the usage of TrainingArguments alone is hundreds of lines)."""

    def error(self, message):  # noqa: D401 - argparse API
        raise UsageError(message)


# The offline default's model, data and augmentation (each script adds its training defaults): put before the
# user's arguments when no data argument is given (the user's win). The model's size follows --model_type.
DIGITS_DEFAULTS: Dict[str, Any] = {
    "model_type": "vit",
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


def make_parser(training_dataclass) -> HfArgumentParser:
    return _OneLineParser((ModelArguments, DataTrainingArguments, AugmentationArguments, training_dataclass))


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


def _option_value(tokens: List[str], name: str) -> Optional[str]:
    """The last value given to ``--name`` in ``tokens`` (``--name value`` or ``--name=value``)."""
    value = None
    for i, t in enumerate(tokens):
        if t == f"--{name}" and i + 1 < len(tokens):
            value = tokens[i + 1]
        elif t.startswith(f"--{name}="):
            value = t.split("=", 1)[1]
    return value


def parse_arguments(argv: Optional[Sequence[str]], training_dataclass, training_defaults: Dict[str, Any]):
    """``(model_args, data_args, aug_args, training_args, used_default_data)`` from the command line.

    ``argv[0]`` may be an argument file (.yaml/.yml/.json); later arguments override its values. With no data
    argument anywhere, :data:`DIGITS_DEFAULTS`, the digits model of ``--model_type`` (:data:`DIGITS_MODELS`) and
    ``training_defaults`` come first (so any of them can still be overridden).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser(training_dataclass)
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
        model_type = _option_value(tokens, "model_type") or DIGITS_DEFAULTS["model_type"]
        model = {} if "config_overrides" in given else DIGITS_MODELS.get(model_type, {})
        tokens = _to_tokens({**DIGITS_DEFAULTS, **model, **training_defaults}, parser, "defaults") + tokens
    try:
        return (*parser.parse_args_into_dataclasses(args=tokens), default_data)
    except ValueError as err:
        raise UsageError(" ".join(str(err).split())) from None


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

    def __call__(self, image, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Random draws from ``generator`` (kornia's from the global RNG seeded from it), or from the global RNG."""
        x = _to_tensor(image)
        top, left, h, w = random_resized_crop_box(x.shape[1], x.shape[2], self.aug.random_resized_crop_scale,
                                                  self.aug.random_resized_crop_ratio, generator)
        x = _resize(x[:, top:top + h, left:left + w], self.size, self.mode)
        if self.aug.horizontal_flip_prob > 0 and float(torch.rand((), generator=generator)) < self.aug.horizontal_flip_prob:
            x = x.flip(-1)
        if self.randaugment is not None:
            if generator is None:
                return self.randaugment(x[None])[0].clamp_(0.0, 1.0)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
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

    def __init__(self, mean, std, num_labels: int, aug: AugmentationArguments, label_smoothing: float,
                 channels_last: bool = False):
        super().__init__()
        self.channels_last = channels_last
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.num_labels, self.aug, self.smoothing = num_labels, aug, float(label_smoothing)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean.to(x.device, x.dtype)) / self.std.to(x.device, x.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

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


def _residual_blocks(model):
    """ResNet blocks (``layer``: the residual branch, ``shortcut``) in network order."""
    return [m for m in model.modules() if isinstance(getattr(m, "layer", None), torch.nn.Sequential)
            and hasattr(m, "shortcut")]


def add_drop_path(model, rate: float) -> None:
    """Stochastic depth, the rate rising linearly from 0 to ``rate`` over the blocks (as in timm). ViT-family
    layers: each layer's residual-branch dropout (used on both the attention and the MLP branch) gets a DropPath
    after it. ResNet: a DropPath at the end of every block's residual branch, before the shortcut is added."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("Layer") and hasattr(m, "attention")
              and hasattr(m, "mlp") and isinstance(getattr(m, "dropout", None), torch.nn.Dropout)]
    blocks = _residual_blocks(model)
    if not layers and not blocks:
        raise UsageError(f"--drop_path_rate is implemented for ViT-family and ResNet models, not for {type(model).__name__}")
    for i, layer in enumerate(layers):
        layer.dropout = torch.nn.Sequential(layer.dropout, DropPath(rate * i / max(len(layers) - 1, 1)))
    for i, block in enumerate(blocks):
        block.layer.append(DropPath(rate * i / max(len(blocks) - 1, 1)))


def zero_init_residual(model) -> None:
    """timm's zero_init_last: every ResNet block starts as the identity (last BatchNorm weight of its branch 0)."""
    blocks = _residual_blocks(model)
    if not blocks:
        raise UsageError(f"--zero_init_residual is for ResNet models, not for {type(model).__name__}")
    for block in blocks:
        norm = [m for m in block.layer.modules() if isinstance(m, torch.nn.BatchNorm2d)][-1]
        torch.nn.init.zeros_(norm.weight)


def apply_config_overrides(config, overrides: str) -> None:
    """``config.update_from_string`` that also takes lists in brackets (``depths=[3,4,6,3]``)."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(overrides + ","):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            items.append(overrides[start:i].strip())
            start = i + 1
    plain = []
    for item in filter(None, items):
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--config_overrides: {item!r} is not of the form key=value")
        if value.strip().startswith("["):
            if not hasattr(config, key):
                raise UsageError(f"--config_overrides: key {key} isn't in the original config dict")
            try:
                setattr(config, key, json.loads(value))
            except json.JSONDecodeError:
                raise UsageError(f"--config_overrides: {key}={value} is not a list of numbers") from None
        else:
            plain.append(item)
    if plain:
        try:
            config.update_from_string(",".join(plain))
        except ValueError as err:
            raise UsageError(f"--config_overrides: {' '.join(str(err).split())}") from None



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
            apply_config_overrides(config, model_args.config_overrides)
        if model_args.image_size is not None and hasattr(config, "image_size"):
            raise UsageError(f"--image_size is for models whose config has no image size; for {model_args.model_type} "
                             "set it in --config_overrides (image_size=...)")
        config.num_labels = len(labels)
        config.label2id, config.id2label = label2id, id2label
        model = AutoModelForImageClassification.from_config(config)
        if model_args.zero_init_residual:
            zero_init_residual(model)
        if model_args.image_processor_name:
            image_processor = AutoImageProcessor.from_pretrained(model_args.image_processor_name, **common)
        elif model_args.model_type in ("vit", "resnet"):
            size = int(getattr(config, "image_size", None) or model_args.image_size or 224)
            image_processor = _vit_image_processor_class()(size={"height": size, "width": size})
        else:
            raise UsageError(f"--model_type {model_args.model_type}: give --image_processor_name (only vit and resnet "
                             "have a built-in one)")
    if model_args.image_mean is not None:
        image_processor.image_mean = list(model_args.image_mean)
    if model_args.image_std is not None:
        image_processor.image_std = list(model_args.image_std)
    if model_args.drop_path_rate > 0:
        add_drop_path(model, model_args.drop_path_rate)
    if model_args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if model_args.torch_dtype is not None:
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if model_args.torch_dtype not in dtypes:
            raise UsageError(f"--torch_dtype must be one of {', '.join(dtypes)}, got {model_args.torch_dtype!r}")
        model = model.to(dtypes[model_args.torch_dtype])

        def cast_inputs(module, args, kwargs):
            if torch.is_tensor(kwargs.get("pixel_values")) and kwargs["pixel_values"].is_floating_point():
                kwargs["pixel_values"] = kwargs["pixel_values"].to(dtypes[model_args.torch_dtype])
            return args, kwargs

        model.register_forward_pre_hook(cast_inputs, with_kwargs=True)
    return model, image_processor


def decay_parameter_names(model, weight_decay_filter: str) -> List[str]:
    """The parameters that get weight decay. 'trainer': the Trainer's rule (all but biases and LayerNorm-type
    weights; BatchNorm weights do get decay); 'all': every parameter (timm --bias-decay); 'timm': all but 1-d parameters (biases, BatchNorm and
    LayerNorm weights), position embeddings and the class token (timm's param_groups_weight_decay with DeiT's
    no_weight_decay())."""
    named = list(model.named_parameters())
    if weight_decay_filter == "trainer":
        from transformers import Trainer

        return Trainer.get_decay_parameter_names(None, model)  # uses nothing of the Trainer instance
    if weight_decay_filter == "all":
        return [n for n, _ in named]
    return [n for n, p in named if p.ndim > 1 and not n.endswith(".bias")
            and not n.endswith(("position_embeddings", "cls_token", "mask_token"))]


def soft_target_loss(logits: torch.Tensor, target: torch.Tensor, bce: bool) -> torch.Tensor:
    """Cross-entropy on soft targets (mixup / cutmix / label smoothing), or BCE on them (timm --bce-loss)."""
    logits = logits.float()
    if bce:
        return F.binary_cross_entropy_with_logits(logits, target)
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


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


class SeededTransformDataset(torch.utils.data.Dataset):
    """A map-style dataset whose per-image augmentation is a function of (seed, epoch, index) alone: the same
    image gets the same crop, flip and RandAugment however many processes or loader workers there are, and a
    run resumed mid-epoch sees exactly what the uninterrupted run saw (nothing here touches the global RNG).
    Call :meth:`set_epoch` at the start of every epoch."""

    def __init__(self, ds, transform, image_column: str, label_column: str, seed: int):
        self.ds, self.transform, self.seed, self.epoch = ds, transform, int(seed), 0
        self.image_column, self.label_column = image_column, label_column

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        example = self.ds[int(i)]
        generator = torch.Generator().manual_seed(
            ((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + int(i)) % 2**63)
        return {"pixel_values": self.transform(example[self.image_column], generator),
                "labels": example[self.label_column]}


def prepare_datasets(data_args: DataTrainingArguments, aug_args: AugmentationArguments, dataset, validation_key,
                     image_processor, seed: int, do_train: bool = True, do_eval: bool = True, seeded: bool = False):
    """``(train_ds, eval_ds)`` with their transforms; ``None`` for a split not asked for. ``seeded``: training
    augmentation from :class:`SeededTransformDataset` (map-style datasets; a stream keeps the global RNG)."""
    size = _target_size(image_processor)
    mode = aug_args.interpolation or _PIL_TO_MODE.get(int(getattr(image_processor, "resample", 2) or 2), "bilinear")
    img_col, lab_col, streaming = data_args.image_column_name, data_args.label_column_name, data_args.streaming
    train_ds = eval_ds = None
    if do_train:
        train_ds = dataset["train"]
        if data_args.max_train_samples is not None:
            train_ds = (train_ds.take(data_args.max_train_samples) if streaming
                        else train_ds.shuffle(seed=seed).select(range(min(data_args.max_train_samples, len(train_ds)))))
        transform = TrainTransform(size, mode, aug_args)
        train_ds = (SeededTransformDataset(train_ds, transform, img_col, lab_col, seed) if seeded and not streaming
                    else _with_transform(train_ds, transform, img_col, lab_col, streaming))
    if do_eval:
        eval_ds = dataset[validation_key]
        if data_args.max_eval_samples is not None:
            eval_ds = (eval_ds.take(data_args.max_eval_samples) if streaming
                       else eval_ds.select(range(min(data_args.max_eval_samples, len(eval_ds)))))
        eval_ds = _with_transform(eval_ds, EvalTransform(size, mode, aug_args.eval_crop_pct), img_col, lab_col, streaming)
    return train_ds, eval_ds


def top_k(num_labels: int):
    """The k of top-k accuracy worth reporting: 1, and 5 when there are at least 5 classes."""
    return tuple(k for k in (1, 5) if k <= num_labels)

