"""The ``--optim_args`` grammar for the registry optimizers: which keys each one takes and how text becomes
a value.

``--optim_args`` is ``"key=value,key=value"``, a JSON/YAML object string (``'{"amsgrad": true}'``: what an
argument file's mapping becomes on a command line) or a mapping (code, JSON and YAML argument files).
This module reads the words (``true``/``false``, ``none``, numbers, dtype names, seeds) into Python values, the
dtype names as the optimizer reads them; whether a value is allowed for its optimizer (a beta in [0, 1), ...)
is the optimizer's own validation, run when the arguments are built
(``hf_win.training_args.validate_win_optimizer``).
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, Mapping

import torch

from .optim._precision import STATE_DTYPES, as_dtype as _as_dtype
from .registry import OPTIMIZERS, OptimizerSpec, get_optimizer_spec

__all__ = ["MAPPED_KEYS", "TORCH_ONLY_KEYS", "is_win_optimizer", "n_betas", "optim_args_keys",
           "parse_win_optim_args", "format_optim_args", "optim_args_mapping"]

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

# Keywords whose kind the default does not tell (None for a dtype, 0 for an int).
_KINDS = {"state_dtype": "dtype|none", "rounding_seed": "int", "ns_steps": "int"}
_ACCEPTED = {"bool": "true/false", "bool|none": "true/false/none", "float": "a number",
             "int": "an integer in [0, 2**31)", "dtype|none": f"{', '.join(STATE_DTYPES)} or none"}


def is_win_optimizer(name: Any) -> bool:
    return isinstance(name, str) and name.lower() in OPTIMIZERS


def n_betas(spec: OptimizerSpec) -> int:
    """How many betas the optimizer takes (0: none; Adan's third is the ``beta3`` key)."""
    return int(getattr(spec.cls, "_n_betas", 2)) if "betas" in spec.accepted_keys else 0


def optim_args_keys(name: str) -> Dict[str, str]:
    """The ``--optim_args`` keys registry optimizer ``name`` accepts -> the kind of value ("float", "int",
    "bool", "bool|none", "dtype|none"). Derived from the constructor signature minus :data:`MAPPED_KEYS`
    (``state_dtype`` and ``rounding_seed`` by name); a third beta (Adan) is ``beta3``."""
    spec = get_optimizer_spec(name)
    keys: Dict[str, str] = {}
    if n_betas(spec) == 3:
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


def _dtype_name(value) -> str:
    """The name of a state dtype, as the optimizer reads it (``_as_dtype``: names, ``torch.`` names, dtypes)."""
    dtype = _as_dtype(value)  # ValueError for anything else
    return next(name for name, d in STATE_DTYPES.items() if d == dtype)


def _int31(value: int) -> int:
    """``value`` if it is in [0, 2**31) (the seeds the rounding takes), else ``ValueError``."""
    if not 0 <= value < 2**31:
        raise ValueError
    return value


def _word(raw: Any, kind: str) -> Any:
    """``raw`` (text, or a value from a mapping) as a value of ``kind``; ``ValueError`` if it is not one."""
    if isinstance(raw, str):
        text = raw.strip().lower()
        if kind.endswith("|none") and text in _NONE:
            return None
        if kind.startswith("bool") and text in _TRUE | _FALSE:
            return text in _TRUE
        if kind == "dtype|none":
            return _dtype_name(text)
        if kind == "int" and text.lstrip("+-").isdigit():
            return _int31(int(text))
        if kind == "float":
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if math.isfinite(value):
                return value
        raise ValueError
    if raw is None and kind.endswith("|none"):
        return None
    if isinstance(raw, bool):
        if kind.startswith("bool"):
            return raw
        raise ValueError
    if kind == "dtype|none" and isinstance(raw, torch.dtype):
        return _dtype_name(raw)
    if kind == "int" and isinstance(raw, int):
        return _int31(raw)
    if kind == "float" and isinstance(raw, (int, float)) and math.isfinite(raw):
        return float(raw)
    raise ValueError


def optim_args_mapping(text: str) -> Dict[str, Any]:
    """A JSON or YAML object string (``'{"amsgrad": true}'``) as a dict; ``ValueError`` if it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        import yaml

        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"--optim_args: {text!r} is not a JSON/YAML mapping: {' '.join(str(err).split())}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--optim_args: {text!r} is not a mapping of keys to values")
    return value


def _items(optim_args: Any, listing: str, name: str) -> list:
    if isinstance(optim_args, Mapping):
        return list(optim_args.items())
    if not isinstance(optim_args, str):
        raise ValueError(
            f"--optim_args must be a string 'key=value,key=value' or a mapping, got {type(optim_args).__name__}"
        )
    if optim_args.strip().startswith("{"):
        return list(optim_args_mapping(optim_args).items())
    items = []
    for item in optim_args.split(","):
        item = item.strip()
        if not item:
            continue
        if item.count("=") != 1:
            raise ValueError(f"--optim_args: {item!r} is not of the form key=value; {name} accepts: {listing}")
        k, v = item.split("=")
        items.append((k.strip(), v.strip()))
    return items


def parse_win_optim_args(name: str, optim_args: Any) -> Dict[str, Any]:
    """Parse ``--optim_args`` (``"k=v,k=v"``, a JSON/YAML object string or a mapping) for registry optimizer
    ``name`` into typed values.

    Raises ``ValueError`` naming the accepted keys for an unknown key, a key set by another argument, a
    malformed item or a value of the wrong kind.
    """
    spec = get_optimizer_spec(name)
    accepted = optim_args_keys(spec.name)
    listing = ", ".join(f"{k} ({v})" for k, v in accepted.items()) or "none"
    if optim_args is None or optim_args == "" or optim_args == {}:
        return {}
    out: Dict[str, Any] = {}
    for key, raw in _items(optim_args, listing, spec.name):
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
        try:
            out[key] = _word(raw, accepted[key])
        except ValueError:
            raise ValueError(
                f"--optim_args: {key}={raw!r} for {spec.name} is not valid; {key} takes {_ACCEPTED[accepted[key]]}"
            ) from None
    return out


def format_optim_args(values: Mapping[str, Any]) -> Any:
    """``values`` (a mapping, e.g. from an argument file) as the canonical ``"key=value,key=value"`` string
    that ``--optim_args`` takes and the saved arguments keep (None for an empty mapping)."""
    def text(v):
        return str(v).replace("torch.", "") if isinstance(v, torch.dtype) else str(v)

    return ",".join(f"{k}={text(v)}" for k, v in values.items()) or None
