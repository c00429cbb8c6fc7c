"""What ``WinOptimizer.load_state_dict`` accepts, converts and refuses (the rules are in its docstring).

``prepare`` works on a copy of the incoming state dict and raises ``ValueError`` (naming both sides)
before the optimizer is touched; after ``torch.optim.Optimizer.load_state_dict``, ``set_loaded_dtypes``
puts every buffer in its group's state dtype and ``finish`` creates or drops the Win sequences of a
converted acceleration mode. The Win sequences are kept as ``x``/``y`` or, with bfloat16 state, as
differences from the parameter (``x_delta``/``y_delta``, see ``_win.py``); a checkpoint in the other form
is converted (``convert_sequences``) with the current parameters, so load the model before the optimizer
(as the Trainer and Accelerate do).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _precision
from ._validation import check_group, normalize
from ._sharding import is_dtensor
from ._win import DIFFERENCE_KEYS, MODES, extra_state_keys, sequence_keys, stores_differences

#: Top-level key of the state dicts hf_win writes: which class saved it. Optional on load (the authors'
#: code, older hf_win versions and wrappers that rebuild the dict do not have it).
MARK = "hf_win"

#: torch.optim state names -> ours, per torch class.
_TORCH_RENAMES = {"SGD": {"momentum_buffer": "momentum"}, "Adam": {}, "AdamW": {}}
#: How a step runs, not what it computes: for a torch state dict these come from this optimizer.
_RUN_FLAGS = ("foreach", "fused", "capturable", "differentiable")
#: Group keys of torch.optim that hf_win does not have (checked, then dropped).
_TORCH_ONLY_GROUP_KEYS = ("decoupled_weight_decay",)


def checkpoint_name(cls) -> str:
    """The name a class's checkpoints carry: the nearest class (itself or a parent) that defines its own
    ``_direction``, i.e. whose state it keeps. A subclass that only changes defaults shares its parent's."""
    for klass in cls.__mro__:
        if "_direction" in vars(klass):
            return klass.__name__
    return cls.__name__


def _torch_class(groups, states) -> Optional[str]:
    keys = set().union(*(set(g) for g in groups)) if groups else set()
    state_keys = set().union(*(set(s) for s in states.values())) if states else set()
    if "momentum_buffer" in state_keys or {"momentum", "dampening", "nesterov"} <= keys:
        return "SGD"
    if {"betas", "amsgrad"} <= keys:
        flags = {g.get("decoupled_weight_decay") for g in groups}
        if flags == {True}:
            return "AdamW"
        if flags == {False}:
            return "Adam"
        return "Adam or AdamW"  # torch before decoupled_weight_decay was a group key: the same layout
    return None


def prepare(opt, state_dict: dict) -> Tuple[dict, List[str]]:
    """A converted copy of ``state_dict`` for ``torch.optim.Optimizer.load_state_dict`` and the notes on
    what was converted (empty: loaded as saved). Raises ``ValueError`` for what it refuses."""
    target = checkpoint_name(type(opt))
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(f"{target}.load_state_dict: expected a dict with 'state' and 'param_groups', got "
                         f"{type(state_dict).__name__}{' with keys ' + str(sorted(state_dict)) if isinstance(state_dict, dict) else ''}")
    saved_groups = [dict(g) for g in state_dict["param_groups"]]
    states = {k: dict(v) for k, v in state_dict["state"].items()}
    notes: List[str] = []
    mark = state_dict.get(MARK)

    if mark is not None:
        source = mark.get("class")
        if source != target:
            raise ValueError(
                f"{target}.load_state_dict: this state dict was saved by hf_win {source}, and this optimizer is "
                f"{target}: {source}'s state does not mean the same here, so it is not converted. Resume it with "
                f"{source} (state dicts of torch.optim's {', '.join(_TORCH_RENAMES)} are converted into "
                f"the hf_win optimizer of the same name)"
            )
        describe = f"hf_win {source}"
    elif saved_groups and all("acceleration_mode" in g for g in saved_groups):
        describe = "a Win state dict without hf_win's class mark (the authors' code or an older hf_win)"
    else:
        torch_name = _torch_class(saved_groups, states)
        accepted = getattr(opt, "_torch_sources", ())
        if torch_name is None:
            keys = sorted(set().union(*(set(g) for g in saved_groups)) - {"params"}) if saved_groups else []
            state_keys = sorted(set().union(*(set(s) for s in states.values()))) if states else []
            raise ValueError(
                f"{target}.load_state_dict: this state dict is not from an hf_win optimizer nor from a "
                f"torch.optim class it converts (param group keys {keys}, state keys {state_keys}); "
                f"{target} converts {', '.join('torch.optim.' + s for s in accepted) or 'no torch.optim state dict'}"
            )
        ok = [s for s in accepted if s in torch_name.split(" or ")]
        if not ok:
            raise ValueError(
                f"{target}.load_state_dict: this is a torch.optim.{torch_name} state dict; {target} converts "
                f"{', '.join('torch.optim.' + s for s in accepted) or 'no torch.optim state dict'} only"
                + (" (its weight decay is applied differently)" if "Adam" in torch_name else "")
                + ". Build the hf_win optimizer of the same name to resume it"
            )
        renames = _TORCH_RENAMES[ok[0]]
        converted = {}
        for pid, st in states.items():
            new = {}
            for k, v in st.items():
                k = renames.get(k, k)
                if v is None:  # torch SGD without momentum keeps momentum_buffer=None
                    continue
                if k == "step":
                    v = int(v.item()) if isinstance(v, Tensor) else int(v)
                new[k] = v
            if ok[0] == "SGD" and "momentum" in new:
                new["step"] = 1  # torch's SGD counts no steps; SGD-Win's count only says the buffer exists
            converted[pid] = new
        states = converted
        for g in saved_groups:
            for k in _TORCH_ONLY_GROUP_KEYS:
                g.pop(k, None)
            for k in _RUN_FLAGS:
                g.pop(k, None)
        describe = f"torch.optim.{torch_name}"
        notes.append(
            f"converted a torch.optim.{torch_name} state dict: its {', '.join(sorted(set(renames.values())) or ['moments'])} "
            f"and step counts are taken over, its hyper-parameters too (as torch loads them); "
            f"acceleration_mode, reckless_steps, max_grad_norm and the run flags ({', '.join(_RUN_FLAGS)}) are "
            f"this optimizer's, and the Win sequences start from the current parameters"
        )

    # Keys this optimizer has and the saved groups do not (older checkpoints, the authors' code, torch):
    # this optimizer's, as torch's __setstate__ does for keys newer than a checkpoint.
    if len(saved_groups) == len(opt.param_groups):
        for i, (g, own) in enumerate(zip(saved_groups, opt.param_groups)):
            for k, v in own.items():
                if k not in g:
                    g[k] = v
            # the optimizer's mode decides the state layout: convert, never switch silently
            if g["acceleration_mode"] != own["acceleration_mode"] and g["acceleration_mode"] in MODES:
                notes.append(
                    f"param group {i} was saved with acceleration_mode={g['acceleration_mode']!r} and this "
                    f"optimizer was built with {own['acceleration_mode']!r}: kept the base optimizer's state, "
                    + _mode_change(g["acceleration_mode"], own["acceleration_mode"])
                )
                g["acceleration_mode"] = own["acceleration_mode"]
            for k in opt._global_keys:
                if k in g and g[k] != opt.defaults.get(k):
                    notes.append(
                        f"param group {i} was saved with {k}={g[k]!r}; {k} is one value for the whole optimizer "
                        f"(the gradient clipping), this optimizer's {opt.defaults.get(k)!r} is kept"
                    )
                    g[k] = opt.defaults.get(k)
            normalize(g)
            notes += _storage_settings(i, g, own)
            check_group(type(opt), g, f" (param group {i} of the loaded state dict, {describe})", opt.defaults)
    _check_states(opt, target, describe, saved_groups, states)
    if len(saved_groups) == len(opt.param_groups):
        for i, (g, own) in enumerate(zip(saved_groups, opt.param_groups)):
            converted = set()
            for pid, p in zip(g["params"], own["params"]):
                if pid in states:
                    converted.update(convert_sequences(states[pid], p, stores_differences(g, p.dtype)))
            if converted:
                notes.append(
                    f"param group {i}: Win sequences were saved in the other form than this optimizer keeps with "
                    f"state_dtype={_dtype_name(g.get('state_dtype'))} (x/y, or with bfloat16 state of float32/float64 "
                    f"parameters their differences from the parameter, x_delta = x - p): converted with the current "
                    f"parameters ({', '.join(sorted(converted))})")
    out = {k: v for k, v in state_dict.items() if k != MARK}
    out["param_groups"] = saved_groups
    out["state"] = states
    return out, notes


@torch.no_grad()
def convert_sequences(state: dict, p: Tensor, differences: bool) -> List[str]:
    """Put the Win sequences of one parameter's ``state`` (a dict, changed in place) in the form the group
    keeps: ``x``/``y`` into ``x_delta``/``y_delta`` (``differences``) or back, computed in float32 (float64
    for float64 parameters) with the current ``p``. A difference keeps the saved dtype (the load rounds it
    to the state dtype afterwards); a sequence rebuilt from a difference is left in the compute dtype.
    Returns what was converted, as ``"x -> x_delta"``."""
    done = []
    work = torch.float64 if p.dtype == torch.float64 else torch.float32
    for plain, diff in DIFFERENCE_KEYS.items():
        src, dst = (plain, diff) if differences else (diff, plain)
        if src not in state:
            continue
        value = state.pop(src)
        if dst in state:  # both saved: the one this optimizer keeps is used
            continue
        if is_dtensor(value) != is_dtensor(p):
            raise ValueError(
                f"load_state_dict: cannot convert state {src!r} into {dst!r}: the saved value is "
                f"{'a DTensor' if is_dtensor(value) else 'a plain tensor'} and the parameter is not (load it as "
                f"the optimizer's own state dict, e.g. through torch.distributed.checkpoint.state_dict)")
        here = p.detach().to(device=value.device, dtype=work)
        state[dst] = (value.to(work) - here).to(value.dtype) if differences else here + value.to(work)
        done.append(f"{src} -> {dst}")
    return done


def _dtype_name(dtype) -> Optional[str]:
    return None if dtype is None else str(dtype).replace("torch.", "")


def _storage_settings(i: int, saved: dict, own: dict) -> List[str]:
    """How the state is stored and rounded: a ``state_dtype`` the optimizer was built with (not None) replaces
    the checkpoint's (the state is converted by :func:`set_loaded_dtypes`); with None, and for the rounding
    settings, the checkpoint's stay (torch's rule for hyper-parameters). Notes for what differs."""
    notes = []
    if own.get("state_dtype") is not None:
        saved["state_dtype"] = own["state_dtype"]
    elif saved.get("state_dtype") is not None:
        notes.append(f"param group {i} was saved with state_dtype={_dtype_name(saved['state_dtype'])} and this optimizer "
                     f"was built with None: the checkpoint's is loaded (build it with a state_dtype to convert the state)")
    for k in ("bf16_stochastic_round", "rounding_seed"):
        if saved.get(k) != own.get(k):
            notes.append(f"param group {i} was saved with {k}={saved.get(k)!r} and this optimizer was built with "
                         f"{own.get(k)!r}: the checkpoint's {saved.get(k)!r} is loaded (torch's rule for hyper-parameters; "
                         f"set param_group[{k!r}] after loading for another)")
    return notes


def set_loaded_dtypes(opt, state_dict: dict) -> List[str]:
    """After torch's load (which casts floating state to the parameter's dtype): every state buffer in its
    group's state dtype (``_precision.state_dtype``), taken from the loaded values, so a buffer saved in that dtype is
    exact. Returns a note per group whose buffers were converted (rounded to nearest)."""
    notes = []
    for i, (saved_group, group) in enumerate(zip(state_dict["param_groups"], opt.param_groups)):
        changes = set()
        for pid, p in zip(saved_group["params"], group["params"]):
            target = _precision.state_dtype(group, p)
            for key, value in state_dict["state"].get(pid, {}).items():
                live = opt.state[p].get(key)
                if key == "step" or not (isinstance(value, Tensor) and isinstance(live, Tensor)) or not value.is_floating_point():
                    continue
                if live.dtype != target:
                    opt.state[p][key] = value.to(device=live.device, dtype=target, copy=True)
                if value.dtype != target:
                    changes.add((_dtype_name(value.dtype), _dtype_name(target)))
        for old, new in sorted(changes):
            notes.append(f"param group {i}: the state saved in {old} is converted to {new} (rounded to nearest), the "
                         f"state dtype of this optimizer")
    return notes


@torch.no_grad()
def set_state_dtype(opt, group: dict, state_dtype) -> None:
    """Set ``group["state_dtype"]`` and convert the group's existing state buffers to it (rounded to nearest;
    the Win sequences into the form it keeps, ``convert_sequences``)."""
    group["state_dtype"] = state_dtype
    for p in group["params"]:
        state = opt.state.get(p, {})
        convert_sequences(state, p, stores_differences(group, p.dtype))
        target = _precision.state_dtype(group, p)
        for key, value in state.items():
            if key != "step" and isinstance(value, Tensor) and value.is_floating_point() and value.dtype != target:
                state[key] = value.to(dtype=target)


def _mode_change(old: str, new: str) -> str:
    keep = [k for k in extra_state_keys(new) if k in extra_state_keys(old)]
    start = [k for k in extra_state_keys(new) if k not in extra_state_keys(old)]
    drop = [k for k in extra_state_keys(old) if k not in extra_state_keys(new)]
    parts = []
    if keep:
        parts.append(f"kept {', '.join(keep)}")
    if start:
        parts.append(f"{', '.join(start)} start{'s' if len(start) == 1 else ''} from the current parameters")
    if drop:
        parts.append(f"dropped {', '.join(drop)}")
    return "; ".join(parts)


def _check_states(opt, target, describe, groups, states) -> None:
    """Every stepped parameter must have all of the base optimizer's buffers, shaped like it, and nothing
    this optimizer does not keep: a missing buffer would otherwise start from zeros mid-run."""
    if len(groups) != len(opt.param_groups):
        return  # torch.optim.Optimizer.load_state_dict raises for this
    for g, own in zip(groups, opt.param_groups):
        if len(g["params"]) != len(own["params"]):
            return  # likewise
        base = set(opt._state_keys(g))
        allowed = base | {"step"} | set(DIFFERENCE_KEYS) | set(DIFFERENCE_KEYS.values())
        for pid, p in zip(g["params"], own["params"]):
            st = states.get(pid)
            if not st:
                continue
            unknown = sorted(set(st) - allowed, key=str)
            if unknown:
                raise ValueError(
                    f"{target}.load_state_dict: the state of a parameter in {describe} holds {unknown}, which "
                    f"{target} does not keep (it keeps {sorted(allowed)}): it was saved by another optimizer "
                    f"(or with other options, e.g. amsgrad)"
                )
            missing = sorted(base - set(st))
            if missing:
                raise ValueError(
                    f"{target}.load_state_dict: the state of a stepped parameter in {describe} has no {missing}, "
                    f"which {target} needs with these options (e.g. amsgrad={g.get('amsgrad')}); it was saved by "
                    f"another optimizer or with other options"
                )
            for k, v in st.items():
                if isinstance(v, Tensor) and k != "step" and v.shape != p.shape:
                    raise ValueError(
                        f"{target}.load_state_dict: state {k!r} has shape {tuple(v.shape)} for a parameter of "
                        f"shape {tuple(p.shape)}: the state dict belongs to other parameters"
                    )


@torch.no_grad()
def finish(opt) -> None:
    """After loading: the Win sequences of each group's mode exist for every stepped parameter (a
    converted mode starts the missing ones from the current parameters: ``x = p``, a difference of 0) and no
    others remain."""
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if not st:
                continue
            wanted = sequence_keys(group, p.dtype)
            for k in (*DIFFERENCE_KEYS, *DIFFERENCE_KEYS.values()):
                if k in wanted and k not in st:
                    st[k] = opt._new_sequence(p, group, k)
                elif k not in wanted and k in st:
                    del st[k]

