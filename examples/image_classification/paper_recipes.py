"""What the Win paper's ImageNet recipes (``configs/*.yaml``, translated from the authors' timm runs) need beyond
Hugging Face's example: argument files, timm's augmentation (random-resized crop, flip, RandAugment, mixup /
cutmix, label smoothing folded into soft targets, BCE), stochastic depth, zero-initialised residual blocks,
timm's weight-decay rule, and ``--config_overrides`` with lists (ResNet's ``depths=[3,4,6,3]``).

kornia does RandAugment and CutMix; the rest is plain PyTorch (no torchvision: see docs/examples.md).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import HfArgumentParser

ARGUMENT_FILE_SUFFIXES = (".yaml", ".yml", ".json")
DATA_ARGUMENTS = ("dataset_name", "train_dir", "validation_dir")
# A data source on the command line replaces the argument file's: these keys of the file are dropped.
REPLACED_BY = {"dataset_name": ("train_dir", "validation_dir"),
               "train_dir": ("dataset_name", "dataset_config_name"),
               "validation_dir": ("dataset_name", "dataset_config_name")}


class UsageError(Exception):
    """Bad input: reported as one line ``error: ...`` and exit status 2."""


# ------------------------------------------------------------------------------------------------ argument files
class ArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` whose errors are one line (the usage of TrainingArguments alone is hundreds of lines)."""

    def error(self, message):  # noqa: D401 - argparse API
        raise UsageError(message)


def load_argument_file(path: str, parser: HfArgumentParser) -> Dict[str, Any]:
    """The argument names and values of a YAML or JSON file; an unknown name is an error."""
    import yaml

    if not os.path.isfile(path):
        raise UsageError(f"argument file {path} does not exist")
    with open(path) as f:
        text = f.read()
    try:
        options = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise UsageError(f"argument file {path} does not parse: {' '.join(str(err).split())}") from None
    if not isinstance(options, dict):
        raise UsageError(f"argument file {path} must hold a mapping of argument names to values, got {type(options).__name__}")
    fields = {f.name: f for dc in parser.dataclass_types for f in dataclasses.fields(dc) if f.init}
    for key, value in options.items():
        if key not in fields:
            raise UsageError(f"{path}: unknown argument {key!r}")
        choices = fields[key].metadata.get("choices")  # argparse checks the command line's, not defaults
        if choices is not None and value is not None and value not in choices:
            raise UsageError(f"{path}: {key} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return {k: v for k, v in options.items() if v is not None}


def _as_defaults(options: Dict[str, Any]) -> Dict[str, Any]:
    """Values as argparse defaults: a string default is typed by the parser as if given on the command line, so
    scalars become the strings one would type; lists and mappings (``optim_args: {amsgrad: true}``) stay as they
    are and reach the dataclass unchanged, as through ``HfArgumentParser.parse_yaml_file``."""
    def one(value):
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value) if isinstance(value, (int, float)) else value

    return {k: one(v) for k, v in options.items()}


def parse_arguments(dataclass_types, argv: Optional[Sequence[str]],
                    defaults_without_data: Callable[[Any], Dict[str, Any]], defaults: Optional[Dict[str, Any]] = None):
    """``(*dataclasses, used_default_data)`` from the command line.

    ``argv[0]`` may be an argument file (.yaml/.yml/.json): its values become the parser's defaults, so the
    arguments after it override them, and a data source among those replaces the file's. With no data source
    anywhere, ``defaults_without_data(namespace)`` (the namespace of the file and the command line) gives the
    offline default's values, which come under both; ``defaults`` come under everything.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ArgumentParser(dataclass_types)
    parser.set_defaults(**_as_defaults(defaults or {}))
    options: Dict[str, Any] = {}
    if argv and argv[0].endswith(ARGUMENT_FILE_SUFFIXES) and not argv[0].startswith("-"):
        path, argv = argv[0], argv[1:]
        options = load_argument_file(path, parser)
        on_command_line, _ = parser.parse_known_args(argv)
        for name, replaced in REPLACED_BY.items():
            if getattr(on_command_line, name) is not None:
                options = {k: v for k, v in options.items() if k not in replaced}
        parser.set_defaults(**_as_defaults(options))
    given, _ = parser.parse_known_args(argv)
    default_data = all(getattr(given, name) is None for name in DATA_ARGUMENTS)
    if default_data:
        parser.set_defaults(**_as_defaults({**defaults_without_data(given), **options}))
    try:
        return (*parser.parse_args_into_dataclasses(args=argv), default_data)
    except ValueError as err:
        raise UsageError(" ".join(str(err).split())) from None


# ------------------------------------------------------------------------------------------------ augmentation
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
        for name in ("random_resized_crop_scale", "random_resized_crop_ratio"):
            value = [float(v) for v in getattr(self, name)]
            if len(value) != 2 or not 0 < value[0] <= value[1]:
                raise ValueError(f"--{name} takes two numbers LOW HIGH with 0 < LOW <= HIGH, got {getattr(self, name)}")
            setattr(self, name, value)
        if self.random_resized_crop_scale[1] > 1:
            raise ValueError(f"--random_resized_crop_scale HIGH must be <= 1, got {self.random_resized_crop_scale}")
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


_PIL_TO_MODE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL resample codes used by image processors


def image_size_and_interpolation(image_processor, aug: AugmentationArguments):
    """``((height, width), interpolation)`` the transforms resize to: the image processor's, or ``--interpolation``."""
    size = image_processor.size
    if "height" in size and "width" in size:
        hw = int(size["height"]), int(size["width"])
    elif "shortest_edge" in size:
        hw = int(size["shortest_edge"]), int(size["shortest_edge"])
    else:
        raise UsageError(f"cannot read an image size from the image processor's size {dict(size)}")
    return hw, aug.interpolation or _PIL_TO_MODE.get(int(getattr(image_processor, "resample", 2) or 2), "bilinear")


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
    """torchvision's RandomResizedCrop.get_params in plain torch: (top, left, h, w). (kornia's RandomResizedCrop
    resizes without antialiasing, which aliases when an ImageNet photo shrinks to 224 pixels.)"""
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
    """On the device: normalise; in training, mix the batch as timm's Mixup does in its 'batch' mode: with
    probability ``mixup_prob``, CutMix (kornia's, one box for the whole batch, each image pasted from another
    of the batch) or mixup (one Beta(alpha, alpha) weight, each image blended with the batch's reverse), and
    the soft targets mixed in the same proportions, label smoothing folded in."""

    def __init__(self, mean, std, num_labels: int, aug: AugmentationArguments, label_smoothing: float,
                 channels_last: bool = False):
        super().__init__()
        self.channels_last = channels_last
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.num_labels, self.aug, self.smoothing = num_labels, aug, float(label_smoothing)
        self.cutmix = None
        if aug.cutmix_alpha > 0:
            import kornia
            from kornia.augmentation import RandomCutMixV2

            if "use_correct_lambda" not in inspect.signature(RandomCutMixV2).parameters:
                raise UsageError(f"--cutmix_alpha needs a kornia whose RandomCutMixV2 takes use_correct_lambda "
                                 f"(0.9 does), found kornia {kornia.__version__}: pip install -U kornia")
            # use_correct_lambda: the third column is the share of each image kept (1 - the box's area).
            self.cutmix = RandomCutMixV2(beta=aug.cutmix_alpha, same_on_batch=True, use_correct_lambda=True,
                                         data_keys=["input", "class"])

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean.to(x.device, x.dtype)) / self.std.to(x.device, x.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def soft_targets(self, labels: torch.Tensor) -> torch.Tensor:
        off = self.smoothing / self.num_labels
        return torch.full((labels.shape[0], self.num_labels), off, device=labels.device).scatter_(
            1, labels.view(-1, 1), 1.0 - self.smoothing + off
        )

    def _choice(self) -> Optional[str]:
        aug = self.aug
        if not aug.mixing or float(torch.rand(())) >= aug.mixup_prob:
            return None
        if aug.cutmix_alpha > 0 and (aug.mixup_alpha <= 0 or float(torch.rand(())) < aug.mixup_switch_prob):
            return "cutmix"
        return "mixup"

    def forward(self, x: torch.Tensor, labels: torch.Tensor):
        x = self.normalize(x)
        target = self.soft_targets(labels)
        choice = self._choice()
        if choice == "cutmix":
            x, mixed = self.cutmix(x, labels)  # mixed[0]: (label, label pasted in, share of the image kept)
            x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
            kept = mixed[0, :, 2:3].to(target.dtype)
            target = target * kept + self.soft_targets(mixed[0, :, 1].long()) * (1.0 - kept)
        elif choice == "mixup":
            lam = float(np.random.beta(self.aug.mixup_alpha, self.aug.mixup_alpha))
            x = x * lam + x.flip(0) * (1.0 - lam)
            target = target * lam + target.flip(0) * (1.0 - lam)
        return x, target


def soft_target_loss(logits: torch.Tensor, target: torch.Tensor, bce: bool) -> torch.Tensor:
    """Cross-entropy on soft targets (mixup / cutmix / label smoothing), or BCE on them (timm --bce-loss)."""
    logits = logits.float()
    if bce:
        return F.binary_cross_entropy_with_logits(logits, target)
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


# ------------------------------------------------------------------------------------------------ models
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


def decay_parameter_names(model, weight_decay_filter: str) -> List[str]:
    """The parameters that get weight decay. 'trainer': the Trainer's rule (all but biases and LayerNorm-type
    weights; BatchNorm weights do get decay); 'all': every parameter (timm --bias-decay); 'timm': all but 1-d
    parameters (biases, BatchNorm and LayerNorm weights), position embeddings and the class token (timm's
    param_groups_weight_decay with DeiT's no_weight_decay())."""
    named = list(model.named_parameters())
    if weight_decay_filter == "trainer":
        from transformers import Trainer

        return Trainer.get_decay_parameter_names(None, model)  # uses nothing of the Trainer instance
    if weight_decay_filter == "all":
        return [n for n, _ in named]
    return [n for n, p in named if p.ndim > 1 and not n.endswith(".bias")
            and not n.endswith(("position_embeddings", "cls_token", "mask_token"))]


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
