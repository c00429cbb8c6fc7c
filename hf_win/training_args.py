"""``WinTrainingArguments``: ``transformers.TrainingArguments`` that know the Win optimizers.

Everything the Trainer already has keeps its meaning. Added:

- ``--optim`` accepts every name in ``hf_win.registry.OPTIMIZERS`` besides the built-in names;
- ``--acceleration_mode {win,win2,none}`` and ``--reckless_steps R1 R2``;
- ``--optim_args "k=v,k=v"`` for a Win optimizer is parsed, typed and validated here, when the arguments
  are built (command line, JSON, YAML or code), by constructing the optimizer over a dummy parameter.

The mapping from arguments to optimizer keywords lives in :func:`win_optimizer_kwargs` (used by
``WinTrainer`` and ``hf_win.get_optimizer_cls_and_kwargs``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from transformers import TrainingArguments
from transformers.training_args import OptimizerNames

from .optim import MODES
from .registry import OPTIMIZERS, OptimizerSpec, get_optimizer_spec

__all__ = [
    "WinTrainingArguments",
    "MAPPED_KEYS",
    "optim_args_keys",
    "parse_win_optim_args",
    "win_optimizer_kwargs",
    "is_win_optimizer",
    "optim_args_markdown_table",
    "check_win_fields",
    "validate_win_optimizer",
]

# Constructor keywords that come from standard TrainingArguments fields (or are fixed under the Trainer),
# so ``--optim_args`` must not set them. Value: which argument sets it instead.
MAPPED_KEYS: Dict[str, str] = {
    "lr": "--learning_rate",
    "betas": "--adam_beta1 / --adam_beta2",
    "eps": "--adam_epsilon",
    "weight_decay": "--weight_decay",
    "acceleration_mode": "--acceleration_mode",
    "reckless_steps": "--reckless_steps",
    "max_grad_norm": "--max_grad_norm (the Trainer clips; the optimizer's own clipping stays off under the Trainer)",
}

# Constructor keywords accepted only at torch's default (False), so that code written for torch.optim
# passes them through; nothing to set under the Trainer, so not --optim_args keys.
TORCH_ONLY_KEYS: Dict[str, str] = {
    "capturable": "CUDA graphs need torch.optim.AdamW/Adam(capturable=True)",
    "differentiable": "a differentiable step needs torch.optim's differentiable=True",
}

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}
_NONE = {"none", "null", "auto"}

_BUILTIN_OPTIMIZERS = [o.value for o in OptimizerNames]


def is_win_optimizer(name: Any) -> bool:
    return isinstance(name, str) and name.lower() in OPTIMIZERS


def _n_betas(spec: OptimizerSpec) -> int:
    return int(getattr(spec.cls, "_n_betas", 2)) if "betas" in spec.accepted_keys else 0


def optim_args_keys(name: str) -> Dict[str, str]:
    """The ``--optim_args`` keys registry optimizer ``name`` accepts -> the kind of value ("float", "int",
    "bool", "bool|none", "dtype|none"). Derived from the constructor signature minus :data:`MAPPED_KEYS`
    (``state_dtype`` and ``rounding_seed`` by name); a third beta (Adan) is ``beta3``."""
    spec = get_optimizer_spec(name)
    keys: Dict[str, str] = {}
    if _n_betas(spec) == 3:
        keys["beta3"] = "float"
    for key, default in spec.hyperparameters.items():
        if key in MAPPED_KEYS or key in TORCH_ONLY_KEYS:
            continue
        if key in _KINDS:
            keys[key] = _KINDS[key]
        elif isinstance(default, bool):
            keys[key] = "bool"
        elif default is None:
            keys[key] = "bool|none"
        elif isinstance(default, (int, float)):
            keys[key] = "float"
        else:  # pragma: no cover - a new constructor keyword of another kind must be added here
            raise TypeError(
                f"{spec.name}: cannot map constructor keyword {key!r} (default {default!r}) to --optim_args"
            )
    return keys


# Keywords whose kind the default does not tell (None for a dtype, 0 for an int).
_KINDS = {"state_dtype": "dtype|none", "rounding_seed": "int", "ns_steps": "int"}

_FIELD_OF = {
    "lr": "`--learning_rate`",
    "eps": "`--adam_epsilon`",
    "weight_decay": "`--weight_decay`",
}


def optim_args_markdown_table() -> str:
    """The README table: for each registry optimizer, its ``--optim_args`` keys with their defaults, and
    which standard TrainingArguments fields it takes. Generated from the registry."""
    rows = [
        "| `--optim` | `--optim_args` keys (default) | from the standard fields |",
        "|---|---|---|",
    ]
    for name, spec in OPTIMIZERS.items():
        hyper = spec.hyperparameters
        keys = []
        for key in optim_args_keys(name):
            default = hyper["betas"][2] if key == "beta3" else hyper[key]
            keys.append(f"`{key}` ({default})")
        fields = []
        for key in ("lr", "betas", "eps", "weight_decay"):
            if key not in hyper:
                continue
            if key == "betas":
                third = ", `beta3`" if _n_betas(spec) == 3 else ""
                fields.append(f"betas = (`--adam_beta1`, `--adam_beta2`{third})")
            else:
                fields.append(f"{key} = {_FIELD_OF[key]}")
        rows.append(f"| `{name}` | {', '.join(keys) or '-'} | {', '.join(fields)} |")
    return "\n".join(rows)


def _convert(name: str, key: str, kind: str, raw: Any) -> Any:
    accepted = {"bool": "true/false", "bool|none": "true/false/none", "float": "a number",
                "int": "an integer in [0, 2**31)", "dtype|none": "float32, bfloat16 or none"}[kind]
    if kind == "dtype|none":
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in _NONE):
            return None
        if isinstance(raw, torch.dtype):
            raw = str(raw)
        if isinstance(raw, str) and raw.strip().lower().replace("torch.", "") in ("float32", "bfloat16"):
            return raw.strip().lower().replace("torch.", "")
        raise ValueError(f"--optim_args: {key}={raw!r} for {name} is not valid; {key} takes {accepted}")
    if kind == "int":
        text = raw.strip() if isinstance(raw, str) else raw
        if isinstance(text, str) and text.lstrip("+").isdigit():
            text = int(text)
        if isinstance(text, int) and not isinstance(text, bool) and 0 <= text < 2**31:
            return text
        raise ValueError(f"--optim_args: {key}={raw!r} for {name} is not valid; {key} takes {accepted}")
    if not isinstance(raw, str):  # from a dict (code, JSON, YAML)
        if kind.startswith("bool") and isinstance(raw, bool):
            return raw
        if kind == "bool|none" and raw is None:
            return None
        if kind == "float" and isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        raw = str(raw)
    text = raw.strip().lower()
    if kind.startswith("bool"):
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        if kind == "bool|none" and text in _NONE:
            return None
    else:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is not None and math.isfinite(value):
            return value
    raise ValueError(f"--optim_args: {key}={raw!r} for {name} is not valid; {key} takes {accepted}")


def parse_win_optim_args(name: str, optim_args: Any) -> Dict[str, Any]:
    """Parse ``--optim_args`` (``"k=v,k=v"`` or a dict) for registry optimizer ``name`` into typed values.

    Raises ``ValueError`` naming the accepted keys for an unknown key, a key set by another argument, a
    malformed item or a value of the wrong kind.
    """
    spec = get_optimizer_spec(name)
    accepted = optim_args_keys(spec.name)
    listing = ", ".join(f"{k} ({v})" for k, v in accepted.items()) or "none"
    if optim_args is None or optim_args == "" or optim_args == {}:
        return {}
    if isinstance(optim_args, dict):
        items = list(optim_args.items())
    elif isinstance(optim_args, str):
        items = []
        for item in optim_args.split(","):
            item = item.strip()
            if not item:
                continue
            if item.count("=") != 1:
                raise ValueError(
                    f"--optim_args: {item!r} is not of the form key=value; {spec.name} accepts: {listing}"
                )
            k, v = item.split("=")
            items.append((k.strip(), v.strip()))
    else:
        raise ValueError(
            f"--optim_args must be a string 'key=value,key=value' or a dict, got {type(optim_args).__name__}"
        )
    out: Dict[str, Any] = {}
    for key, raw in items:
        if key in out:
            raise ValueError(f"--optim_args: {key} is given twice")
        if key in MAPPED_KEYS:
            raise ValueError(
                f"--optim_args: {key} is not an --optim_args key; set it with {MAPPED_KEYS[key]}. "
                f"{spec.name} accepts in --optim_args: {listing}"
            )
        if key in TORCH_ONLY_KEYS:
            raise ValueError(
                f"--optim_args: {key} is not an --optim_args key: the Win optimizers accept only {key}=False, "
                f"torch's default ({TORCH_ONLY_KEYS[key]}). {spec.name} accepts in --optim_args: {listing}"
            )
        if key not in accepted:
            raise ValueError(f"--optim_args: {spec.name} does not use {key!r}; it accepts: {listing}")
        out[key] = _convert(spec.name, key, accepted[key], raw)
    return out


def win_optimizer_kwargs(args: "TrainingArguments") -> Tuple[type, Dict[str, Any]]:
    """``(optimizer class, constructor keywords)`` for ``args.optim`` a registry name.

    lr, weight_decay, betas and eps come from the standard fields; ``max_grad_norm`` is 0 because the
    Trainer does the clipping (``--max_grad_norm``).
    """
    spec = get_optimizer_spec(args.optim)
    extra = parse_win_optim_args(spec.name, getattr(args, "optim_args", None))
    accepted = spec.accepted_keys
    kwargs: Dict[str, Any] = {"lr": float(args.learning_rate)}
    if "betas" in accepted:
        betas = [float(args.adam_beta1), float(args.adam_beta2)]
        if _n_betas(spec) == 3:
            beta3 = extra.pop("beta3", spec.hyperparameters["betas"][2])
            betas.append(float(beta3))
        kwargs["betas"] = tuple(betas)
    if "eps" in accepted:
        kwargs["eps"] = float(args.adam_epsilon)
    kwargs["weight_decay"] = float(args.weight_decay)
    kwargs["acceleration_mode"] = getattr(args, "acceleration_mode", "win")
    kwargs["reckless_steps"] = tuple(float(r) for r in getattr(args, "reckless_steps", (2.0, 8.0)))
    if "max_grad_norm" in accepted:  # explicit 0.0: the Trainer clips (LAMB's constructor default would be 1.0)
        kwargs["max_grad_norm"] = 0.0
    kwargs.update(extra)
    return spec.cls, kwargs


def check_win_fields(args, win: bool) -> None:
    """Check ``acceleration_mode`` and ``reckless_steps`` of ``args`` (any object with the fields; ``win``: a Win
    ``--optim``), normalising ``reckless_steps`` to two floats. ``ValueError`` naming the allowed values."""
    if args.acceleration_mode not in MODES:
        raise ValueError(
            f"acceleration_mode must be one of {', '.join(MODES)}, got {args.acceleration_mode!r}"
        )
    rs = args.reckless_steps
    if isinstance(rs, str):
        rs = rs.replace(",", " ").split()
    try:
        rs = [float(r) for r in rs]
    except (TypeError, ValueError):
        rs = None
    if rs is None or len(rs) != 2 or not all(math.isfinite(r) and r > 0 for r in rs):
        raise ValueError(
            f"reckless_steps must be two positive numbers R1 R2 (e.g. --reckless_steps 2.0 8.0), "
            f"got {args.reckless_steps!r}"
        )
    args.reckless_steps = rs
    if not win and (args.acceleration_mode != "win" or args.reckless_steps != [2.0, 8.0]):
        raise ValueError(
            f"acceleration_mode / reckless_steps apply to the Win optimizers ({', '.join(OPTIMIZERS)}), "
            f"not to optim={args.optim!r}"
        )


def validate_win_optimizer(args) -> None:
    """Build ``args.optim`` (a registry name) over a dummy parameter from the fields of ``args`` (any object with
    the WinTrainingArguments field names): a bad hyper-parameter fails here, before any training state exists."""
    spec = get_optimizer_spec(args.optim)
    if "betas" not in spec.accepted_keys:
        ref = TrainingArguments.__dataclass_fields__
        for f in ("adam_beta1", "adam_beta2"):
            if getattr(args, f) != ref[f].default:
                raise ValueError(
                    f"--{f} is not used by {spec.name} (it has no betas); accepted --optim_args: "
                    f"{', '.join(optim_args_keys(spec.name))}"
                )
    cls, kwargs = win_optimizer_kwargs(args)
    dummy = torch.zeros(1, requires_grad=True)
    try:
        with warnings.catch_warnings():  # advice (LAMB without trust ratio) comes once, from the real one
            warnings.simplefilter("ignore")
            cls([dummy], **kwargs)
    except ValueError as err:
        raise ValueError(
            f"invalid hyper-parameters for --optim {spec.name}: {err} "
            f"(--optim_args accepts: {', '.join(optim_args_keys(spec.name)) or 'nothing'})"
        ) from None


_ACCEL_HELP = (
    "Win acceleration for the --optim Win optimizers (hf_win registry names). "
    "'win': one extra state x per parameter; each step mixes a conservative step of size lr with a reckless "
    "step of size r1*lr. 'win2': two extra states x and y, adds a second reckless step of size r2*lr "
    "(faster, one more parameter-sized buffer). 'none': the base optimizer unaccelerated."
)
_RECKLESS_HELP = (
    "The two reckless step multipliers r1 r2 (both > 0) of Win/Win2: the reckless steps have sizes r1*lr and "
    "r2*lr (Win uses r1 only). Default 2.0 8.0, the paper's value in all experiments."
)


@dataclass
class WinTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the Win flags. Use exactly like ``TrainingArguments`` (code,
    ``HfArgumentParser`` command line, JSON or YAML files)."""

    optim: str = field(
        default="adamw_win",
        metadata={
            "help": (
                "The optimizer. Win optimizers (hf_win): "
                + ", ".join(OPTIMIZERS)
                + "; or any built-in Transformers optimizer name. lr, weight decay, betas and eps come from "
                "--learning_rate, --weight_decay, --adam_beta1/--adam_beta2, --adam_epsilon; other Win "
                "hyper-parameters through --optim_args."
            ),
            "choices": list(OPTIMIZERS) + _BUILTIN_OPTIMIZERS,
        },
    )
    optim_args: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "Extra optimizer keywords 'key=value,key=value'. For the Win optimizers: "
                + "; ".join(f"{n}: {', '.join(optim_args_keys(n)) or '-'}" for n in OPTIMIZERS)
                + ". Checked when the arguments are parsed."
            )
        },
    )
    acceleration_mode: str = field(
        default="win",
        metadata={"help": _ACCEL_HELP, "choices": list(MODES)},
    )
    reckless_steps: List[float] = field(
        default_factory=lambda: [2.0, 8.0],
        metadata={"help": _RECKLESS_HELP},
    )
    max_grad_norm: float = field(
        default=1.0,
        metadata={
            "help": (
                "Maximum gradient norm for gradient clipping (global norm, correct across processes). Set to 0 "
                "to disable. With a Win optimizer this is the only clipping: the optimizer's own max_grad_norm "
                "stays 0 under the Trainer."
            )
        },
    )

    def __post_init__(self):
        optim = self.optim.value if isinstance(self.optim, OptimizerNames) else self.optim
        if not isinstance(optim, str) or (optim.lower() not in OPTIMIZERS and optim not in _BUILTIN_OPTIMIZERS):
            raise ValueError(
                f"optim={optim!r} is not an optimizer name; Win optimizers: {', '.join(OPTIMIZERS)}; "
                f"built-in: {', '.join(_BUILTIN_OPTIMIZERS)}"
            )
        win = optim.lower() in OPTIMIZERS
        self._check_win_fields(win)
        if isinstance(self.optim_args, dict):
            # Dict form (code, JSON, YAML): keep the canonical string the Trainer and serialization expect.
            self.optim_args = ",".join(f"{k}={v}" for k, v in self.optim_args.items()) or None
        if win:
            # TrainingArguments converts optim to the OptimizerNames enum, which does not know our names.
            self.optim = "adamw_torch"
            try:
                super().__post_init__()
            finally:
                self.optim = optim.lower()
            self._validate_win_optimizer()
        else:
            super().__post_init__()

    def _check_win_fields(self, win: bool) -> None:
        check_win_fields(self, win)

    def _validate_win_optimizer(self) -> None:
        validate_win_optimizer(self)

    def set_optimizer(
        self,
        name: str = "adamw_win",
        learning_rate: float = 5e-5,
        weight_decay: float = 0,
        beta1: float = 0.9,
        beta2: float = 0.999,
        epsilon: float = 1e-8,
        args: Optional[str] = None,
        acceleration_mode: str = "win",
        reckless_steps=(2.0, 8.0),
    ):
        """``TrainingArguments.set_optimizer`` that also takes the Win names and flags (validated)."""
        previous = {k: getattr(self, k) for k in (
            "optim", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "optim_args",
            "acceleration_mode", "reckless_steps")}
        self.optim = name.value if isinstance(name, OptimizerNames) else name
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.adam_beta1 = beta1
        self.adam_beta2 = beta2
        self.adam_epsilon = epsilon
        self.optim_args = args
        self.acceleration_mode = acceleration_mode
        self.reckless_steps = list(reckless_steps)
        try:
            win = is_win_optimizer(self.optim)
            if not win:
                self.optim = OptimizerNames(self.optim)
            else:
                self.optim = self.optim.lower()
            self._check_win_fields(win)
            if win:
                self._validate_win_optimizer()
        except ValueError:
            for k, v in previous.items():
                setattr(self, k, v)
            raise
        return self
