"""``WinTrainer``: ``transformers.Trainer`` whose optimizer comes from the hf_win registry.

Use exactly like ``Trainer`` with :class:`hf_win.WinTrainingArguments`. For a plain ``Trainer``:
``Trainer(..., optimizer_cls_and_kwargs=hf_win.get_optimizer_cls_and_kwargs(args))`` builds the same
optimizer over the same parameter groups.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

import torch
from transformers import Trainer
from transformers.trainer_callback import ExportableState, TrainerCallback

from ._compat import CheckpointNamesMixin, OptimizerResumeLogMixin, model_card_hyperparameters
from .optim import MuonWin, Win, WinOptimizer, check_partitioned
from .optim._memory import state_element_size
from .optim._win import extra_state_keys
from .registry import get_optimizer_spec
from .resume_settings import apply_given_settings, describe_running_settings
from .training_args import is_win_optimizer, win_optimizer_kwargs

__all__ = ["WinTrainer", "get_optimizer_cls_and_kwargs", "optimizer_state_bytes", "win_settings", "WinSettingsCallback"]

# The Trainer's own logger: the train-start summary appears where the Trainer's
# "***** Running training *****" does, at the same --log_level.
logger = logging.getLogger("transformers.trainer")


def get_optimizer_cls_and_kwargs(args, model: Optional[torch.nn.Module] = None) -> Tuple[type, Dict[str, Any]]:
    """``(optimizer class, keywords)`` for ``args`` (a ``TrainingArguments``).

    A registry name in ``args.optim`` gives the Win optimizer with lr / weight_decay / betas / eps from the
    standard fields, ``acceleration_mode`` / ``reckless_steps`` from :class:`WinTrainingArguments`, the
    parsed ``--optim_args`` and ``max_grad_norm=0`` (the Trainer clips); for ``muon_win`` also ``model`` (the
    Trainer then gives the optimizer the model instead of its parameter groups). Any other name is delegated to
    ``transformers.Trainer.get_optimizer_cls_and_kwargs``. The result fits
    ``Trainer(optimizer_cls_and_kwargs=...)``.
    """
    optim = getattr(args.optim, "value", args.optim)
    if is_win_optimizer(optim):
        cls, kwargs = win_optimizer_kwargs(args)
        if cls is MuonWin and model is not None:
            # the Trainer builds cls(model, **kwargs): MuonWin splits the model (embeddings and head to AdamW)
            kwargs["model"] = model
        return cls, kwargs
    return Trainer.get_optimizer_cls_and_kwargs(args, model)


def win_settings(args) -> Optional[Dict[str, Any]]:
    """Which Win ran: ``{"optimizer", "class", "acceleration_mode", "reckless_steps", "optim_args"}`` for a Win
    ``--optim`` (``None`` otherwise). What the model card and ``trainer_state.json`` record."""
    optim = getattr(args.optim, "value", args.optim)
    if not is_win_optimizer(optim):
        return None
    cls, kwargs = win_optimizer_kwargs(args)
    return {"optimizer": optim, "class": f"hf_win.{cls.__name__}", "acceleration_mode": kwargs["acceleration_mode"],
            "reckless_steps": list(kwargs["reckless_steps"]), "optim_args": getattr(args, "optim_args", None) or None}


class WinSettingsCallback(TrainerCallback, ExportableState):
    """Carries :func:`win_settings` into ``trainer_state.json`` (``stateful_callbacks.WinSettingsCallback.args``),
    in every checkpoint and at ``save_state()``. It changes nothing in training. At train start (after a
    resume has loaded the optimizer state) ``WinTrainer`` gives it the settings that run."""

    def __init__(self, **settings):
        self.settings = settings

    def state(self) -> dict:
        return {"args": dict(self.settings), "attributes": {}}


def optimizer_state_bytes(optimizer_cls: type, kwargs: Dict[str, Any], params) -> int:
    """Bytes of optimizer state ``optimizer_cls(**kwargs)`` will hold for ``params`` once every one has
    been stepped (parameter-sized buffers in ``kwargs["state_dtype"]``, else in the parameters' dtype)."""
    n = optimizer_cls.buffers_per_parameter(kwargs.get("acceleration_mode", "win"), **_hyper(kwargs))
    state_dtype = kwargs.get("state_dtype")
    return n * sum(p.numel() * state_element_size(state_dtype, p.dtype) for p in params)


def _hyper(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k not in ("acceleration_mode", "params")}


def _one(values) -> Any:
    """The value all param groups share, else their values joined with '/'."""
    distinct = list(dict.fromkeys(values))
    return distinct[0] if len(distinct) == 1 else "/".join(map(str, distinct))


def _state_dtypes(group: dict) -> str:
    """The dtype(s) the group's state is held in: its ``state_dtype``, else its parameters' (and complex
    parameters keep complex state)."""
    own = group.get("state_dtype")
    names = {str(p.dtype if own is None or p.is_complex() else own).replace("torch.", "") for p in group["params"]}
    return "/".join(sorted(names)) or "-"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024.0
    return f"{n} B"  # pragma: no cover


class _WhatRunsReporter(TrainerCallback):
    """At train start (after a resume has loaded the optimizer state), ``WinTrainer._report_what_runs``;
    after the first optimizer step, log the path each param group actually took (the train-start line
    says which it will take): a kernel, or foreach with the reason of the fallback."""

    def __init__(self, trainer):
        self.trainer, self.done = trainer, False

    def on_train_begin(self, args, state, control, **kwargs):
        self.done = False
        self.trainer._report_what_runs(state)

    def on_step_end(self, args, state, control, **kwargs):
        if self.done:
            return
        self.done = True
        inner = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)
        if isinstance(inner, (WinOptimizer, Win)):
            path = inner.step_path()
            summary = getattr(self.trainer, "win_optimizer_summary", None)
            if summary is not None:
                summary["step_path_taken"] = path
            logger.info("hf_win optimizer: the first step took: %s", path)


class WinTrainer(OptimizerResumeLogMixin, CheckpointNamesMixin, Trainer):
    """``transformers.Trainer`` with the Win optimizers. Same arguments, same parameter groups (no weight
    decay on biases and norm weights), same checkpoint files.

    One fix on top (``hf_win._compat.CheckpointNamesMixin``): resuming (``train(resume_from_checkpoint=...)``)
    and ``load_best_model_at_end`` load checkpoints saved in the original parameter naming correctly
    (transformers 5.x: a plain ``Trainer`` drops ViT's encoder weights there), and a checkpoint that does
    not match the model is an error instead of a warning. On resume it logs what loading the optimizer state
    did (``OptimizerResumeLogMixin``): a checkpoint of another ``--acceleration_mode`` is converted to the
    mode asked for (warned), one of another optimizer is refused (``WinOptimizer.load_state_dict``)."""

    # Trainer.create_optimizer calls self.get_optimizer_cls_and_kwargs(self.args, model).
    get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_fsdp_enabled()
        self.add_callback(_WhatRunsReporter(self))
        settings = win_settings(self.args)
        if settings is not None:
            self.add_callback(WinSettingsCallback(**settings))

    def create_model_card(self, *args, **kwargs):
        """``Trainer.create_model_card``; with a Win optimizer the card also lists the acceleration mode, the
        reckless steps and ``optim_args``, and its optimizer line names them."""
        settings = win_settings(self.args)
        if settings is None:
            return super().create_model_card(*args, **kwargs)

        def update(trainer, hyperparameters):
            a = trainer.args
            betas = f"betas=({a.adam_beta1},{a.adam_beta2}), " if "betas" in get_optimizer_spec(a.optim).accepted_keys else ""
            hyperparameters["optimizer"] = (
                f"Use {settings['optimizer']} ({settings['class']}) with acceleration_mode={settings['acceleration_mode']}, "
                f"reckless_steps={tuple(settings['reckless_steps'])}, {betas}epsilon={a.adam_epsilon} and "
                f"optimizer_args={settings['optim_args'] or 'No additional optimizer arguments'}")
            hyperparameters["acceleration_mode"] = settings["acceleration_mode"]
            hyperparameters["reckless_steps"] = tuple(settings["reckless_steps"])
            if settings["optim_args"]:
                hyperparameters["optim_args"] = settings["optim_args"]
            return hyperparameters

        with model_card_hyperparameters(update):
            return super().create_model_card(*args, **kwargs)

    def _check_fsdp_enabled(self) -> None:
        """``--fsdp`` (or ``accelerate launch`` with an FSDP config) must not be dropped silently. Accelerate
        (1.15) turns an FSDP plugin into an FSDP run only for GPU-type processes; on CPU processes
        (``--use_cpu`` under torchrun) it keeps ``MULTI_CPU`` and the run would train unsharded, as DDP,
        without a word."""
        asked = "--fsdp" if getattr(self.args, "fsdp", None) else None
        if asked is None and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            asked = "ACCELERATE_USE_FSDP=true (accelerate launch with an FSDP config)"
        if asked and not (getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_fsdp_xla_enabled", False)):
            kind = str(getattr(self.accelerator, "distributed_type", "unknown")).split(".")[-1]
            raise ValueError(
                f"{asked} was given but Accelerate did not enable FSDP for these processes (distributed type "
                f"{kind}): Accelerate enables FSDP only on GPU-type devices, so this run would train "
                "unsharded (as DDP). Drop the FSDP request to train with DDP on CPU processes, use --deepspeed "
                "(ZeRO runs on CPU), or run FSDP on GPUs."
            )

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh:
            self._check_sharding(optimizer)
        return optimizer

    def _check_sharding(self, optimizer) -> None:
        """Stop a DeepSpeed ZeRO run now (before training) if the optimizer would be wrong on ZeRO's
        flattened partitions (LAMB's trust ratio; see ``hf_win.optim._sharding``)."""
        inner = getattr(optimizer, "optimizer", optimizer)
        ds = getattr(self.args, "hf_deepspeed_config", None) if self.is_deepspeed_enabled else None
        if ds is not None and isinstance(inner, WinOptimizer):
            stage = int(ds.config.get("zero_optimization", {}).get("stage", 0) or 0)
            if stage >= 1:
                check_partitioned(inner, where=f"DeepSpeed ZeRO stage {stage}")

    def _report_what_runs(self, state) -> None:
        """At train start: after a resume, the settings given at resume where they win and the arguments
        rewritten to what the loaded optimizer runs (``hf_win.resume_settings``, warned); then the log line,
        ``win_optimizer_summary`` and the ``WinSettingsCallback`` entry of ``state`` from what runs. A
        checkpoint without that entry (a plain Trainer's, another optimizer's) gets it; a non-Win run drops
        one a checkpoint carried."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        name = getattr(self.args.optim, "value", self.args.optim)
        if isinstance(inner, WinOptimizer) and is_win_optimizer(name) and type(inner) is get_optimizer_spec(name).cls:
            resumed = state.global_step > 0
            notes = apply_given_settings(self.args, inner) if resumed else []
            notes += describe_running_settings(self.args, inner, "the checkpoint's" if resumed else "the optimizer's")
            if notes:
                logger.warning("hf_win: the optimizer runs with other settings than the arguments said (after a resume: "
                               "see docs/resume.md): %s. The arguments now say what runs (--optim_args %s), as do "
                               "training_args.bin, the model card and trainer_state.json.",
                               "; ".join(notes), self.args.optim_args)
        if isinstance(inner, WinOptimizer):
            self._log_win_optimizer(inner)
        elif isinstance(inner, Win):
            self._log_wrapped_optimizer(inner)
        settings = win_settings(self.args)
        if settings is None:
            state.stateful_callbacks.pop(WinSettingsCallback.__name__, None)
            return
        # the instance built in __init__, or the one the Trainer rebuilt from the checkpoint's entry
        # (--restore_callback_states_from_checkpoint); a new one if the arguments were switched to Win since
        callback = next((cb for cb in self.callback_handler.callbacks if isinstance(cb, WinSettingsCallback)), None)
        if callback is None:
            callback = WinSettingsCallback()
            self.add_callback(callback)
        callback.settings = settings
        state.stateful_callbacks[WinSettingsCallback.__name__] = callback.state()

    def _log_win_optimizer(self, inner: WinOptimizer) -> None:
        """The train-start line and ``win_optimizer_summary``, from the param groups as they run."""
        groups = inner.param_groups
        params = [p for g in groups for p in g["params"]]
        n = _one(type(inner).buffers_per_parameter(g["acceleration_mode"], **_hyper(g)) for g in groups)
        nbytes = sum(optimizer_state_bytes(type(inner), g, g["params"]) for g in groups)
        name = getattr(self.args.optim, "value", self.args.optim)
        self.win_optimizer_summary = {
            "optimizer": name,
            "class": type(inner).__name__,
            "acceleration_mode": _one(g["acceleration_mode"] for g in groups),
            "reckless_steps": _one(tuple(g["reckless_steps"]) for g in groups),
            "state_dtype": _one(_state_dtypes(g) for g in groups),
            "bf16_stochastic_round": _one(bool(g.get("bf16_stochastic_round", False)) for g in groups),
            "rounding_seed": _one(int(g.get("rounding_seed", 0)) for g in groups),
            "state_buffers_per_parameter": n,
            "state_bytes": nbytes,
            "step_path": inner.step_path(),
        }
        summary = self.win_optimizer_summary
        logger.info(
            "hf_win optimizer: %s (%s), acceleration_mode=%s, reckless_steps=%s, optimizer state: %s buffers per "
            "parameter in %s = %s for %d parameters, step: %s",
            name, summary["class"], summary["acceleration_mode"], summary["reckless_steps"], n, summary["state_dtype"],
            _fmt_bytes(nbytes), sum(p.numel() for p in params), summary["step_path"],
        )

    def _log_wrapped_optimizer(self, inner: Win) -> None:
        """The train-start line for a ``Win(base)`` registry optimizer: the base's state is its own (its size
        is known after the first step); Win adds ``x`` (and ``y``) per parameter."""
        defaults = inner.defaults
        params = [p for g in inner.param_groups for p in g["params"]]
        n = len(extra_state_keys(defaults["acceleration_mode"]))
        nbytes = n * sum(p.numel() * p.element_size() for p in params)
        name = getattr(self.args.optim, "value", self.args.optim)
        self.win_optimizer_summary = {
            "optimizer": name, "class": type(inner).__name__, "base": type(inner.base_optimizer).__name__,
            "acceleration_mode": defaults["acceleration_mode"], "reckless_steps": tuple(defaults["reckless_steps"]),
            "win_buffers_per_parameter": n, "win_state_bytes": nbytes, "step_path": inner.step_path(),
        }
        logger.info(
            "hf_win optimizer: %s (%s = Win around %s), acceleration_mode=%s, reckless_steps=%s, Win's state: %d "
            "buffers per parameter = %s for %d parameters (plus the base's own state), step: %s",
            name, type(inner).__name__, type(inner.base_optimizer).__name__, defaults["acceleration_mode"],
            tuple(defaults["reckless_steps"]), n, _fmt_bytes(nbytes), sum(p.numel() for p in params),
            inner.step_path(),
        )

