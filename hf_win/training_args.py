"""``WinTrainingArguments``: ``transformers.TrainingArguments`` that know the Win optimizers.

Everything the Trainer already has keeps its meaning. Added:

- ``--optim`` accepts every name in ``hf_win.registry.OPTIMIZERS`` besides the built-in names;
- ``--acceleration_mode {win,win2,none}`` and ``--reckless_steps R1 R2``;
- ``--optim_args`` for a Win optimizer (``"k=v,k=v"``, a mapping, or a JSON/YAML object string; the grammar
  is ``hf_win.optim_args``) is kept as the canonical ``"k=v,k=v"`` string and validated when the arguments
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
from .optim_args import (
    MAPPED_KEYS, format_optim_args, is_win_optimizer, n_betas, optim_args_keys, optim_args_mapping, parse_win_optim_args,
)
from .registry import OPTIMIZERS, get_optimizer_spec

__all__ = [
    "WinTrainingArguments",
    "MAPPED_KEYS",
    "optim_args_keys",
    "parse_win_optim_args",
    "win_optimizer_kwargs",
    "is_win_optimizer",
    "check_win_fields",
    "validate_win_optimizer",
]

_BUILTIN_OPTIMIZERS = [o.value for o in OptimizerNames]


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
        if n_betas(spec) == 3:
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
                "Extra optimizer keywords 'key=value,key=value' (or a mapping in an argument file). For the Win "
                "optimizers: "
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
        if isinstance(self.optim_args, str) and win and self.optim_args.strip().startswith("{"):
            self.optim_args = optim_args_mapping(self.optim_args)  # an argument file's mapping on a command line
        if isinstance(self.optim_args, dict):
            # Mapping form (code, JSON, YAML): keep the canonical string the Trainer and serialization expect.
            self.optim_args = format_optim_args(self.optim_args)
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
