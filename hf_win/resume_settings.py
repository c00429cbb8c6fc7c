"""After a ``WinTrainer`` resume: the settings given at resume over the checkpoint's where the rule says so,
and the arguments rewritten to say what runs.

Loading a checkpoint gives the optimizer the checkpoint's hyper-parameters (torch's rule; the optimizer's
own rules for ``acceleration_mode`` and ``state_dtype`` are in ``WinOptimizer.load_state_dict``). Then:

- ``state_dtype``, ``bf16_stochastic_round`` and ``rounding_seed`` given in ``--optim_args`` win over the
  checkpoint's (the state is converted to a given ``state_dtype``; ``none``: the parameters' dtype);
- every other value that now runs and differs from what the arguments say (another ``--optim_args`` key,
  the betas, eps, the reckless steps) is the checkpoint's: the arguments are rewritten to it, so the
  saved ``training_args.bin``, the model card and ``trainer_state.json`` say what runs.

Each change is returned as a note for the Trainer to log (a warning). The rewriting serves any run whose
optimizer holds other values than its arguments say (one passed to the Trainer ready-made, too).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch

from .optim._state_dict import set_state_dtype
from .optim_args import format_optim_args, optim_args_keys, parse_win_optim_args
from .registry import get_optimizer_spec

__all__ = ["GIVEN_WINS", "apply_given_settings", "describe_running_settings"]

#: ``--optim_args`` keys whose given value wins over the checkpoint's at resume.
GIVEN_WINS = ("state_dtype", "bf16_stochastic_round", "rounding_seed")

#: Standard fields the optimizer's param groups hold a value of, and how to read it from a group.
_FIELDS: Dict[str, Callable[[dict], Any]] = {
    "adam_beta1": lambda g: g["betas"][0],
    "adam_beta2": lambda g: g["betas"][1],
    "adam_epsilon": lambda g: g["eps"],
    "reckless_steps": lambda g: [float(r) for r in g["reckless_steps"]],
}


def _plain(value):
    """A dtype (or its spelling ``"torch.bfloat16"``) as its short name; other values unchanged."""
    if isinstance(value, torch.dtype) or (isinstance(value, str) and value.startswith("torch.")):
        return str(value).replace("torch.", "")
    return value


def _group_value(group: dict, key: str):
    return _plain(group["betas"][2] if key == "beta3" else group.get(key))


def apply_given_settings(args, optimizer) -> List[str]:
    """Set the :data:`GIVEN_WINS` keys given in ``args.optim_args`` in every param group of ``optimizer``
    where the loaded value differs; a note per change."""
    given = parse_win_optim_args(args.optim, args.optim_args)
    notes = []
    for i, group in enumerate(optimizer.param_groups):
        for key in GIVEN_WINS:
            if key in given and _group_value(group, key) != _plain(given[key]):
                notes.append(f"param group {i}: {key}={given[key]!r} given in --optim_args replaces the "
                             f"checkpoint's {_group_value(group, key)!r}"
                             + (" (the state is converted)" if key == "state_dtype" else ""))
                if key == "state_dtype":
                    set_state_dtype(optimizer, group, given[key])
                else:
                    group[key] = given[key]
    return notes


def _one_value(groups, read):
    values = []
    for g in groups:
        v = read(g)
        if v not in values:
            values.append(v)
    return values


def describe_running_settings(args, optimizer, source: str = "the checkpoint's") -> List[str]:
    """Rewrite ``args`` (its ``optim_args`` and the standard fields of :data:`_FIELDS`) to the values the
    param groups of ``optimizer`` hold where all groups agree; a note per rewritten value (``source``: whose
    value it is), and one per value the groups do not agree on (which one string cannot say)."""
    spec = get_optimizer_spec(args.optim)
    given = parse_win_optim_args(spec.name, args.optim_args)
    defaults = spec.hyperparameters
    groups = optimizer.param_groups
    notes, running = [], dict(given)
    for key in optim_args_keys(spec.name):
        said = _plain(given.get(key, defaults["betas"][2] if key == "beta3" else defaults[key]))
        values = _one_value(groups, lambda g: _group_value(g, key))
        if len(values) > 1:
            notes.append(f"{key} differs between param groups ({values}), as {source} value")
        elif values[0] != said:
            running[key] = values[0]
            notes.append(f"{key}={values[0]!r} runs ({source}), not {said!r}")
    for field, read in _FIELDS.items():
        if field.startswith("adam_") and ("betas" if "beta" in field else "eps") not in spec.accepted_keys:
            continue
        values = _one_value(groups, read)
        if len(values) > 1:
            notes.append(f"{field} differs between param groups ({values}), as {source} value")
        elif values[0] != getattr(args, field):
            notes.append(f"--{field} {values[0]} runs ({source}), not {getattr(args, field)}")
            setattr(args, field, values[0])
    if running != given:
        args.optim_args = format_optim_args(running)
    return notes
